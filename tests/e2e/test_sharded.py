"""Sharded checkpoints through torch.distributed.checkpoint: FSDP2 (``fully_shard``) on CPU
with gloo, each rank a process started as ``torchrun`` would (tests/support/sharded_worker.py).

Saved by 2 ranks, the checkpoint lists every rank's files with digests and resumes bit-exact
(the full, gathered state) on 2, 1 and 4 ranks; saved by 1, it resumes on 2; saved by 4, on
2. A rank killed mid-save (at once, or stalled in its write and then SIGKILLed) leaves no
committed checkpoint, locally or remotely, its peer raises, and the previous one restores. A
plain DCP directory from a trainer that knows nothing of ckptsync syncs as a zero-code
``dir:`` rule with DCP's ``.metadata`` as the completion marker.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptsync import start_watcher
from ckptsync.local import LocalStore
from ckptsync.manifest import make_name
from ckptsync.remote import RemoteStore
from ckptsync.zerocode import restore_watched
from tests.support.helpers import PY, assert_tree_equal, child_env, staging_dirs
from tests.support.paths import SUPPORT
from tests.support.remotes import Remote
from tests.support.sharded_worker import DONE
from tests.support.watchkit import wait_for

WORKER = SUPPORT / "sharded_worker.py"
TIMEOUT_S = 300  # per job: generous for 2 shared cores; a hang fails, it never blocks

pytestmark = [pytest.mark.usefixtures("no_process_leak"), pytest.mark.full]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ranks(world: int, mode: str, directory: Path, out: Path, remote: str | None = None,
           *, kill_at: tuple[int, Path] | None = None, **env_extra: str
           ) -> list[tuple[int, str]]:
    """Run ``world`` ranks of the worker (torchrun's environment); (returncode, output).
    ``kill_at=(rank, marker)``: SIGKILL that rank once it creates ``marker``."""
    out.mkdir(parents=True, exist_ok=True)
    master_port = str(_free_port())
    procs = []
    for rank in range(world):
        env = child_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                        LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=master_port, **env_extra)
        procs.append(subprocess.Popen(
            [PY, str(WORKER), mode, str(directory), str(out), *([remote] if remote else [])],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    results = []
    try:
        if kill_at is not None:
            victim, marker = kill_at
            deadline = time.monotonic() + TIMEOUT_S
            while not marker.exists() and time.monotonic() < deadline \
                    and procs[victim].poll() is None:
                time.sleep(0.1)
            procs[victim].send_signal(signal.SIGKILL)
        for p in procs:
            try:
                results.append((p.communicate(timeout=TIMEOUT_S)[0], p))
            except subprocess.TimeoutExpired:
                p.kill()
                results.append((p.communicate()[0] + "\n[killed: timed out]", p))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(p.returncode, text) for text, p in results]


#: An open defect, not a pass: now and then (a loaded machine, 2 ranks, gloo) a rank that
#: finished everything, its process group destroyed, aborts in the interpreter's teardown
#: (SIGABRT, this line on stderr: a C++ thread still joinable at exit). Tolerated only there,
#: after the worker's last line, and reported as a warning; anywhere else it fails.
TEARDOWN_ABORT = "terminate called without an active exception"


def _ok(results: list[tuple[int, str]]) -> None:
    for rank, (rc, text) in enumerate(results):
        after = text.rsplit(DONE, 1)[1].strip() if DONE in text else None
        if rc == -signal.SIGABRT and after == TEARDOWN_ABORT:
            warnings.warn(f"rank {rank} aborted in its interpreter teardown after finishing "
                          f"({TEARDOWN_ABORT}): the open teardown defect", stacklevel=2)
            continue
        assert rc == 0, f"rank {rank} exited {rc}:\n{text[-4000:]}"


def _reports(out: Path, world: int) -> list[dict[str, Any]]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("sharded")
    _ok(_ranks(2, "save", base / "ckpts", base / "save"))
    return base / "ckpts", base / "save"


@pytest.mark.core
def test_manifest_lists_every_ranks_files_with_digests(saved: tuple[Path, Path]) -> None:
    directory, out = saved
    store = LocalStore(directory)
    (ckpt,) = store.list()
    store.verify(ckpt)  # every file's size and BLAKE3 digest
    assert ckpt.step == 3 and staging_dirs(directory) == []
    assert {f.path for f in ckpt.manifest.files} == {
        ".metadata", "__0_0.distcp", "__1_0.distcp", "rng.pt"}
    assert ckpt.manifest.meta["dcp"] == {"world_size": 2, "objects": ["model", "optim"]}
    # save() returned on every rank before its files could be written (each write was held
    # until then, and training changed the weights meanwhile: the checkpoint holds the state
    # at save time, see the restore tests); wait() returned on every rank once committed.
    for r in _reports(out, 2):
        assert not r["handle_done"] and r["committed_at_return"] == [], r
        assert r["waited"] == ckpt.name and r["committed_after_wait"] == [3], r
    # The CLI needs nothing DCP-specific: it is files and digests.
    for cmd in (["verify", str(directory)], ["ls", str(directory)]):
        done = subprocess.run([PY, "-m", "ckptsync", *cmd], env=child_env(),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and ckpt.name in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize("world", [pytest.param(2, marks=pytest.mark.core), 1, 4])
def test_resumes_bit_exact_on_any_world_size(saved: tuple[Path, Path], tmp_path: Path,
                                             world: int) -> None:
    directory, save_out = saved
    mine = tmp_path / "ckpts"
    shutil.copytree(directory, mine)  # restore marks the directory: each test its own copy
    _ok(_ranks(world, "restore", mine, tmp_path / "out"))
    expected = torch.load(save_out / "expected.pt", weights_only=True)
    assert_tree_equal(torch.load(tmp_path / "out" / "restored.pt", weights_only=True), expected)
    reports, before = _reports(tmp_path / "out", world), _reports(save_out, 2)
    assert {r["step"] for r in reports} == {3}
    assert reports[0]["extra"] == {"lr": 0.05} and reports[0]["metrics"] == {"loss": 1.5}
    if world == 2:  # same world size: the same losses and each rank's own RNG stream
        assert [r["losses"] for r in reports] == [r["losses"] for r in before]
        assert [r["draws"] for r in reports] == [r["draws"] for r in before]


def test_saved_by_one_rank_resumes_on_two(tmp_path: Path) -> None:
    _ok(_ranks(1, "save", tmp_path / "ckpts", tmp_path / "save"))
    _ok(_ranks(2, "restore", tmp_path / "ckpts", tmp_path / "out"))
    assert_tree_equal(torch.load(tmp_path / "out" / "restored.pt", weights_only=True),
                      torch.load(tmp_path / "save" / "expected.pt", weights_only=True))


def test_saved_by_four_resumes_bit_exact_on_two(tmp_path: Path) -> None:
    """4 -> 2: DCP reshards four ranks' shards onto two (each loads parts of two files)."""
    _ok(_ranks(4, "save", tmp_path / "ckpts", tmp_path / "save"))
    (ckpt,) = LocalStore(tmp_path / "ckpts").list()
    assert {f.path for f in ckpt.manifest.files} >= {f"__{r}_0.distcp" for r in range(4)}
    _ok(_ranks(2, "restore", tmp_path / "ckpts", tmp_path / "out"))
    assert_tree_equal(torch.load(tmp_path / "out" / "restored.pt", weights_only=True),
                      torch.load(tmp_path / "save" / "expected.pt", weights_only=True))
    assert {r["step"] for r in _reports(tmp_path / "out", 2)} == {3}


def test_rank_killed_mid_save_commits_nothing_and_previous_restores(tmp_path: Path) -> None:
    directory, out = tmp_path / "ckpts", tmp_path / "kill"
    results = _ranks(2, "kill", directory, out)
    assert results[1][0] == -9, results[1][1][-3000:]  # rank 1 SIGKILLed itself mid-write
    assert (out / "rank0-ready").exists()
    # Rank 0 never reports a save of step 2 as done (it fails or is killed by the bound).
    assert not (out / "rank0.json").exists() or not json.loads(
        (out / "rank0.json").read_text()).get("save2_returned")
    store = LocalStore(directory)
    assert [c.step for c in store.list()] == [1]  # step 2 was never committed
    # Rank 0 saw its peer die (gloo: connection closed) and failed the save, within the
    # bound, removing its staging directory; had it died too, the next start would remove it.
    assert results[0][0] not in (0, -9) and "[killed: timed out]" not in results[0][1], \
        results[0][1][-3000:]
    _ok(_ranks(1, "restore", directory, tmp_path / "out"))
    assert_tree_equal(torch.load(tmp_path / "out" / "restored.pt", weights_only=True),
                      torch.load(out / "expected.pt", weights_only=True))
    assert staging_dirs(directory) == []  # the next Checkpointer removed the leftover


def test_write_failure_on_one_rank_raises_on_every_rank_at_the_next_call(tmp_path: Path
                                                                         ) -> None:
    """Rank 1's disk is full for one write of the (asynchronous) save of step 2: the save
    returned on both ranks; the next call (save of step 3) raises on both, naming rank 1's
    file and error; step 2 is not committed; the process group is still usable: step 4 is
    saved and restores bit-exact."""
    directory, out = tmp_path / "ckpts", tmp_path / "fail"
    _ok(_ranks(2, "fail", directory, out))
    reports = _reports(out, 2)
    for r in reports:
        assert r["save2_returned"], r
        err = r.get("save3_error", "")
        assert "rank 1" in err and "No space left on device" in err and ".distcp" in err, r
        assert r["steps"] == [1, 4], r
    assert [c.step for c in LocalStore(directory).list()] == [1, 4]
    assert staging_dirs(directory) == []
    _ok(_ranks(2, "restore", directory, tmp_path / "out"))
    assert_tree_equal(torch.load(tmp_path / "out" / "restored.pt", weights_only=True),
                      torch.load(out / "expected.pt", weights_only=True))


def test_rank_stalled_then_killed_mid_save_commits_nothing_locally_or_remotely(
        tmp_path: Path, s3_remote: Remote) -> None:
    """Rank 1's disk stops answering mid-save and the rank is SIGKILLed there: rank 0's save
    raises (within the bound, not a hang), step 2 exists neither locally nor remotely, and a
    fresh machine resumes step 1 bit-exact from the remote."""
    directory, out = tmp_path / "ckpts", tmp_path / "stall"
    results = _ranks(2, "stall", directory, out, s3_remote.url,
                     kill_at=(1, out / "rank1-stalled"),
                     CKPTSYNC_STORAGE_OPTIONS=json.dumps(s3_remote.storage_options))
    assert (out / "rank1-stalled").exists(), results[1][1][-3000:]
    assert results[1][0] == -9
    assert results[0][0] == 3, results[0][1][-3000:]  # rank 0 raised and went on
    report = json.loads((out / "rank0.json").read_text())
    # It raised (gloo: the connection to rank 1 closed) instead of hanging or committing.
    assert "save2_returned" not in report and report.get("save2_error"), report
    assert [c.step for c in LocalStore(directory).list()] == [1]
    store = RemoteStore(s3_remote.url, s3_remote.storage_options)
    assert [m.step for m in store.list()] == [1]  # nothing of step 2 was committed
    assert [e.status for e in store.scan()] == ["valid"]
    _ok(_ranks(2, "restore", tmp_path / "fresh", tmp_path / "out", s3_remote.url,
               CKPTSYNC_STORAGE_OPTIONS=json.dumps(s3_remote.storage_options)))
    assert_tree_equal(torch.load(tmp_path / "out" / "restored.pt", weights_only=True),
                      torch.load(out / "expected.pt", weights_only=True))


def test_remote_holds_every_ranks_files_and_a_fresh_machine_resumes(
        tmp_path: Path, file_remote: Remote) -> None:
    _ok(_ranks(2, "save", tmp_path / "ckpts", tmp_path / "save", file_remote.url))
    store = RemoteStore(file_remote.url, file_remote.storage_options)
    (m,) = store.list()
    store.verify(m.name, full=True)
    assert {f.path for f in m.files} >= {".metadata", "__0_0.distcp", "__1_0.distcp"}
    # A fresh machine: an empty local directory; rank 0 pulls, both ranks load.
    _ok(_ranks(2, "restore", tmp_path / "fresh", tmp_path / "out", file_remote.url))
    assert_tree_equal(torch.load(tmp_path / "out" / "restored.pt", weights_only=True),
                      torch.load(tmp_path / "save" / "expected.pt", weights_only=True))


def _markers(remote: Remote, node: int) -> list[str]:
    fs = remote.fs()
    fs.invalidate_cache()
    return list(fs.glob(f"{remote.path}/*/ckptsync-part-{node}.json"))


def test_two_nodes_commit_once_when_every_part_is_remote(tmp_path: Path,
                                                         file_remote: Remote) -> None:
    _two_nodes(tmp_path, file_remote)


def test_two_nodes_commit_once_when_every_part_is_remote_s3(tmp_path: Path,
                                                            s3_remote: Remote) -> None:
    _two_nodes(tmp_path, s3_remote)


def _two_nodes(tmp_path: Path, remote: Remote) -> None:
    """Two simulated nodes (a rank each, each its own directory and uploader), one remote:
    node 1's upload stalls; the checkpoint is not visible remotely until node 1's files are
    there, then it is committed exactly once with both nodes' files, and two fresh nodes
    resume from it bit-exact."""
    gate, out = tmp_path / "gate", tmp_path / "save"
    env = {"CKPTSYNC_STORAGE_OPTIONS": json.dumps(remote.storage_options),
           "CKPT_TEST_GATE": str(gate)}
    out.mkdir()
    results: list[list[tuple[int, str]]] = []
    job = threading.Thread(target=lambda: results.append(_ranks(
        2, "nodes-save", tmp_path / "ckpts", out, remote.url, **env)))
    job.start()
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not _markers(remote, 0) and time.monotonic() < deadline and job.is_alive():
            time.sleep(0.2)
        assert len(_markers(remote, 0)) == 1  # node 0's part is up: its files are all there
        store = RemoteStore(remote.url, remote.storage_options)
        assert store.list() == []  # ... but the checkpoint does not exist yet
        assert not _markers(remote, 1)
        assert [e.status for e in store.scan()] == ["uncommitted"]
    finally:
        gate.touch()
        job.join(TIMEOUT_S + 30)
    _ok(results[0])
    (m,) = store.list()
    store.verify(m.name, full=True)
    assert {f.path for f in m.files} == {".metadata", "__0_0.distcp", "__1_0.distcp", "rng.pt"}
    assert m.meta["dcp"]["nodes"] == 2 and "part" not in m.meta
    logs = results[0][0][1] + results[0][1][1]
    assert logs.count(f"committed {m.name}") == 1, logs[-4000:]
    # Each node's directory holds its own part, committed locally.
    parts = [LocalStore(tmp_path / "ckpts" / f"node{n}").list() for n in (0, 1)]
    assert [[f.path for f in p[0].manifest.files] for p in parts] == [
        [".metadata", "__0_0.distcp", "rng.pt"], ["__1_0.distcp"]]
    # Two fresh nodes: each pulls the checkpoint, both ranks load their shards.
    _ok(_ranks(2, "nodes-restore", tmp_path / "fresh", tmp_path / "out", remote.url,
               CKPTSYNC_STORAGE_OPTIONS=env["CKPTSYNC_STORAGE_OPTIONS"]))
    assert_tree_equal(torch.load(tmp_path / "out" / "restored.pt", weights_only=True),
                      torch.load(out / "expected.pt", weights_only=True))
    assert [r["losses"] for r in _reports(tmp_path / "out", 2)] == \
        [r["losses"] for r in _reports(out, 2)]
    # The same nodes again: each holds only its part, so it gathers the whole from the remote;
    # node 1 also removes what a crashed save left in its own directory.
    leftover = tmp_path / "ckpts" / "node1" / f".staging-{make_name(9)}"
    leftover.mkdir()
    _ok(_ranks(2, "nodes-restore", tmp_path / "ckpts", tmp_path / "again", remote.url,
               CKPTSYNC_STORAGE_OPTIONS=env["CKPTSYNC_STORAGE_OPTIONS"]))
    assert_tree_equal(torch.load(tmp_path / "again" / "restored.pt", weights_only=True),
                      torch.load(out / "expected.pt", weights_only=True))
    assert not leftover.exists()


def test_a_node_leaders_upload_error_raises_on_every_rank(tmp_path: Path,
                                                          file_remote: Remote) -> None:
    """With ``on_remote_error="raise"``, node 1's leader (rank 1) uploads its part through a
    remote that refuses it: ``wait()`` raises on both ranks (not only on rank 1, and not
    swallowed as a warning there), and the checkpoint never exists remotely."""
    out = tmp_path / "out"
    _ok(_ranks(2, "nodes-remotefail", tmp_path / "ckpts", out, file_remote.url,
               CKPTSYNC_STORAGE_OPTIONS=json.dumps(file_remote.storage_options)))
    for r in _reports(out, 2):
        assert "waited" not in r and "Access Denied" in r.get("wait_error", ""), r
    assert RemoteStore(file_remote.url, file_remote.storage_options).list() == []


def test_two_nodes_each_with_its_own_watch_daemon(tmp_path: Path, file_remote: Remote) -> None:
    """Two simulated nodes save without a remote; a ``ckptsync watch`` per node uploads its
    part. Node 1's daemon starts late: until it has uploaded, the checkpoint does not exist
    remotely; then it exists once, whole, and resumes on two fresh nodes bit-exact."""
    ckpts, out = tmp_path / "ckpts", tmp_path / "save"
    _ok(_ranks(2, "nodes-save", ckpts, out))
    store = RemoteStore(file_remote.url, file_remote.storage_options)
    logs = [tmp_path / "watch0.log", tmp_path / "watch1.log"]

    def watch(node: int) -> Any:
        return start_watcher(ckpts / f"node{node}", file_remote.url,
                             storage_options=file_remote.storage_options, interval=1,
                             log_path=logs[node])

    first = watch(0)
    try:
        wait_for(lambda: _markers(file_remote, 0), "node 0's part to be uploaded",
                 timeout=TIMEOUT_S)
        assert store.list() == [] and not _markers(file_remote, 1)
        second = watch(1)
        try:
            second.flush(timeout=TIMEOUT_S)
        finally:
            assert second.stop() == 0
        first.flush(timeout=TIMEOUT_S)
    finally:
        assert first.stop() == 0
    (m,) = store.list()
    store.verify(m.name, full=True)
    assert {f.path for f in m.files} == {".metadata", "__0_0.distcp", "__1_0.distcp", "rng.pt"}
    text = logs[0].read_text() + logs[1].read_text()
    assert text.count(f"committed {m.name}") == 1, text[-4000:]
    _ok(_ranks(2, "nodes-restore", tmp_path / "fresh", tmp_path / "out", file_remote.url))
    assert_tree_equal(torch.load(tmp_path / "out" / "restored.pt", weights_only=True),
                      torch.load(out / "expected.pt", weights_only=True))


def test_plain_dcp_directory_syncs_as_a_zero_code_dir_rule(tmp_path: Path,
                                                           file_remote: Remote) -> None:
    import torch.distributed.checkpoint as dcp

    run = tmp_path / "run"
    run.mkdir()
    rule = "dir:step-*:.metadata;step=name"
    w = start_watcher(run, file_remote.url, storage_options=file_remote.storage_options,
                      rules=[rule], settle=0.3, interval=1, log_path=tmp_path / "daemon.log")
    try:
        state = {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(5)}
        # What a trainer that knows nothing of ckptsync does (DCP without a process group):
        # data files first, .metadata last (written as .metadata.tmp, then renamed).
        dcp.save(state, checkpoint_id=str(run / "step-7"))
        w.flush(timeout=120)
    finally:
        assert w.stop() == 0
    store = RemoteStore(file_remote.url, file_remote.storage_options)
    versions = [m for m in store.list() if m.source.get("kind") == "watched"]
    assert [m.step for m in versions] == [7], (tmp_path / "daemon.log").read_text()
    assert {f.path for f in versions[0].files} == {"step-7/.metadata", "step-7/__0_0.distcp"}
    fresh = tmp_path / "fresh"
    restore_watched(store, fresh)
    loaded = {"w": torch.zeros(3, 4), "b": torch.zeros(5)}
    dcp.load(loaded, checkpoint_id=str(fresh / "step-7"))
    assert_tree_equal(loaded, state)


#: The commands of docs/distributed.md, run exactly (``torchrun`` from this environment).
README_TORCHRUN = [
    "torchrun --standalone --nproc_per_node 2 examples/distributed/train_fsdp.py "
    "--ckpt-dir ckpts --steps 20",
    "torchrun --standalone --nproc_per_node 2 examples/distributed/train_fsdp.py "
    "--ckpt-dir ckpts --steps 40",
    "torchrun --standalone --nproc_per_node 1 examples/distributed/train_fsdp.py "
    "--ckpt-dir ckpts --steps 60",
]


def test_readme_torchrun_example_resumes_and_reshards(tmp_path: Path) -> None:
    torchrun = str(Path(PY).parent / "torchrun")
    (tmp_path / "examples").symlink_to(SUPPORT.parent.parent / "examples")
    firsts = []
    for cmd in README_TORCHRUN:
        args = cmd.split()
        done = subprocess.run([torchrun, *args[1:]], cwd=tmp_path, env=child_env(),
                              capture_output=True, text=True, timeout=TIMEOUT_S)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        steps = [int(line.split()[1]) for line in done.stdout.splitlines()
                 if line.startswith("step ")]
        firsts.append(steps[0])
    assert firsts == [0, 20, 40]  # each run resumed where the previous one stopped
    store = LocalStore(tmp_path / "ckpts")
    listed = store.list()
    for c in listed:
        store.verify(c)
    # keep_last=3, and retention spares the checkpoint this run resumed from (step 39).
    assert [c.step for c in listed] == [39, 50, 55, 59]
