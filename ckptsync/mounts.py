"""Which mount holds a remote directory, and what "committed" means there.

A remote that is a local path on a FUSE mount (Colab's Google Drive mount at
``/content/drive``, rclone, gcsfuse, ...) is only as durable as that mount: the files are
"committed" once they are handed to the mount, and the program behind it uploads them later,
in the background (DESIGN.md, "Where remote is not yet durable"). :func:`mounted_remote` says
whether a path is on such a mount, read from the kernel's mount table
(``/proc/self/mountinfo``): Colab's Drive is a FUSE mount of type ``fuse.drive``, or any FUSE
mount at or under :data:`COLAB_DRIVE`. :class:`MountedRemote` holds the words ckptsync shows
for it (``status``, the log, ``ckptsync wait``), and :func:`flush_tree` /
:func:`sync_dir` push what the kernel holds to the mount (``fsync`` of each file and
directory, then ``os.sync()``): what can be done from here. Nothing here can make Colab upload
to Google Drive: ``drive.flush_and_unmount()`` does that.

The mount table read is, in order: the ``mountinfo`` argument, the file named by
``CKPTSYNC_MOUNTINFO`` (a documented setting: a container that hides the host's mounts, or a
test that points it at a fake table), ``/proc/self/mountinfo``.

Example::

    m = mounted_remote("/content/drive/MyDrive/ckptsync/run-17")
    if m is not None:
        print(m.note)        # 'committed' means handed to the Google Drive mount ...
        flush_tree(m.path)   # at the end of a session
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "COLAB_DRIVE",
    "MOUNTINFO_ENV",
    "Mount",
    "MountedRemote",
    "flush_tree",
    "mount_of",
    "mounted_remote",
    "read_mounts",
    "sync_dir",
]

#: Where Colab mounts Google Drive (``drive.mount("/content/drive")``).
COLAB_DRIVE = "/content/drive"
#: The setting naming the mount table to read instead of ``/proc/self/mountinfo``.
MOUNTINFO_ENV = "CKPTSYNC_MOUNTINFO"
DEFAULT_MOUNTINFO = "/proc/self/mountinfo"
#: The file system type of Colab's Drive mount (DriveFS over FUSE; ``drive.flush_and_unmount``
#: looks for it in ``mount``'s output).
DRIVE_FSTYPE = "fuse.drive"
#: Drive's own folder under the mount point (``My Drive`` on older runtimes).
_MY_DRIVE = ("MyDrive", "My Drive")
FLUSH_AND_UNMOUNT = "from google.colab import drive; drive.flush_and_unmount()"


@dataclass(frozen=True)
class Mount:
    """One line of the mount table: where a file system is mounted, its type and source."""

    mount_point: str
    fstype: str
    source: str


@dataclass(frozen=True)
class MountedRemote:
    """A remote directory on a FUSE mount: committed there means handed to the mount.

    Attributes:
        path: the remote root (a local path).
        mount_point: where the mount is (``/content/drive`` on Colab).
        fstype: its file system type (``fuse.drive`` for Colab's Drive).
        drive: the mount is Colab's Google Drive.
    """

    path: str
    mount_point: str
    fstype: str
    drive: bool

    @property
    def what(self) -> str:
        """The mount in words."""
        return ("the Google Drive mount" if self.drive
                else f"the FUSE mount ({self.fstype})") + f" at {self.mount_point}"

    @property
    def note(self) -> str:
        """What "committed" means for this remote (``status``, the log, ``wait``)."""
        later = "Colab's Drive client uploads it to Google Drive" if self.drive \
            else "the program behind the mount uploads it"
        return (f"'committed' means handed to {self.what}: {later} later, in the "
                "background, and ckptsync cannot see when; if the machine goes away before "
                "that, the newest checkpoints may be lost")

    @property
    def advice(self) -> str:
        """What to use instead for a run nobody watches."""
        if not self.drive:
            return "for unattended runs use the storage's own API (s3://, gs://, gdrive://)"
        return (f"for unattended runs use the Drive API instead: {self.gdrive_url()} "
                "(committed there means Google Drive has every file), or a bucket")

    @property
    def guidance(self) -> str:
        """What to do before the session ends (printed by ``ckptsync wait``)."""
        if not self.drive:
            return (f"ckptsync flushed what it wrote to {self.what}; before the machine goes "
                    "away, unmount it (or wait for its uploads) so that they finish")
        return (f"ckptsync flushed what it wrote to {self.what}; before the runtime ends, "
                f"run `{FLUSH_AND_UNMOUNT}`: it returns once Colab has uploaded everything "
                "to Google Drive")

    def gdrive_url(self) -> str:
        """The ``gdrive://`` URL of the same folder, where the path is under My Drive."""
        rel = Path(self.path).relative_to(self.mount_point).parts if \
            _under(self.path, self.mount_point) else ()
        if rel and rel[0] in _MY_DRIVE:
            return "gdrive://" + "/".join(rel[1:])
        return "gdrive://<folder under My Drive>"

    def as_dict(self) -> dict[str, Any]:
        """The fields, plus the note, for a status file or ``--json``."""
        return {**asdict(self), "note": self.note, "advice": self.advice}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MountedRemote | None:
        """The inverse of :meth:`as_dict` (None for anything else, e.g. an older file)."""
        try:
            return cls(str(d["path"]), str(d["mount_point"]), str(d["fstype"]),
                       bool(d["drive"]))
        except (KeyError, TypeError):
            return None


def _unescape(field: str) -> str:
    """A mountinfo field: spaces, tabs, newlines and backslashes are octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def read_mounts(mountinfo: str | os.PathLike[str] | None = None) -> list[Mount]:
    """The mount table, in mount order (an unreadable table is empty: nothing is mounted
    that ckptsync can tell about).

    Each line of ``/proc/self/mountinfo`` is ``ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS
    [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS`` (proc(5)).
    """
    path = mountinfo or os.environ.get(MOUNTINFO_ENV) or DEFAULT_MOUNTINFO
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return []
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields[5:]:
            continue
        sep = fields.index("-", 5)
        if len(fields) < sep + 3:
            continue
        mounts.append(Mount(_unescape(fields[4]), fields[sep + 1], _unescape(fields[sep + 2])))
    return mounts


def _under(path: str, mount_point: str) -> bool:
    return mount_point == "/" or path == mount_point or path.startswith(mount_point.rstrip("/")
                                                                        + "/")


def mount_of(path: str | os.PathLike[str],
             mountinfo: str | os.PathLike[str] | None = None) -> Mount | None:
    """The mount holding ``path`` (its real path; it need not exist yet): the one with the
    longest mount point above it, the last mounted where two share one."""
    real = os.path.realpath(os.fspath(path))
    best: Mount | None = None
    for m in read_mounts(mountinfo):
        if _under(real, m.mount_point) and (
                best is None or len(m.mount_point) >= len(best.mount_point)):
            best = m
    return best


def mounted_remote(path: str | os.PathLike[str],
                   mountinfo: str | os.PathLike[str] | None = None) -> MountedRemote | None:
    """``path`` as a remote on a FUSE mount (Colab's Drive above all), or None where it is on
    an ordinary file system (a local disk, tmpfs, NFS: an ``fsync`` there is the commit)."""
    m = mount_of(path, mountinfo)
    if m is None or not m.fstype.startswith("fuse") or m.fstype == "fuseblk":
        return None  # fuseblk: a disk (ntfs-3g, exfat), local like any other
    drive = m.fstype == DRIVE_FSTYPE or _under(m.mount_point, COLAB_DRIVE)
    return MountedRemote(os.path.realpath(os.fspath(path)), m.mount_point, m.fstype, drive)


def sync_dir(path: str | os.PathLike[str]) -> None:
    """``fsync`` the directory ``path`` (the names just written in it), then ``os.sync()``
    (everything the kernel still holds, for every file system, this mount's included)."""
    _fsync(Path(path), directory=True)
    os.sync()


def flush_tree(root: str | os.PathLike[str]) -> int:
    """``fsync`` every file and directory under ``root`` (what ckptsync wrote there), then
    ``os.sync()``; returns how many were synced. One that vanishes meanwhile (retention) is
    skipped; any other error is raised.

    Raises:
        OSError: a file or directory could not be synced.
    """
    count = 0
    base = Path(root)
    if not base.is_dir():
        os.sync()
        return 0
    for dirpath, _dirnames, filenames in os.walk(base, topdown=False):
        for name in filenames:
            count += _fsync(Path(dirpath) / name, directory=False)
        count += _fsync(Path(dirpath), directory=True)
    os.sync()
    return count


def _fsync(path: Path, *, directory: bool) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except FileNotFoundError:
        return 0
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return 1
