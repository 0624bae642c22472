"""ckptsync.integrations.accelerate with real Accelerate on CPU: a run SIGKILLed mid-run, its
local directory deleted, resumes from the remote to the same step and ends with the same
weights as an uninterrupted run; Accelerate's checkpoint numbering continues after a resume;
remote retention follows ``ProjectConfiguration(total_limit=...)``."""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from ckptsync.errors import ConfigError
from ckptsync.remote import RemoteStore
from tests.support.remotes import Remote
from tests.support.watchkit import PY, SCRIPTS, child_env, pid_alive, run_cli, wait_for

pytestmark = [pytest.mark.usefixtures("no_process_leak"), pytest.mark.full]

TRAINER = SCRIPTS / "accel_trainer.py"


def _env(remote: Remote) -> dict[str, str]:
    import json

    return child_env(TEST_STORAGE_OPTIONS=json.dumps(remote.storage_options or {}))


def _run(project: Path, remote: Remote, *args: str) -> str:
    done = subprocess.run([PY, str(TRAINER), "--project", str(project), "--remote", remote.url,
                           *args], env=_env(remote), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _weights(project: Path) -> dict[str, torch.Tensor]:
    return torch.load(project / "final.pt", weights_only=True)


def test_sigkilled_run_resumes_from_a_file_remote_to_the_same_weights(
        tmp_path: Path, file_remote: Remote) -> None:
    _kill_and_resume(tmp_path, file_remote)


def test_sigkilled_run_resumes_from_s3_to_the_same_weights(
        tmp_path: Path, s3_remote: Remote) -> None:
    _kill_and_resume(tmp_path, s3_remote)


def _kill_and_resume(tmp_path: Path, remote: Remote) -> None:
    straight = tmp_path / "straight"
    _run(straight, Remote(f"file://{tmp_path}/straight-remote", {}, "file", None),
         "--steps", "12")

    project = tmp_path / "run"
    trainer = subprocess.Popen([PY, str(TRAINER), "--project", str(project), "--remote",
                                remote.url, "--steps", "12", "--stall-after", "8"],
                               env=_env(remote), stdout=subprocess.PIPE, text=True)
    assert trainer.stdout is not None
    watcher = 0
    for line in trainer.stdout:
        if line.startswith("watcher"):
            watcher = int(line.split()[1])
        if line.startswith("saved 8"):
            break
    else:
        raise AssertionError(f"the trainer exited ({trainer.wait()}) before saving step 8")
    assert watcher, "no daemon was started on the main process"
    trainer.send_signal(signal.SIGKILL)  # mid-run: steps 9-12 never happen
    trainer.wait()
    trainer.stdout.close()
    # The daemon sees its parent die, uploads what is pending, and exits.
    wait_for(lambda: not pid_alive(watcher), "the daemon to drain and exit", timeout=120)
    shutil.rmtree(project)  # a fresh machine: only the bucket is left

    out = _run(project, remote, "--steps", "12")
    assert "resumed from step 8" in out, out
    assert "saved 10 checkpoint_4" in out, out  # numbering continues after checkpoint_3
    want, got = _weights(straight), _weights(project)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    newest = RemoteStore(remote.url, remote.storage_options).list()[-1]
    assert newest.step == 12


@pytest.mark.core
def test_resume_continues_numbering_and_remote_keeps_total_limit(
        tmp_path: Path, file_remote: Remote) -> None:
    _run(tmp_path / "a", file_remote, "--steps", "6", "--total-limit", "2")
    out = _run(tmp_path / "b", file_remote, "--steps", "10", "--total-limit", "2")
    assert "resumed from step 6" in out
    # checkpoint_2 was the last one of the first machine; the resumed run goes on from it.
    assert "saved 8 checkpoint_3" in out and "saved 10 checkpoint_4" in out, out
    listed = RemoteStore(file_remote.url).list()
    assert [m.step for m in listed][-1] == 10
    assert len(listed) <= 2


@pytest.mark.core
def test_without_automatic_checkpoint_naming_is_a_config_error(tmp_path: Path) -> None:
    from accelerate import Accelerator

    from ckptsync.integrations.accelerate import CkptSync

    with pytest.raises(ConfigError, match="automatic_checkpoint_naming=True"):
        CkptSync(Accelerator(cpu=True), f"file://{tmp_path}/remote")


def test_a_version_cut_between_marker_and_registered_objects_is_skipped_on_resume(
        tmp_path: Path, file_remote: Remote) -> None:
    # Machine 1 saved step 2 (checkpoint_0) and uploaded it.
    project = tmp_path / "run"
    _run(project, file_remote, "--steps", "2")
    # It then saved step 4 (checkpoint_1) and was killed after random_states_0.pkl (the
    # preset's marker) and custom_checkpoint_0.pkl, before custom_checkpoint_1.pkl; the
    # daemon took the quiet directory as it was.
    # (Made in a copy with another remote, then moved in: a daemon's spool is per directory.)
    other = tmp_path / "other"
    shutil.copytree(project / "checkpoints", other / "checkpoints")
    _run(other, Remote(f"file://{tmp_path}/scratch", {}, "file", None), "--steps", "4")
    cut = project / "checkpoints" / "checkpoint_1"
    shutil.copytree(other / "checkpoints" / "checkpoint_1", cut)
    (cut / "custom_checkpoint_1.pkl").unlink()
    once = run_cli("watch", str(project), file_remote.url, "--preset", "accelerate", "--once",
                   "--settle", "0.2")
    assert once.returncode == 0, once.stderr
    newest = RemoteStore(file_remote.url).list()[-1]
    assert newest.step == 4
    assert "checkpoint_1/custom_checkpoint_1.pkl" not in [f.path.split("/", 1)[1]
                                                          for f in newest.files]

    fresh = tmp_path / "fresh"
    out = _run(fresh, file_remote, "--steps", "6")
    assert "resumed from step 2" in out, out  # the whole one, not the cut one
    assert "saved 4 checkpoint_1" in out and "saved 6 checkpoint_2" in out, out


def _torchrun(project: Path, remote: Remote, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", str(TRAINER), "--project", str(project),
                           "--remote", remote.url, *args], env=_env(remote),
                          capture_output=True, text=True, timeout=300)


def test_two_processes_main_uploads_every_process_resumes(
        tmp_path: Path, file_remote: Remote) -> None:
    first = _torchrun(tmp_path / "a", file_remote, "--steps", "4")
    assert first.returncode == 0, first.stderr[-3000:]
    newest = RemoteStore(file_remote.url).list()[-1]
    assert newest.step == 4
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {
        f.path.rsplit("/", 1)[-1] for f in newest.files}
    second = _torchrun(tmp_path / "b", file_remote, "--steps", "6")
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("resumed from step 4") == 2, second.stdout  # both processes


def test_a_failed_pull_fails_every_process_instead_of_hanging(
        tmp_path: Path, file_remote: Remote) -> None:
    first = _torchrun(tmp_path / "a", file_remote, "--steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    fresh = tmp_path / "b"
    fresh.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (fresh / "checkpoints").symlink_to(tmp_path / "elsewhere")  # a pull refuses to write there
    failed = _torchrun(fresh, file_remote, "--steps", "4")  # times out if a process hangs
    assert failed.returncode != 0
    assert "symlink" in failed.stderr and "could not pull" in failed.stderr, \
        failed.stderr[-3000:]
    assert not list((tmp_path / "elsewhere").iterdir())
