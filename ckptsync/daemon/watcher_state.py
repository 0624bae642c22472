"""The state a :class:`~ckptsync.daemon.watcher.Watcher` keeps, and the status it reports.

:class:`WatcherState` holds what the daemon knows (the remote's committed checkpoints, the
local ones, pushes in flight, failures, zero-code trackers) and writes it to the status file
(:meth:`WatcherState._write_status`). The pipelines that change it are mixins over it:
:mod:`~ckptsync.daemon.watcher_remote` (remote listing, retention),
:mod:`~ckptsync.daemon.watcher_push` (reconcile and pushes) and
:mod:`~ckptsync.daemon.watcher_versions` (zero-code versions). Every method runs on the
dispatcher thread only.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptsync.daemon.config import WatchConfig
from ckptsync.daemon.rules import is_watched
from ckptsync.daemon.runtime import (
    SPOOL_NAME,
    STATUS_NAME,
    EventLog,
    _utc,
    _watch_dir,
    resumed_from,
)
from ckptsync.daemon.versions import VersionTracker
from ckptsync.local import FileOps, LocalStore, write_json_atomic
from ckptsync.manifest import Manifest
from ckptsync.redact import redact_url

if TYPE_CHECKING:
    from ckptsync.remote import RemoteStore

__all__ = ["WatcherState"]


@dataclass
class _Failure:
    error: str
    attempts: int
    retry_at: float
    retryable: bool = True  # the remote may be failing: its source waits for the back-off


class WatcherState:
    """The daemon's state; see :class:`~ckptsync.daemon.watcher.Watcher` for the arguments."""

    def __init__(self, config: WatchConfig, *, store: RemoteStore | None = None,
                 events: EventLog | None = None, spool_ops: FileOps | None = None) -> None:
        self.config = config
        self.events = events or EventLog(fmt=config.log_format)
        self.local = LocalStore(config.local_dir)
        wdir = _watch_dir(self.local.directory)
        wdir.mkdir(exist_ok=True)
        self.status_path = wdir / STATUS_NAME
        self.spool = LocalStore(wdir / SPOOL_NAME, spool_ops)
        self.spool.cleanup()  # our own crashed snapshots (never the trainer's staging dirs)
        if store is None:
            from ckptsync.remote import RemoteStore

            store = RemoteStore(config.remote, dict(config.storage_options), keys=config.keys)
        store.bind_run(self.local.directory)  # its pushes are this directory's run
        self.store = store
        self._q: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._stop = threading.Event()
        self._abort = threading.Event()  # set: in-flight pushes abandon at their next chunk
        self._pool = ThreadPoolExecutor(config.workers, thread_name_prefix="ckptsync-upload")
        self._snap_pool = ThreadPoolExecutor(1, thread_name_prefix="ckptsync-snapshot")
        self._inflight: dict[str, Future[Any]] = {}
        self._inflight_src: dict[str, str] = {}  # name -> source (one push each)
        self._retention_job: Future[Any] | None = None  # the last retention run submitted
        self._failed: dict[str, _Failure] = {}
        self._remote: dict[str, Manifest] = {}
        self._skipped: set[str] = set()
        self._local_names: list[str] = []
        self._trackers = [VersionTracker(r, self.local.directory, config.settle,
                                         config.max_wait) for r in config.rules]
        self._warnings: list[str] = []
        self._retention_due = False
        self._retention_running = False
        self._fatal: str | None = None
        self._last_error: str | None = None  # the newest error reported (status)
        self._dropped: dict[str, str] = {}  # name -> why it is not pushed (gone)
        # Node parts uploaded, not committed: name -> (nodes missing, when to look again).
        self._waiting: dict[str, tuple[tuple[int, ...], float]] = {}
        self._drain = config.once  # finish what is there, then exit
        self._state = "starting"
        self._started = _utc()
        self._last_reconcile: float | None = None
        self._remote_refreshed = 0.0
        self._reconcile_at: float | None = 0.0
        self._any_failed_once = False
        self._unreachable = False  # --once could not list the remote
        self.abandoned_calls = False  # a stopped push's call never returned (see _shutdown)
        self._parent = config.parent_pid
        self._parent_is_ppid = self._parent is not None and self._parent == os.getppid()

    def _redacted(self) -> str:
        return redact_url(self.config.remote)

    def _schedule(self, at: float) -> None:
        if self._reconcile_at is None or at < self._reconcile_at:
            self._reconcile_at = at

    def _protected(self) -> list[str]:
        name = resumed_from(self.local.directory)
        return [name] if name else []

    def _pending_names(self) -> list[str]:
        return [n for n in self._local_names
                if n not in self._remote and n not in self._skipped and n not in self._waiting]

    def _synced(self) -> list[str]:
        """The committed remote checkpoints of this directory: the local checkpoints the remote
        holds, and every zero-code version of our rules it holds (their spool copies go)."""
        local = set(self._local_names)
        rules = {t.rule.spec for t in self._trackers}
        ours = [m for m in self._remote.values()
                if m.name in local or (is_watched(m) and m.source.get("rule") in rules)]
        return [m.name for m in sorted(ours, key=lambda m: m.sort_key())]

    def _write_status(self) -> None:
        now = time.monotonic()
        wall = time.time()
        # Pending also counts a finished version not yet taken (say, a file that was there
        # before the daemon started): flush() must not return before it is committed.
        watch = [{"rule": t.rule.spec,
                  "pending": t.pending(now) or t.due(now, wall, force=True) is not None,
                  "error": t.error}
                 for t in self._trackers]
        pending = self._pending_names()
        settling = [w["rule"] for w in watch if w["pending"]]
        # In sync only when nothing at all is outstanding: a version being written or copied
        # has no name yet, but it is not synced either.
        in_sync = (self._last_reconcile is not None and not pending and not self._inflight
                   and not settling and not self._failed and not self._waiting
                   and self._fatal is None)
        st = {
            "pid": os.getpid(),
            "state": self._state,
            "local_dir": str(self.local.directory),
            "remote": self._redacted(),
            "started": self._started,
            "updated": _utc(),
            "updated_ts": time.time(),
            "last_reconcile": _utc(self._last_reconcile) if self._last_reconcile else None,
            "last_reconcile_ts": self._last_reconcile,
            "in_sync": in_sync,
            "synced": self._synced(),
            "pending": pending,
            "uploading": sorted(self._inflight),
            # This node's part uploaded, the checkpoint not committed (not restorable):
            # name -> the nodes whose part is missing.
            "waiting_for_nodes": {n: list(w[0]) for n, w in sorted(self._waiting.items())},
            "settling": settling,
            "failed": [{"name": n, "error": f.error, "attempts": f.attempts,
                        "retryable": f.retryable}
                       for n, f in sorted(self._failed.items())],
            "skipped_by_retention": sorted(self._skipped),
            "watch": watch,
            "warnings": [] if self._local_names else list(self._warnings),
            "error": self._fatal,
            "last_error": self._last_error,
        }
        with contextlib.suppress(OSError):
            write_json_atomic(self.status_path, st)
