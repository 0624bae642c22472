"""A remote under Colab's Drive mount: ckptsync tells it from a local disk
(the kernel's mount table, here a fake one named by ``CKPTSYNC_MOUNTINFO``: a FUSE mount of
type ``fuse.drive`` at ``.../content/drive``) and says what "committed" means there, in
``Checkpointer.status()``, ``ckptsync status``, the daemon's status file and the log (once, at
start-up); ``Checkpointer.wait`` and ``ckptsync wait`` flush what was written there and print
the ``drive.flush_and_unmount()`` guidance; ``gdrive://`` is recommended for unattended runs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from ckptsync import Checkpointer
from ckptsync.daemon import read_status, start_watcher
from ckptsync.remote import RemoteStore
from tests.support.cli import run_cli
from tests.support.watchkit import make_checkpoints

pytestmark = pytest.mark.core

HANDED = "'committed' means handed to the Google Drive mount"


@pytest.fixture
def drive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    """Colab after ``drive.mount("/content/drive")``, under ``tmp_path``: (mount point, the
    notebook's remote ``.../MyDrive/ckptsync/run-17``)."""
    mnt = tmp_path.resolve() / "content" / "drive"
    (mnt / "MyDrive").mkdir(parents=True)
    table = tmp_path / "mountinfo"
    table.write_text(
        "27 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        f"61 27 0:52 / {mnt} rw,nosuid,nodev,relatime shared:30 - fuse.drive drive "
        "rw,user_id=0,group_id=0,allow_other\n")
    monkeypatch.setenv("CKPTSYNC_MOUNTINFO", str(table))  # the daemons started here inherit it
    return mnt, str(mnt / "MyDrive" / "ckptsync" / "run-17")


def _entries(root: str) -> int:
    """Files and directories under ``root``, itself included."""
    return 1 + sum(1 for _ in Path(root).rglob("*"))


def test_a_checkpointer_says_committed_means_handed_to_the_mount_and_flushes(
        drive: tuple[Path, str], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import torch

    mnt, remote = drive
    caplog.set_level(logging.INFO, logger="ckptsync")
    model = torch.nn.Linear(4, 2)
    with Checkpointer(tmp_path / "ckpts", remote=remote) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, model=model)
        assert ckpt.wait(timeout=60)
        st = ckpt.status()
    assert st.remote_mount == f"the Google Drive mount at {mnt}"
    assert f"committed=handed to the Google Drive mount at {mnt}" in repr(st)
    assert RemoteStore(remote).list()[-1].step == 3  # the newest is on the mount

    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    said = [m for m in logged if HANDED in m]
    assert len(said) == 1, logged  # once at start-up, not with every save
    assert "gdrive://ckptsync/run-17" in said[0]  # the API route for unattended runs
    assert any("drive.flush_and_unmount()" in m for m in logged)  # after the wait's flush


def test_the_daemon_status_and_wait_say_so_and_wait_flushes(drive: tuple[Path, str],
                                                             tmp_path: Path) -> None:
    mnt, remote = drive
    local = tmp_path / "ckpts"
    w = start_watcher(local, remote)
    try:
        names = make_checkpoints(local, [1, 2])
        r = run_cli("wait", str(local), "--timeout", "60")
        assert r.returncode == 0, r.stderr
        assert names[-1] in r.stdout and HANDED in r.stdout
        assert "drive.flush_and_unmount()" in r.stdout and "gdrive://ckptsync/run-17" in r.stdout

        doc = json.loads(run_cli("wait", str(local), "--timeout", "60", "--json").stdout)
        assert doc["exit_code"] == 0 and doc["remote_mount"]["drive"] is True
        assert doc["flushed"] == _entries(remote)  # every file and directory there, synced

        status = run_cli("status", str(local))
        assert f"note:      {HANDED} at {mnt}" in status.stdout
        assert "committed remotely (handed to the mount" in status.stdout
        own = read_status(local)
        assert own is not None and own["remote_mount"]["mount_point"] == str(mnt)
        assert [m.name for m in RemoteStore(remote).list()] == names
    finally:
        w.stop()
    log = w.log_path.read_text()
    assert log.count("event=remote_on_mount") == 1, log  # once, at start-up


def test_a_local_disk_remote_says_nothing_of_mounts(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    table = tmp_path / "mountinfo"
    table.write_text("27 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n")
    monkeypatch.setenv("CKPTSYNC_MOUNTINFO", str(table))
    local = tmp_path / "ckpts"
    w = start_watcher(local, str(tmp_path / "remote" / "run"))
    try:
        make_checkpoints(local, [1])
        r = run_cli("wait", str(local), "--timeout", "60")
        assert r.returncode == 0, r.stderr
        assert "handed to" not in r.stdout and "flush_and_unmount" not in r.stdout
        assert "note:" not in run_cli("status", str(local)).stdout
    finally:
        w.stop()
