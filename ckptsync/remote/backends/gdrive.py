"""Google Drive through gdrive-fsspec (``gdrive://``): :class:`Drive`.

Drive has no create-only write (a checkpoint is committed by check-then-write), keeps two
files of one name side by side (a file is deleted before it is written again), needs its
folders created, and its shared httplib2 connection is not thread-safe (one file at a time).
Its ``storage_options`` are what gdrive-fsspec takes (:meth:`Drive.open_options`).
"""

from __future__ import annotations

from typing import ClassVar

from ckptsync.remote.backends.base import Backend, CommitKind

__all__ = ["Drive"]


class Drive(Backend):
    """Google Drive: check-then-write, one file at a time, no overwrite in place."""

    name: ClassVar[str] = "gdrive"
    extra: ClassVar[str | None] = "gdrive"
    commit: ClassVar[CommitKind] = "check-then-write"
    overwrites: ClassVar[bool] = False
    needs_dirs: ClassVar[bool] = True
    upload_via_temp: ClassVar[bool] = False
    max_workers: ClassVar[int] = 1
    upload_process: ClassVar[bool] = True
    filesystem: ClassVar[str | None] = "ckptsync.remote.gdrive:DriveFileSystem"
