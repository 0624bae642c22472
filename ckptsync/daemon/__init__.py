"""The watch daemon: ``ckptsync watch`` keeps a remote in step with a local directory.

It pushes every committed local checkpoint (native ones, and the zero-code versions of the
files a trainer writes with ``torch.save``) that the remote lacks, newest first; it can be
killed (even with SIGKILL) and restarted at any time: the remote is the only record needed.
The zero-code model itself (rules, presets, restoring versions) is :mod:`ckptsync.zerocode`,
a layer below. Nothing here imports torch. Modules, lowest layer first:

- ``versions``: :func:`snapshot_version` (a finished version copied whole into the spool).
- ``tracker``: :class:`VersionTracker` (when a version is finished: a version is one save).
- ``spool_remote``: the spool records its remote; a version spooled for another is re-examined.
- ``config``: :class:`WatchConfig` (flags > ``CKPTSYNC_*`` env > config file > defaults).
- ``runtime``: exit codes, :class:`EventLog`, the status file, the directory lock.
- ``health``: :class:`Health`, the daemon's state, last error and status file.
- ``remote_view``: :class:`RemoteView`, what the remote holds, and retention applied to it.
- ``taker``: :class:`VersionTaker`, zero-code versions of the rules into the spool.
- ``pushes``: :class:`PushQueue`, reconcile and the pushes on the one transfer queue.
- ``watcher``: :class:`Watcher`, where those parts are wired; the dispatcher loop and the stop.
- ``process``: :func:`run_daemon`, signals, the process's exit code.
- ``cli``: the ``watch`` and ``status`` subcommands of the one ``ckptsync`` parser.
- ``launcher``: :func:`start_watcher`, the daemon as a background process of a notebook.
"""

from __future__ import annotations

from ckptsync.daemon.cli import add_subcommands, format_status, run_status, run_watch
from ckptsync.daemon.config import WatchConfig, config_from_args
from ckptsync.daemon.launcher import WatcherHandle, start_watcher
from ckptsync.daemon.process import STOP_GRACE_S, run_daemon
from ckptsync.daemon.runtime import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_REMOTE,
    EventLog,
    daemon_status,
    read_status,
)
from ckptsync.daemon.tracker import Due, VersionTracker
from ckptsync.daemon.versions import Snapshot, snapshot_version
from ckptsync.daemon.watcher import Watcher

__all__ = [
    "EXIT_CONFIG",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_REMOTE",
    "STOP_GRACE_S",
    "Due",
    "EventLog",
    "Snapshot",
    "VersionTracker",
    "WatchConfig",
    "Watcher",
    "WatcherHandle",
    "add_subcommands",
    "config_from_args",
    "daemon_status",
    "format_status",
    "read_status",
    "run_daemon",
    "run_status",
    "run_watch",
    "snapshot_version",
    "start_watcher",
]
