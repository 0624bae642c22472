"""A local or mounted directory (``file://``, ``local://``, a plain path such as a
Colab-mounted Google Drive): :class:`LocalDir`.

Its paths are real paths, so a checkpoint becomes visible the way a local one does: uploads go
to temporary names, are fsynced and renamed into place, the directories are fsynced, and the
manifest is hard-linked into place (:class:`~ckptsync.remote.visibility.DirectoryRename`).
"""

from __future__ import annotations

from typing import ClassVar

from ckptsync.remote.backends.base import Backend, CommitKind

__all__ = ["LocalDir"]


class LocalDir(Backend):
    """A local or mounted directory: real paths, temporary names renamed into place."""

    name: ClassVar[str] = "local"
    commit: ClassVar[CommitKind] = "rename"
    needs_dirs: ClassVar[bool] = True
    upload_via_temp: ClassVar[bool] = True
