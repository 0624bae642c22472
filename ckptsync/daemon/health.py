"""The daemon's health: its state, the newest error reported, and the status file.

:class:`Health` owns the daemon's state (``starting`` ... ``stopped``) and its last error;
every part of the daemon reports errors to it, and asks it to write the status file, which
``ckptsync status`` and :meth:`~ckptsync.daemon.launcher.WatcherHandle.flush` read. What the
other parts know (pending, uploading, failed, ...) it takes from a snapshot function the
daemon's wiring (:class:`~ckptsync.daemon.watcher.Watcher`) provides: it owns none of it.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ckptsync.local import write_json_atomic
from ckptsync.mounts import MountedRemote
from ckptsync.output import utc

__all__ = ["Health"]


class Health:
    """State, last error and status file of one daemon.

    Args:
        path: the status file (replaced atomically at each write).
        local_dir: the watched directory.
        remote: the remote URL, credentials removed.
        snapshot: the other parts' fields for the status, at the time of the call.
        mount: the FUSE mount (Colab's Drive) the remote directory is on, where committed
            means handed to the mount: the status says so (``remote_mount``).
    """

    def __init__(self, path: Path, local_dir: Path, remote: str,
                 snapshot: Callable[[], dict[str, Any]],
                 mount: MountedRemote | None = None) -> None:
        self.path = path
        self.local_dir = local_dir
        self.remote = remote
        self.mount = mount
        self.state = "starting"
        self.last_error: str | None = None  # the newest error reported
        self.started = utc()
        self._snapshot = snapshot

    def set_state(self, state: str) -> None:
        """``starting``, ``running``, ``stopping``, ``stopped`` or ``failed``."""
        self.state = state

    def error(self, message: str) -> None:
        """Report an error (the status's ``last_error`` until a newer one)."""
        self.last_error = message

    def status(self) -> dict[str, Any]:
        """The status the daemon reports now."""
        parts = self._snapshot()
        # In sync only when nothing at all is outstanding: a version being written or copied
        # has no name yet, but it is not synced either.
        in_sync = (parts["last_reconcile_ts"] is not None and not parts["pending"]
                   and not parts["uploading"] and not parts["settling"] and not parts["failed"]
                   and not parts["waiting_for_nodes"] and parts["error"] is None)
        last = parts["last_reconcile_ts"]
        return {
            "pid": os.getpid(),
            "state": self.state,
            "local_dir": str(self.local_dir),
            "remote": self.remote,
            "remote_mount": self.mount.as_dict() if self.mount is not None else None,
            "started": self.started,
            "updated": utc(),
            "updated_ts": time.time(),
            "last_reconcile": utc(last) if last else None,
            **parts,
            "in_sync": in_sync,
            "last_error": self.last_error,
        }

    def write(self) -> None:
        """Write the status file (a failure to write it is not the daemon's end)."""
        with contextlib.suppress(OSError):
            write_json_atomic(self.path, self.status(), durable=False)  # rewritten often: a hint
