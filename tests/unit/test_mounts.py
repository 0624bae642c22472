"""Which mount holds a remote directory (ckptsync/mounts.py): Colab's Drive mount is told
from a local disk by the kernel's mount table, here a fake one (``CKPTSYNC_MOUNTINFO`` or the
``mountinfo`` argument), and what ckptsync says about it."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptsync.mounts import MOUNTINFO_ENV, MountedRemote, flush_tree, mount_of, mounted_remote

pytestmark = pytest.mark.core

BASE = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 27 0:40 / /tmp rw,nosuid,nodev shared:5 - tmpfs tmpfs rw
"""


def table(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "mountinfo"
    path.write_text(BASE + "".join(line + "\n" for line in lines))
    return path


def colab(mount_point: Path, fstype: str = "fuse.drive") -> str:
    """The line Colab's ``drive.mount`` adds (DriveFS over FUSE)."""
    escaped = str(mount_point).replace(" ", "\\040")
    return (f"61 27 0:52 / {escaped} rw,nosuid,nodev,relatime shared:30 - {fstype} drive "
            "rw,user_id=0,group_id=0,allow_other")


def test_a_path_under_colabs_drive_mount_is_handed_to_the_mount(tmp_path: Path) -> None:
    mnt = tmp_path / "content" / "drive"
    info = table(tmp_path, colab(mnt))
    m = mounted_remote(mnt / "MyDrive" / "ckptsync" / "run-17", info)  # need not exist yet
    assert m is not None and m.drive and m.mount_point == str(mnt) and m.fstype == "fuse.drive"
    assert "'committed' means handed to the Google Drive mount at " + str(mnt) in m.note
    assert "gdrive://ckptsync/run-17" in m.advice  # the same folder through the API
    assert "drive.flush_and_unmount()" in m.guidance
    assert MountedRemote.from_dict(m.as_dict()) == m
    # A local disk, tmpfs: an fsync there is the commit.
    assert mounted_remote(tmp_path / "ckpts", info) is None
    assert mounted_remote("/var/lib/x", info) is None


def test_the_setting_names_the_table_and_an_unreadable_one_means_no_mount(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mnt = tmp_path / "content" / "drive"
    monkeypatch.setenv(MOUNTINFO_ENV, str(table(tmp_path, colab(mnt))))
    assert mounted_remote(mnt / "MyDrive" / "x") is not None
    monkeypatch.setenv(MOUNTINFO_ENV, str(tmp_path / "missing"))
    assert mounted_remote(mnt / "MyDrive" / "x") is None


def test_other_fuse_mounts_spaces_and_the_innermost_mount(tmp_path: Path) -> None:
    old = tmp_path / "gdrive old"  # "My Drive" on older runtimes; a space in the mount point
    rclone = tmp_path / "mnt" / "bucket"
    disk = tmp_path / "mnt" / "usb"
    inner = rclone / "local"
    info = table(tmp_path, colab(old),
                 f"70 27 0:60 / {rclone} rw - fuse.rclone remote: rw",
                 f"71 27 8:17 / {disk} rw - fuseblk /dev/sdb1 rw",
                 f"72 70 8:2 / {inner} rw - ext4 /dev/sda2 rw")
    m = mounted_remote(old / "My Drive" / "runs" / "a", info)
    assert m is not None and m.drive and m.gdrive_url() == "gdrive://runs/a"
    r = mounted_remote(rclone / "run", info)
    assert r is not None and not r.drive and "fuse.rclone" in r.note and "gdrive" not in r.note
    assert mounted_remote(disk / "run", info) is None  # fuseblk: a disk
    assert mounted_remote(inner / "run", info) is None  # the innermost mount decides
    m2 = mount_of(inner / "run", info)
    assert m2 is not None and m2.fstype == "ext4"


def test_colabs_mount_point_is_drive_whatever_the_fuse_type(tmp_path: Path) -> None:
    # Detection by the mount point too, should DriveFS ever report another FUSE type name.
    from ckptsync import mounts

    line = f"61 27 0:52 / {mounts.COLAB_DRIVE} rw - fuse drive rw"
    m = mounted_remote(f"{mounts.COLAB_DRIVE}/MyDrive/ckptsync/r", table(tmp_path, line))
    assert m is not None and m.drive


def test_flush_tree_syncs_every_file_and_directory(tmp_path: Path) -> None:
    root = tmp_path / "run"
    (root / "a" / "b").mkdir(parents=True)
    for p in (root / "LATEST", root / "a" / "x", root / "a" / "b" / "y"):
        p.write_bytes(b"data")
    assert flush_tree(root) == 6  # 3 files, 3 directories
    assert flush_tree(tmp_path / "missing") == 0
