"""torch.distributed (gloo, CPU, 2 processes): rank 0 writes, every rank returns after commit.

Each rank is a separate process started like ``torchrun`` would (TCP rendezvous on
127.0.0.1), sharing one checkpoint directory as ranks on one node or a shared file system do.
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptsync.local import LocalStore
from tests.support.helpers import PY, child_env, staging_dirs
from tests.support.paths import SUPPORT

pytestmark = pytest.mark.full

WORLD = 2
BOUND_S = 150  # generous: two cold torch imports on a shared 2-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_ranks(tmp_path: Path, mode: str, scenario: str | None = None
               ) -> tuple[Path, list[dict[str, Any]]]:
    """Run WORLD ranks of the DDP worker (``mode``) or of a fault ``scenario``
    (tests/support/dist_scenarios.py); a rank still running after BOUND_S fails the test
    (a hang is a failure, not a stuck suite)."""
    directory = tmp_path / "ckpts"
    port = _free_port()

    def cmd(rank: int) -> list[str]:
        args = [str(rank), str(WORLD), str(port), str(directory),
                str(tmp_path / f"rank{rank}.json")]
        if scenario is not None:
            return [PY, str(SUPPORT / "dist_scenarios.py"), scenario, *args]
        return [PY, str(SUPPORT / "helpers.py"), "dist-worker", *args, mode]

    procs = [subprocess.Popen(cmd(rank), env=child_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for rank in range(WORLD)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=BOUND_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"rank {rank} failed ({p.returncode}):\n{out}"
    return directory, [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    return _run_ranks(tmp_path_factory.mktemp("ddp"), "ok")


@pytest.mark.core
def test_rank0_alone_writes_one_checkpoint(ddp_run: tuple[Path, list[dict[str, Any]]]) -> None:
    directory, reports = ddp_run
    # Hidden bookkeeping (the writer lock, the resumed-from marker) is not a checkpoint.
    entries = [p.name for p in directory.iterdir() if not p.name.startswith(".ckptsync-")]
    assert len(entries) == 1 and staging_dirs(directory) == [], entries
    store = LocalStore(directory)
    (ckpt,) = store.list()
    store.verify(ckpt)
    assert ckpt.step == 3 and ckpt.manifest.meta["world_size"] == WORLD
    assert {f.path for f in ckpt.manifest.files} == {"model.pt", "optimizer.pt", "rng.pt"}
    assert reports[1]["file_ops_calls"] == 0, "rank 1 wrote files"
    assert reports[0]["file_ops_calls"] > 0
    # The model was saved unwrapped: keys without DDP's "module." prefix.
    model_state = torch.load(ckpt.path / "model.pt", weights_only=True)
    assert model_state and not any(k.startswith("module.") for k in model_state)


@pytest.mark.core
def test_every_rank_returns_after_the_commit(ddp_run: tuple[Path, list[dict[str, Any]]]) -> None:
    _, reports = ddp_run
    names = [r["visible_after_wait"] for r in reports]
    assert len(names[0]) == 1 and names[0] == names[1]


@pytest.mark.core
def test_restore_gives_equal_params_and_each_rank_its_own_rng(
    ddp_run: tuple[Path, list[dict[str, Any]]],
) -> None:
    _, reports = ddp_run
    for r in reports:
        assert r["restored_step"] == 3
        assert r["params_equal_saved"], f"rank {r['rank']}: params differ from the saved ones"
        assert r["adam_steps"] and all(s == 3.0 for s in r["adam_steps"])
        assert r["draws_after_restore"] == r["draws_after_save"], (
            f"rank {r['rank']}: RNG streams not restored to this rank's state"
        )
    assert reports[0]["params"] == reports[1]["params"]
    # The ranks had different streams, so restoring rank 0's on rank 1 would have been wrong.
    assert reports[0]["draws_after_save"] != reports[1]["draws_after_save"]


def test_a_failed_save_on_rank0_raises_on_every_rank(tmp_path: Path) -> None:
    directory, reports = _run_ranks(tmp_path, "rank0-disk-full")
    for r in reports:
        assert "save_error" in r, f"rank {r['rank']} did not learn that the save failed"
    assert "No space left" in reports[0]["save_error"]
    assert "rank 0" in reports[1]["save_error"]
    assert LocalStore(directory).list() == [] and staging_dirs(directory) == []


# --------------------------------------------------------------------------- rank 0 fails
@pytest.mark.parametrize(("scenario", "rank0_error", "words"), [
    ("unsafe", "UnsafeStateError", "sampler"),
    ("oom", "OutOfMemoryError", "out of memory"),
])
def test_a_snapshot_failing_on_rank0_raises_on_every_rank_and_training_goes_on(
    tmp_path: Path, scenario: str, rank0_error: str, words: str,
) -> None:
    directory, reports = _run_ranks(tmp_path, "", scenario)
    r0, r1 = reports
    assert r0["save_error"] and r0["save_error"]["type"] == rank0_error, r0
    assert r1["save_error"], "rank 1 did not learn that rank 0's save failed"
    # The same error, or a CkptSyncError naming rank 0's.
    assert r1["save_error"]["ckptsync"] or r1["save_error"]["type"] == rank0_error, r1
    assert "rank 0" in r1["save_error"]["message"] and words in r1["save_error"]["message"]
    # Caught on every rank, training goes on: the next save commits, collectives still work.
    assert r0["went_on_saved"] and r0["went_on_saved"] == r1["went_on_saved"]
    assert r0["all_reduce"] == r1["all_reduce"] == WORLD
    assert [c.name for c in LocalStore(directory).list()] == [r0["went_on_saved"]]


def test_a_restore_failing_on_rank0_raises_on_every_rank(tmp_path: Path) -> None:
    _, reports = _run_ranks(tmp_path, "", "restore")
    r0, r1 = reports
    assert r0["restore_error"] and r0["restore_error"]["type"] == "CorruptCheckpointError", r0
    assert r1["restore_error"], "rank 1 did not learn that rank 0's restore failed"
    assert r1["restore_error"]["type"] == "CorruptCheckpointError", r1
    assert "rank 0" in r1["restore_error"]["message"]
    assert r0["went_on_saved"] and r0["went_on_saved"] == r1["went_on_saved"]
    assert r0["all_reduce"] == r1["all_reduce"] == WORLD


def test_every_ranks_save_handle_returns_after_the_commit(tmp_path: Path) -> None:
    _, reports = _run_ranks(tmp_path, "", "handle")
    r0, r1 = reports
    name = r0["result_name"]
    assert name and r0["visible_after_result"] == [name]
    assert not r1["done_before_wait"], "rank 1's handle was done before rank 0 committed"
    assert r1["result_name"] == name and r1["handle_name"] == name
    assert r1["visible_after_result"] == [name], "rank 1's handle returned before the commit"
    # A failed background commit raises from every rank's handle.
    assert r0["handle_error"] and "No space left" in r0["handle_error"]["message"]
    assert r1["handle_error"] and "rank 0" in r1["handle_error"]["message"]
    assert "No space left" in r1["handle_error"]["message"]
    assert r0["went_on_saved"] and r0["went_on_saved"] == r1["went_on_saved"]
    assert r0["all_reduce"] == r1["all_reduce"] == WORLD


def test_a_remote_error_on_rank0_raises_from_wait_on_every_rank(tmp_path: Path) -> None:
    _, reports = _run_ranks(tmp_path, "", "remote")
    r0, r1 = reports
    assert r0["wait_error"] and r0["wait_error"]["type"] == "RemoteError", r0
    assert r1["wait_error"] and r1["wait_error"]["type"] == "RemoteError", r1
    assert "rank 0" in r1["wait_error"]["message"] and "denied" in r1["wait_error"]["message"]
    assert r0["all_reduce"] == r1["all_reduce"] == WORLD


def test_a_constructor_failing_on_rank0_alone_raises_on_every_rank(tmp_path: Path) -> None:
    _, reports = _run_ranks(tmp_path, "", "init")
    r0, r1 = reports
    assert r0["init_error"] and r0["init_error"]["type"] == "ConfigError", r0
    assert "another Checkpointer" in r0["init_error"]["message"]
    # Rank 1 could construct its own, yet raises the same error type, naming rank 0's.
    assert r1["init_error"] and r1["init_error"]["type"] == "ConfigError", r1
    assert "rank 0" in r1["init_error"]["message"]
    assert "another Checkpointer" in r1["init_error"]["message"]
    assert r0["went_on_saved"] and r0["went_on_saved"] == r1["went_on_saved"]
    assert r0["all_reduce"] == r1["all_reduce"] == WORLD


def test_a_rank_raising_inside_with_does_not_hang_the_others(tmp_path: Path) -> None:
    directory, reports = _run_ranks(tmp_path, "", "exit")
    r0, r1 = reports
    # Each rank left its ``with`` by the training code's error, not by a ckptsync one.
    assert r1["with_error"] and r1["with_error"]["message"] == "rank 1: bad batch", r1
    assert r0["with_error"] and r0["with_error"]["type"] == "BadBatch", r0
    # Rank 1's exit joined no collective: its all-reduce met rank 0's, and the group works.
    assert r0["failed_ranks"] == r1["failed_ranks"] == 1
    assert r0["all_reduce"] == r1["all_reduce"] == WORLD
    # Rank 0 still finished its own background commit when it left its ``with``.
    assert r0["committed"] == [r0["save_name"]]
    assert staging_dirs(directory) == []
    store = LocalStore(directory)
    (ckpt,) = store.list()
    store.verify(ckpt)
