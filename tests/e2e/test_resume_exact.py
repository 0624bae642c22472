"""Exact resume: a run killed with SIGKILL and resumed is bit for bit the uninterrupted run.

The trainer is ``examples/train_tiny_lm.py`` (a tiny GPT with dropout, AdamW, warmup+cosine,
a random batch sampler with its own generator), run as a subprocess exactly as a user runs it.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pytest
import torch

from ckptsync import Checkpointer
from ckptsync.errors import CorruptCheckpointError
from ckptsync.local import FileOps, LocalStore
from ckptsync.manifest import Manifest, make_name
from tests.support.formats import put_tree, rewrite_as_v1
from tests.support.helpers import (
    assert_state_equal,
    committed_steps,
    file_bytes,
    last_logged_step,
    make_training_state,
    read_losses,
    run_example,
    sigkill,
    staging_dirs,
    start_example,
    state_trees,
    train_steps,
    wait_until,
)

pytestmark = pytest.mark.core

STEPS = 90


def _args(ckpt: Path, log: Path, weights: Path, save_every: int, *extra: str) -> list[str]:
    return ["--ckpt-dir", str(ckpt), "--steps", str(STEPS), "--save-every", str(save_every),
            "--log-file", str(log), "--final-weights", str(weights), "--seed", "3", *extra]


@pytest.fixture(scope="module")
def reference(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[dict[int, str], dict[str, torch.Tensor]]:
    """The uninterrupted run: every step's loss and the final weights."""
    d = tmp_path_factory.mktemp("uninterrupted")
    run_example(*_args(d / "ckpt", d / "log.jsonl", d / "final.pt", 10))
    losses = read_losses(d / "log.jsonl")
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses, torch.load(d / "final.pt", weights_only=True)


def _assert_resumed_exactly(reference: tuple[dict[int, str], dict[str, torch.Tensor]],
                            resumed_log: Path, weights: Path, resumed_from: int) -> None:
    ref_losses, ref_weights = reference
    losses = read_losses(resumed_log)
    # The resumed run starts right after the checkpoint and runs to the end.
    assert sorted(losses) == list(range(resumed_from + 1, STEPS + 1))
    mismatched = [s for s in losses if losses[s] != ref_losses[s]]
    assert not mismatched, (
        f"losses differ from the uninterrupted run at steps {mismatched[:5]}: "
        f"{[(losses[s], ref_losses[s]) for s in mismatched[:3]]}"
    )
    final = torch.load(weights, weights_only=True)
    assert list(final) == list(ref_weights)
    for k, t in ref_weights.items():
        assert torch.equal(final[k], t), f"final weight {k} differs from the uninterrupted run"


def test_sigkill_mid_training_then_resume_is_bit_exact(
    tmp_path: Path, reference: tuple[dict[int, str], dict[str, torch.Tensor]]
) -> None:
    ckpt, log = tmp_path / "ckpt", tmp_path / "log1.jsonl"
    proc = start_example(*_args(ckpt, log, tmp_path / "unused.pt", 10,
                                "--sleep-per-step", "0.02"))
    wait_until(lambda: last_logged_step(log) >= 47, proc, "step 47")
    sigkill(proc)
    killed_at = last_logged_step(log)
    assert killed_at < STEPS, "the trainer finished before it was killed"
    # The losses it logged before dying match too (same run so far).
    ref_losses = reference[0]
    before = read_losses(log)
    assert all(before[s] == ref_losses[s] for s in before)

    steps = committed_steps(ckpt)
    assert steps and max(steps) <= killed_at
    resumed_from = max(steps)

    log2, weights = tmp_path / "log2.jsonl", tmp_path / "final.pt"
    out = run_example(*_args(ckpt, log2, weights, 10, "--resume"))
    assert f"(step {resumed_from})" in out.stdout
    _assert_resumed_exactly(reference, log2, weights, resumed_from)


