"""ckptsync: crash-safe PyTorch checkpoints that resume exactly, synced atomically to the cloud.

``import ckptsync`` never imports torch: the torch-dependent client (:class:`Checkpointer`) is
loaded on first use, so the daemon and the remote tools run in a torch-free install.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ckptsync.daemon import WatcherHandle, start_watcher
from ckptsync.errors import (
    CkptSyncError,
    ConfigError,
    CorruptCheckpointError,
    EncryptionKeyError,
    LocalStorageError,
    ManifestError,
    NoCheckpointError,
    RemoteError,
    UnsafeStateError,
    UnsupportedFormatError,
)
from ckptsync.version import __version__

__all__ = [
    "Checkpointer",
    "CkptSyncError",
    "ConfigError",
    "CorruptCheckpointError",
    "EncryptionKeyError",
    "LocalStorageError",
    "ManifestError",
    "NoCheckpointError",
    "RemoteError",
    "UnsafeStateError",
    "UnsupportedFormatError",
    "WatcherHandle",
    "__version__",
    "start_watcher",
]

if TYPE_CHECKING:
    from ckptsync.client import Checkpointer


def __getattr__(name: str) -> Any:
    # Lazy: the client needs torch, the daemon must not.
    if name == "Checkpointer":
        from ckptsync.client import Checkpointer

        return Checkpointer
    raise AttributeError(f"module 'ckptsync' has no attribute {name!r}")
