"""The Hugging Face Trainer integration with the real Trainer (transformers, CPU, tiny MLP).

The trainer runs as a subprocess (tests/support/scripts/hf_train.py): 3 epochs of 5 steps,
a save every 4 steps (checkpoint-4, 8, 12, 15), dropout on so that the RNG state matters.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptsync.daemon import read_status
from ckptsync.local import LocalStore
from ckptsync.ownership import RUN_FILE
from ckptsync.remote import RemoteStore
from tests.support.paths import SCRIPTS, child_env
from tests.support.remotes import Remote
from tests.support.watchkit import wait_for

pytest.importorskip("transformers")

from transformers import TrainerState, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from ckptsync.integrations.transformers import (
    PRESET,
    CkptSyncCallback,
    pull_latest_checkpoint,
)

pytestmark = pytest.mark.full

TRAIN = SCRIPTS / "hf_train.py"
CKPT_FILES = {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
              "trainer_state.json", "training_args.bin"}


def train(out: Path, remote: str, *args: str, env: dict[str, str] | None = None,
          check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, str(TRAIN), str(out), remote, *args],
                          capture_output=True, text=True, timeout=300,
                          env=child_env(CKPTSYNC_CLOSE_TIMEOUT="120", **(env or {})))
    if check:
        assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc


def wait_daemon_gone(out: Path) -> None:
    """The upload daemon of ``out`` (it outlives a SIGKILLed trainer to upload what is
    pending, then exits)."""
    st = read_status(out)
    if st is None:
        return

    def gone() -> bool:
        try:
            os.kill(st["pid"], 0)
        except ProcessLookupError:
            return True
        return False

    wait_for(gone, "the upload daemon to exit", timeout=120)


def visible(d: Path) -> list[str]:
    """What the user sees in ``d`` (the daemon's ``.ckptsync-watch`` aside)."""
    return sorted(n for n in os.listdir(d) if not n.startswith("."))


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    w: dict[str, torch.Tensor] = torch.load(out / "final.pt", weights_only=True)
    return w


def remote_steps(url: str, **opts: Any) -> list[int | None]:
    return [m.step for m in RemoteStore(url, storage_options=opts).list()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One uninterrupted run: its output dir and its (file://) bucket."""
    base = tmp_path_factory.mktemp("hf-reference")
    train(base / "out", f"file://{base}/bucket")
    wait_daemon_gone(base / "out")
    return base / "out", base / "bucket"


def bucket_copy(reference: tuple[Path, Path], tmp_path: Path) -> str:
    shutil.copytree(reference[1], tmp_path / "bucket")
    return f"file://{tmp_path}/bucket"


# --------------------------------------------------------------------------- end to end
def test_sigkill_then_resume_on_an_empty_machine_reaches_the_same_weights(
        reference: tuple[Path, Path], tmp_path: Path) -> None:
    remote = f"file://{tmp_path}/bucket"
    out = tmp_path / "out"
    killed = train(out, remote, "--kill-at", "10", check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    wait_daemon_gone(out)
    shutil.rmtree(out)  # the machine is gone: only the bucket is left

    resumed = train(out, remote, "--pull")
    assert "resumed from step 8" in resumed.stdout, resumed.stdout
    assert "done at step 15" in resumed.stdout
    ref, got = final_weights(reference[0]), final_weights(out)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


@pytest.mark.core
def test_every_save_is_uploaded_whole_and_pulls_back_byte_equal(
        reference: tuple[Path, Path], tmp_path: Path) -> None:
    ref_out, bucket = reference
    # Each save is taken unless a newer one finished before the daemon got to it (the
    # newest is what resumes); the last one always is.
    steps = remote_steps(f"file://{bucket}")
    assert steps[-1] == 15 and set(steps) <= {4, 8, 12, 15}, steps
    out = tmp_path / "fresh"
    assert pull_latest_checkpoint(bucket_copy(reference, tmp_path), out) == 15
    # Only the checkpoint, at the Trainer's own path: get_last_checkpoint finds it.
    assert sorted(set(os.listdir(out)) - {RUN_FILE}) == ["checkpoint-15"]  # and the run's record
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-15")
    assert set(os.listdir(out / "checkpoint-15")) == CKPT_FILES
    for name in CKPT_FILES:
        assert (out / "checkpoint-15" / name).read_bytes() == \
            (ref_out / "checkpoint-15" / name).read_bytes(), name


def test_s3_remote_from_the_environment_keeps_save_total_limit(s3_remote: Remote,
                                                                tmp_path: Path) -> None:
    env = {"CKPTSYNC_REMOTE": s3_remote.url,
           "CKPTSYNC_STORAGE_OPTIONS": json.dumps(s3_remote.storage_options)}
    train(tmp_path / "out", "-", "--save-limit", "2", env=env)
    wait_daemon_gone(tmp_path / "out")
    # The remote keeps as many as the Trainer does locally, the newest among them.
    steps = remote_steps(s3_remote.url, **s3_remote.storage_options)
    assert len(steps) <= 2 and steps[-1] == 15, steps
    assert visible(tmp_path / "out") == ["checkpoint-12", "checkpoint-15", "final.pt"]
    assert pull_latest_checkpoint(s3_remote.url, tmp_path / "fresh",
                                  storage_options=s3_remote.storage_options) == 15


def test_rotation_during_uploads_never_leaves_a_broken_remote_checkpoint(
        tmp_path: Path) -> None:
    # A save every step and save_total_limit=1: each save's rotation deletes the previous
    # checkpoint-N, often while the daemon is still copying it (a wide model: MBs a save).
    remote = f"file://{tmp_path}/bucket"
    out = tmp_path / "out"
    train(out, remote, "--save-steps", "1", "--save-limit", "1", "--keep-last", "100",
          "--width", "60000")
    wait_daemon_gone(out)
    assert visible(out) == ["checkpoint-15", "final.pt"]
    store = RemoteStore(remote)
    manifests = store.list()
    assert manifests and manifests[-1].step == 15  # a deleted one stopped nothing
    for m in manifests:  # every one complete: all its files, digest-verified, its own step
        dest = tmp_path / f"pull-{m.step}"
        ckpt = store.pull(m.name, LocalStore(dest))
        vdir = f"checkpoint-{m.step}"
        assert {f.path for f in m.files} == {f"{vdir}/{n}" for n in CKPT_FILES}, m.name
        state = json.loads(ckpt.file(f"{vdir}/trainer_state.json").read_text())
        assert state["global_step"] == m.step
    log = (out / ".ckptsync-watch" / "daemon.log").read_text()
    discarded = [line for line in log.splitlines() if "event=version_discarded" in line]
    print(f"{len(manifests)} versions committed, {len(discarded)} discarded copies")


# --------------------------------------------------------------------------- pull
def test_pull_from_an_empty_remote_is_a_fresh_start(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert pull_latest_checkpoint(f"file://{tmp_path}/empty", out) is None
    assert not out.exists() or os.listdir(out) == []


def test_pull_never_overwrites_a_newer_local_checkpoint(reference: tuple[Path, Path],
                                                        tmp_path: Path) -> None:
    remote = bucket_copy(reference, tmp_path)
    store = RemoteStore(remote)
    newest = store.list()[-1]
    store.delete(newest.name)  # the remote's newest is now an older one
    out = tmp_path / "out"
    shutil.copytree(reference[0] / "checkpoint-15", out / "checkpoint-15")
    before = {p.name: p.stat().st_mtime_ns for p in (out / "checkpoint-15").iterdir()}
    assert pull_latest_checkpoint(remote, out) == 15
    assert sorted(os.listdir(out)) == ["checkpoint-15"]  # nothing older pulled beside it
    assert before == {p.name: p.stat().st_mtime_ns for p in (out / "checkpoint-15").iterdir()}


def test_pull_sets_a_half_saved_local_checkpoint_aside(reference: tuple[Path, Path],
                                                       tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "checkpoint-16").mkdir(parents=True)  # killed mid-save: no trainer_state.json
    (out / "checkpoint-16" / "model.safetensors").write_bytes(b"half")
    with pytest.warns(RuntimeWarning, match="checkpoint-16"):
        assert pull_latest_checkpoint(bucket_copy(reference, tmp_path), out) == 15
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-15")
    assert (out / "incomplete-checkpoint-16" / "model.safetensors").read_bytes() == b"half"


def test_pull_skips_a_corrupt_newest_checkpoint(reference: tuple[Path, Path],
                                                tmp_path: Path) -> None:
    remote = bucket_copy(reference, tmp_path)
    *_, older, newest = RemoteStore(remote).list()  # saves may be coalesced: not always 12
    victim = tmp_path / "bucket" / newest.name / "checkpoint-15" / "optimizer.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the digest tells
    victim.write_bytes(bytes(data))
    out = tmp_path / "out"
    assert pull_latest_checkpoint(remote, out) == older.step
    assert sorted(set(os.listdir(out)) - {RUN_FILE}) == [f"checkpoint-{older.step}"]


# --------------------------------------------------------------------------- callback
def test_only_the_main_process_uploads(tmp_path: Path) -> None:
    cb = CkptSyncCallback(f"file://{tmp_path}/bucket")
    args = TrainingArguments(str(tmp_path / "out"), report_to="none", use_cpu=True)
    state = TrainerState(is_world_process_zero=False)
    cb.on_train_begin(args, state, None)
    cb.on_save(args, state, None)
    cb.on_train_end(args, state, None)
    assert cb.watcher is None
    assert not (tmp_path / "bucket").exists()


def test_callback_without_a_remote_says_how_to_give_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CKPTSYNC_REMOTE", raising=False)
    with pytest.raises(Exception, match="CKPTSYNC_REMOTE"):
        CkptSyncCallback()


def test_the_preset_names_the_marker_the_trainer_writes_last() -> None:
    from ckptsync.zerocode.presets import preset_rule

    assert preset_rule(PRESET) == "dir:checkpoint-*:trainer_state.json"


@pytest.mark.parametrize("marker", [b"", b'{"global_step": 4, "log_hist'])
def test_a_checkpoint_whose_trainer_state_is_still_being_written_is_not_committed(
        tmp_path: Path, marker: bytes) -> None:
    # Trainer._save_checkpoint opens trainer_state.json, then writes it: the daemon can see
    # the marker while it is empty or half-written. That copy must not become a checkpoint
    # (it would be step None with a trainer_state.json the Trainer cannot resume from).
    from ckptsync.daemon.versions import snapshot_version
    from ckptsync.zerocode.presets import preset_rule
    from ckptsync.zerocode.rules import WatchRule

    vdir = tmp_path / "out" / "checkpoint-4"
    vdir.mkdir(parents=True)
    (vdir / "training_args.bin").write_bytes(b"args")
    (vdir / "trainer_state.json").write_bytes(marker)
    rels = ["checkpoint-4/trainer_state.json", "checkpoint-4/training_args.bin"]
    rule = WatchRule.parse(preset_rule(PRESET))
    snap = snapshot_version(LocalStore(tmp_path / "spool"), tmp_path / "out", rule, rels)
    assert snap.ckpt is None and snap.skipped == "incomplete", snap
    assert LocalStore(tmp_path / "spool").list() == []
    # Once written, the same directory is taken, with its step.
    (vdir / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    snap = snapshot_version(LocalStore(tmp_path / "spool"), tmp_path / "out", rule, rels)
    assert snap.ckpt is not None and snap.ckpt.step == 4


def test_a_daemon_killed_mid_run_is_restarted_and_nothing_is_lost(tmp_path: Path) -> None:
    remote, out = f"file://{tmp_path}/bucket", tmp_path / "out"
    run = train(out, remote, "--kill-daemon-at", "8")
    assert "starting a new one" in run.stderr  # said loudly, training went on
    wait_daemon_gone(out)
    assert remote_steps(remote)[-1] == 15


def test_train_end_names_the_checkpoint_not_remote_and_the_command_that_uploads_it(
        tmp_path: Path) -> None:
    remote, out = f"file://{tmp_path}/bucket", tmp_path / "out"
    # The daemon dies right after the last save: no later save restarts it.
    run = train(out, remote, "--kill-daemon-at", "15", check=False)
    assert run.returncode != 0
    assert f"checkpoint-15 of {out} is not in {remote}" in run.stderr, run.stderr[-3000:]
    assert 15 not in remote_steps(remote)
    fix = run.stderr.split("to upload it, run: ")[1].splitlines()[0]
    cmd = fix.replace("ckptsync ", f"{sys.executable} -m ckptsync ", 1)
    subprocess.run(cmd, shell=True, check=True, timeout=120, env=child_env())
    assert remote_steps(remote)[-1] == 15