def test_fresh_vm_resume_from_the_remote_is_bit_exact(
    tmp_path: Path, reference: tuple[dict[int, str], dict[str, torch.Tensor]],
    s3_remote: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The trainer saves with ``Checkpointer(remote=...)`` (``--remote``) and is killed; its
    machine is gone (local directory deleted); a new process on an empty directory resumes
    from the newest valid remote checkpoint and finishes exactly as the uninterrupted run."""
    import shutil

    from ckptsync.remote import RemoteStore
    from tests.support.servers import ACCESS_KEY, REGION, SECRET_KEY

    # The trainer gets no storage options: credentials and endpoint come from the AWS chain.
    for k, v in {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                 "AWS_DEFAULT_REGION": REGION,
                 "AWS_ENDPOINT_URL_S3": s3_remote.extra["endpoint"]}.items():
        monkeypatch.setenv(k, v)
    store = RemoteStore(s3_remote.url, s3_remote.storage_options)
    ckpt, log = tmp_path / "ckpt", tmp_path / "log1.jsonl"
    proc = start_example(*_args(ckpt, log, tmp_path / "unused.pt", 10, "--remote", s3_remote.url,
                                "--sleep-per-step", "0.02"))
    wait_until(lambda: last_logged_step(log) >= 47 and store.newest_valid() is not None, proc,
               "step 47 and a remote commit", poll_s=0.2)
    sigkill(proc)
    shutil.rmtree(ckpt)  # the machine is gone; only the remote survives
    newest = store.newest_valid()
    assert newest is not None and newest.step is not None
    assert newest.step <= last_logged_step(log) < STEPS

    fresh, log2, weights = tmp_path / "fresh", tmp_path / "log2.jsonl", tmp_path / "final.pt"
    out = run_example(*_args(fresh, log2, weights, 10, "--remote", s3_remote.url, "--resume"))
    assert f"resumed from {newest.name} (step {newest.step})" in out.stdout
    _assert_resumed_exactly(reference, log2, weights, newest.step)


@pytest.mark.full
def test_sigkill_during_a_save_resumes_from_previous_checkpoint_exactly(
    tmp_path: Path, reference: tuple[dict[int, str], dict[str, torch.Tensor]]
) -> None:
    ckpt, log = tmp_path / "ckpt", tmp_path / "log1.jsonl"
    # A slow disk for the step-60 save (each of its writes sleeps) keeps it in flight.
    proc = start_example(*_args(ckpt, log, tmp_path / "unused.pt", 30),
                         slow_write_s=0.05, slow_match="step-000000000060")
    wait_until(lambda: 30 in committed_steps(ckpt) and any(
        "step-000000000060" in p.name for p in staging_dirs(ckpt)), proc,
        "the step-60 save to start", poll_s=0.001)
    sigkill(proc)
    # Killed mid-save: the half-written checkpoint is only a hidden staging directory.
    assert committed_steps(ckpt) == [30]
    assert any("step-000000000060" in p.name for p in staging_dirs(ckpt))

    log2, weights = tmp_path / "log2.jsonl", tmp_path / "final.pt"
    out = run_example(*_args(ckpt, log2, weights, 30, "--resume"))
    assert "(step 30)" in out.stdout
    assert staging_dirs(ckpt) == [], "the leftover staging directory was not cleaned up"
    _assert_resumed_exactly(reference, log2, weights, 30)
    assert committed_steps(ckpt) == [30, 60, 90]


def test_restore_in_process_brings_back_every_object_and_rng_stream(tmp_path: Path) -> None:
    state = make_training_state(seed=1)
    train_steps(state, 4)  # AdamW moments, scheduler position, scaler scale all non-trivial
    expected = state_trees(state)
    random.seed(5)
    np.random.seed(5)
    with Checkpointer(tmp_path) as ck:
        handle = ck.save(4, metrics={"loss": 1.5}, extra={"lr": 0.01}, **state)
        # What the RNG streams produce right after the save is what a resumed run must see.
        next_draws = (random.random(), np.random.rand(3).tolist(), torch.rand(3))
        handle.wait()
        assert handle.done()

    train_steps(state, 3)  # mutate everything, consume RNG
    random.random()
    np.random.rand(7)
    with pytest.raises(AssertionError):
        assert_state_equal(state, expected)

    with Checkpointer(tmp_path) as ck:
        info = ck.restore(**state)
    assert info is not None
    assert info.step == 4 and info.metrics == {"loss": 1.5} and info.extra == {"lr": 0.01}
    assert_state_equal(state, expected)
    assert state["scaler"].get_scale() == expected["scaler"]["scale"]
    assert state["scheduler"].get_last_lr() == [g["lr"] for g in state["optimizer"].param_groups]
    assert random.random() == next_draws[0]
    assert np.random.rand(3).tolist() == next_draws[1]
    assert torch.equal(torch.rand(3), next_draws[2])
    # The tied head and embedding are still one parameter after loading.
    assert state["model"].head.weight is state["model"].emb.weight


@pytest.mark.parametrize("where", ["local", "file", "s3"])
def test_a_v1_checkpoint_written_the_old_way_is_restored(
        where: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A ``ckptsync/1`` checkpoint (sha256 entries, no self-digest) restores,
    from the local directory or pulled from a remote onto a fresh machine."""
    state = make_training_state(seed=2)
    train_steps(state, 2)
    expected = state_trees(state)
    with Checkpointer(tmp_path / "old") as ck:
        ck.save(7, metrics={"loss": 0.5}, **state).wait()
    (old,) = LocalStore(tmp_path / "old").list()
    rewrite_as_v1(old.path)
    train_steps(state, 2)  # move on, so that a restore has something to bring back
    remote = None if where == "local" else request.getfixturevalue(f"{where}_remote")
    if remote is None:
        ck = Checkpointer(tmp_path / "old")
    else:
        put_tree(remote.fs(), old.path, f"{remote.path}/{old.name}")
        ck = Checkpointer(tmp_path / "fresh", remote.url, storage_options=remote.storage_options)
    with ck:
        info = ck.restore(**state)
    assert info is not None and (info.name, info.step) == (old.name, 7)
    assert info.manifest.format == "ckptsync/1" and info.metrics == {"loss": 0.5}
    assert_state_equal(state, expected)
    # A flipped byte in the format 1 checkpoint is still caught by its sha256.
    target = (info.path / "model.pt")
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with Checkpointer(info.path.parent) as ck2, pytest.raises(
            CorruptCheckpointError, match=r"model\.pt.*sha256 digest"):
        ck2.restore(name=old.name, **state)


def test_a_manifest_whose_step_was_edited_is_never_restored(tmp_path: Path,
                                                            s3_remote: Any) -> None:
    """On S3: "step": 101 edited to 301 in the newest manifest fails ``ckptsync
    verify`` (exit 1, saying it was altered), and a fresh machine restores step 100."""
    state = make_training_state(seed=4)
    opts = s3_remote.storage_options
    with Checkpointer(tmp_path / "a", s3_remote.url, storage_options=opts) as ck:
        train_steps(state, 1)
        ck.save(100, **state).wait()
        at_100 = state_trees(state)
        train_steps(state, 1)
        ck.save(101, **state).wait()
    (c101,) = [c for c in LocalStore(tmp_path / "a").list() if c.step == 101]
    fs = s3_remote.fs()
    path = f"{s3_remote.path}/{c101.name}/ckptsync.json"
    edited = fs.cat_file(path).replace(b'"step": 101', b'"step": 301')
    assert b'"step": 301' in edited
    fs.pipe_file(path, edited)
    fs.invalidate_cache()

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path),
           "CKPTSYNC_STORAGE_OPTIONS": json.dumps(opts)}
    p = subprocess.run([sys.executable, "-m", "ckptsync.cli", "verify", s3_remote.url],
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 1, p.stdout + p.stderr
    assert f"CORRUPT  {c101.name}" in p.stdout and "altered" in p.stdout
    with Checkpointer(tmp_path / "fresh", s3_remote.url, storage_options=opts) as ck:
        info = ck.restore(**state)
    assert info is not None and info.step == 100
    assert_state_equal(state, at_100)


def _mapped_files() -> set[str]:
    with open("/proc/self/maps") as f:
        rows = (line.split(None, 5) for line in f)
        return {row[5].strip() for row in rows if len(row) == 6}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_restore_maps_files_and_training_on_never_writes_into_them(tmp_path: Path) -> None:
    """Restore memory-maps a module's file (copy-on-write) and reads the optimizer's: training
    on from it matches training on from the saved state, writes nothing into the files, and
    survives their deletion."""
    state = make_training_state(seed=2)
    train_steps(state, 3)
    with Checkpointer(tmp_path / "ck") as ck:
        ck.save(3, **state).wait()
        ckpt = ck.latest()
    assert ckpt is not None
    saved = file_bytes(tmp_path / "ck" / ckpt.name)
    train_steps(state, 4)  # from the RNG state the save captured, as a resumed run continues
    after_4 = state_trees(state)
    train_steps(state, 2)
    after_6 = state_trees(state)

    fresh = make_training_state(seed=7)
    with Checkpointer(tmp_path / "ck") as ck:
        info = ck.restore(**fresh)
    assert info is not None and info.step == 3
    mapped = _mapped_files()
    assert str(info.path / "model.pt") in mapped, "restore read the module's file"
    # AdamW keeps the loaded moments: mapped, its first step would copy them a page at a time.
    assert str(info.path / "optimizer.pt") not in mapped
    train_steps(fresh, 4)
    assert_state_equal(fresh, after_4)
    assert file_bytes(info.path) == saved, "training wrote into the checkpoint files"
    shutil.rmtree(info.path)
    train_steps(fresh, 2)
    assert_state_equal(fresh, after_6)


def test_a_module_file_in_torchs_legacy_format_is_read_not_mapped(tmp_path: Path) -> None:
    saved = torch.nn.Linear(3, 2)
    store = LocalStore(tmp_path)
    st = store.staging(make_name(1))
    buf = io.BytesIO()
    torch.save(saved.state_dict(), buf, _use_new_zipfile_serialization=False)
    st.write_file("model.pt", buf.getvalue())
    st.commit(Manifest.new(step=1, files=st.entries, name=st.name))
    model = torch.nn.Linear(3, 2)
    with Checkpointer(tmp_path) as ck:
        info = ck.restore(model=model)
    assert info is not None and info.step == 1
    assert torch.equal(model.weight, saved.weight) and torch.equal(model.bias, saved.bias)


class _WatchCrc32Setting(FileOps):
    """Records torch's process-wide CRC32 setting at every write of a background save."""

    def __init__(self) -> None:
        self.seen: set[bool] = set()

    def write(self, f: BinaryIO, data: Any) -> int:
        self.seen.add(torch.serialization.get_crc32_options())
        return super().write(f, data)


def test_saved_files_skip_zip_crc32_without_touching_the_users_torch_save(
        tmp_path: Path) -> None:
    """Checkpoint files carry no zip CRC32 (the manifest's digest covers every byte; torch.load
    never reads the CRC), load with plain torch.load, restore exactly, and the user's own
    torch.save calls keep their CRC32 while a save runs: torch's switch is process-wide."""
    state = make_training_state(seed=3)
    train_steps(state, 2)
    expected = state_trees(state)
    ops = _WatchCrc32Setting()
    with Checkpointer(tmp_path / "ck", file_ops=ops) as ck:
        handle = ck.save(2, **state)
        users = tmp_path / "users.pt"
        torch.save({"w": torch.arange(4096.0)}, users)  # while the save may be running
        handle.wait()
        ckpt = ck.latest()
    assert ckpt is not None
    assert ops.seen == {True}, "the save flipped torch's process-wide CRC32 setting"
    with zipfile.ZipFile(users) as z:
        assert z.testzip() is None and all(i.CRC for i in z.infolist() if i.file_size)
    model_pt = tmp_path / "ck" / ckpt.name / "model.pt"
    with zipfile.ZipFile(model_pt) as z:
        assert {i.CRC for i in z.infolist()} == {0}, "the CRC32 was computed"
    plain = torch.load(model_pt, weights_only=True)
    assert all(torch.equal(plain[k], v) for k, v in expected["model"].items())
    fresh = make_training_state(seed=9)
    with Checkpointer(tmp_path / "ck") as ck:
        assert ck.restore(**fresh) is not None
    assert_state_equal(fresh, expected)


def test_a_torch_whose_private_save_changed_gets_plain_torch_save(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ckptsync builds torch.save's writer itself (to skip the CRC32) only while torch's
    private ``_save`` has the parameters it knows; otherwise it calls torch.save."""
    real = torch.serialization._save

    def changed(obj: Any, zip_file: Any, pickle_module: Any, pickle_protocol: Any,
                _disable_byteorder_record: Any, new_option: Any = None) -> Any:
        return real(obj, zip_file, pickle_module, pickle_protocol, _disable_byteorder_record)

    monkeypatch.setattr(torch.serialization, "_save", changed)
    model = torch.nn.Linear(5, 3)
    with Checkpointer(tmp_path) as ck:
        ck.save(1, model=model).wait()
        ckpt = ck.latest()
    assert ckpt is not None
    with zipfile.ZipFile(tmp_path / ckpt.name / "model.pt") as z:
        assert z.testzip() is None, "not written by torch.save"
    fresh = torch.nn.Linear(5, 3)
    with Checkpointer(tmp_path) as ck:
        assert ck.restore(model=fresh) is not None
    assert torch.equal(fresh.weight, model.weight) and torch.equal(fresh.bias, model.bias)


def test_restore_with_nothing_saved_is_a_fresh_start(tmp_path: Path) -> None:
    state = make_training_state()
    expected = state_trees(state)
    with Checkpointer(tmp_path / "new") as ck:
        assert ck.restore(**state) is None
        assert ck.latest() is None and ck.list() == []
    assert_state_equal(state, expected)
