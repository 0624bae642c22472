"""The daemon core: :class:`Watcher` watches a directory and pushes what the remote lacks.

Events are hints, scans are truth (DESIGN.md, "The daemon")::

    watchdog emitter ──► _Handler.dispatch ──► queue ──► dispatcher thread ──► transfer queue
    (inotify thread)     (enqueues only)                 reconcile, versions     RemoteStore.push
                                                         status file, retention

:class:`Watcher` is where the daemon is wired: it builds the parts, each of which owns its
own state, and runs the dispatcher loop and the stop. The parts, one module each:

- :class:`~ckptsync.daemon.health.Health`: the state, the last error, the status file;
- :class:`~ckptsync.daemon.remote_view.RemoteView`: what the remote holds, retention;
- :class:`~ckptsync.daemon.taker.VersionTaker`: zero-code versions into the spool;
- :class:`~ckptsync.daemon.pushes.PushQueue`: reconcile, and the pushes on the one
  :class:`~ckptsync.transfer.queue.TransferQueue`.

Every part runs on the dispatcher thread; what the queue's and the snapshot's threads finish
comes back as a message on the dispatcher's queue. See :mod:`ckptsync.daemon` for the whole
daemon (threads, signals, exit codes).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptsync.daemon.config import WatchConfig
from ckptsync.daemon.health import Health
from ckptsync.daemon.pushes import PushQueue
from ckptsync.daemon.remote_view import RemoteView
from ckptsync.daemon.runtime import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_REMOTE,
    SPOOL_NAME,
    STATUS_NAME,
    EventLog,
    pid_alive,
    resumed_from,
    watch_dir,
)
from ckptsync.daemon.spool_remote import reexamine_spool, remote_identity
from ckptsync.daemon.taker import VersionTaker
from ckptsync.local import WATCH_DIR, FileOps, LocalStore
from ckptsync.redact import redact_url
from ckptsync.transfer.queue import TransferQueue

if TYPE_CHECKING:
    from ckptsync.remote import RemoteStore

__all__ = ["Watcher"]

log = logging.getLogger("ckptsync.watch")

_DEBOUNCE_S = 0.2
_PARENT_POLL_S = 1.0
# After the stop event is set, how long an abandoned push gets to notice it (it checks between
# chunks; a call already sent returns within the read timeout, or is left behind).
_ABANDON_WAIT_S = 5.0


# --------------------------------------------------------------------------- events
def _handler_class() -> type:
    from watchdog.events import FileSystemEventHandler

    class _Handler(FileSystemEventHandler):
        """Runs on watchdog's emitter thread: translate and enqueue, nothing else."""

        def __init__(self, root: Path, q: queue.Queue[tuple[Any, ...]]) -> None:
            super().__init__()
            self.root = str(root)
            self.q = q

        def _rel(self, path: Any) -> str | None:
            p = os.fsdecode(path)
            rel = os.path.relpath(p, self.root)
            if rel == "." or rel.startswith("..") or rel.split(os.sep, 1)[0] == WATCH_DIR:
                return None
            return rel.replace(os.sep, "/")

        def on_any_event(self, event: Any) -> None:
            kind = event.event_type
            if kind in ("opened", "closed_no_write", "attrib"):
                return  # our own reads show up as these: never let them wake us
            if event.is_directory and kind == "modified":
                return
            now = time.monotonic()
            if kind == "moved":
                src, dst = self._rel(event.src_path), self._rel(event.dest_path)
                if src is not None:
                    self.q.put(("fs", now, "moved_away", src, event.is_directory))
                if dst is not None:
                    self.q.put(("fs", now, "moved_in", dst, event.is_directory))
                return
            rel = self._rel(event.src_path)
            if rel is not None:
                self.q.put(("fs", now, kind, rel, event.is_directory))

    return _Handler


class Watcher:
    """The daemon core: watch ``config.local_dir``, push what the remote lacks.

    ``run()`` blocks until stopped (``request_stop()``, or the end of ``--once``) and returns
    an exit code. Thread-safe controls: :meth:`request_stop`, :meth:`request_reconcile`.

    Args:
        config: the resolved configuration.
        store: a remote store (default: built from ``config.remote``); a fault seam in tests.
        events: the structured log sink (default: stderr).
        spool_ops: file system calls into the zero-code spool (a fault seam in tests).
    """

    def __init__(self, config: WatchConfig, *, store: RemoteStore | None = None,
                 events: EventLog | None = None, spool_ops: FileOps | None = None) -> None:
        self.config = config
        self.events = events or EventLog(fmt=config.log_format)
        self.local = LocalStore(config.local_dir)
        wdir = watch_dir(self.local.directory)
        wdir.mkdir(exist_ok=True)
        self.spool = LocalStore(wdir / SPOOL_NAME, spool_ops)
        self.spool.cleanup()  # our own crashed snapshots (never the trainer's staging dirs)
        # Before anything is pushed: versions spooled for another remote are re-examined.
        reexamine_spool(self.spool, self.local.directory,
                        remote_identity(config.remote, config.storage_options),
                        list(config.rules), self.events)
        if store is None:
            from ckptsync.remote import RemoteStore

            store = RemoteStore(config.remote, dict(config.storage_options), keys=config.keys)
        store.bind_run(self.local.directory)  # its pushes are this directory's run
        self.store = store
        self._q: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._stop = threading.Event()
        self._drain = config.once  # finish what is there, then exit
        self._reconcile_at: float | None = 0.0
        self._parent = config.parent_pid
        self._parent_is_ppid = self._parent is not None and self._parent == os.getppid()
        self.abandoned_calls = False  # a stopped push's call never returned (see _shutdown)
        # The parts, wired here (each owns its state; see the module doc).
        # A backend of one worker (Drive) pushes one checkpoint at a time: Drive has no
        # atomic folder create, so two first pushes at once would make two root folders.
        self.transfers = TransferQueue(1 if store.backend.workers == 1 else config.workers,
                                       name="ckptsync-upload")
        self.health = Health(wdir / STATUS_NAME, self.local.directory,
                             redact_url(config.remote), self._snapshot,
                             mount=store.mount)
        self.view = RemoteView(store, self.transfers, self.events, self.health, self._stop,
                               once=config.once, post=self._q.put)
        self.taker = VersionTaker(config, self.spool, self.events, self.health,
                                  post=self._q.put, schedule=self._schedule)
        self.pushes = PushQueue(config, store, self.local, self.spool, self.transfers,
                                self.view, self.taker, self.events, self.health,
                                post=self._q.put, schedule=self._schedule,
                                draining=lambda: self._drain)

    # ------------------------------------------------------------------ controls
    def request_stop(self) -> None:
        """Stop taking new work; in-flight uploads get ``stop_timeout`` seconds. Thread-safe."""
        self._stop.set()
        self._q.put(("wake",))

    def request_reconcile(self) -> None:
        """Reconcile now (not at the next interval). Thread-safe."""
        self._q.put(("reconcile",))

    # ------------------------------------------------------------------ main loop
    def run(self) -> int:
        """Run until stopped; return the exit code (see the module doc)."""
        from watchdog.observers import Observer

        observer = Observer()
        observer.schedule(_handler_class()(self.local.directory, self._q),
                          str(self.local.directory), recursive=True)
        observer.daemon = True
        self.events("info", "start", pid=os.getpid(), local=str(self.local.directory),
                    remote=self.health.remote, rules=[r.spec for r in self.config.rules],
                    once=self.config.once)
        mount = self.health.mount
        if mount is not None:  # once, at start-up: not with every commit
            self.events("warning", "remote_on_mount", remote=self.health.remote,
                        mount=mount.mount_point, fstype=mount.fstype, detail=mount.note,
                        action=mount.advice)
        try:
            observer.start()
            code = self._loop()
        finally:
            observer.stop()
            observer.join(timeout=10)
            self._shutdown()
        if code == EXIT_OK and self.config.once and self._stop.is_set():
            left = self._work_left()
            if left:
                # --once promises everything committed at exit 0: a signal broke the promise.
                code = EXIT_INTERRUPTED
                self.events("warning", "interrupted", left=left[:5], count=len(left),
                            detail="stopped by a signal before everything was committed; "
                                   "run it again to finish")
        self.health.set_state("failed" if self.view.fatal else "stopped")
        self.health.write()
        self.events("info" if code == EXIT_OK else "error", "exit", code=code,
                    pending=self.pushes.pending(), failed=sorted(self.pushes.failed),
                    waiting_for_nodes=sorted(self.pushes.waiting))
        return code

    def _loop(self) -> int:
        if not self.view.refresh(initial=True):
            return EXIT_FAILED if self.view.unreachable else EXIT_REMOTE
        if self._stop.is_set():  # stopped while the remote was out of reach: push nothing
            return EXIT_OK
        self.taker.init_signatures(self.view.committed)
        self.health.set_state("running")
        self._reconcile()
        self.taker.warn_without_rules(self.pushes.local_names)
        # What was finished before the daemon started is taken now, not after an interval.
        self.taker.take(time.monotonic(), self.view.committed, drain=self._drain)
        while not self._stop.is_set():
            item = self._next_item()
            batch = [item] if item is not None else []
            while True:
                try:
                    batch.append(self._q.get_nowait())
                except queue.Empty:
                    break
            now = time.monotonic()
            for it in batch:
                self._guarded(f"handling {it[0]!r}", self._handle, it, now)
            if any(it[0] not in ("fs", "wake") for it in batch):
                self.health.write()
            if self.view.fatal:
                return EXIT_REMOTE
            self._check_parent()
            now = time.monotonic()
            if self._reconcile_at is not None and now >= self._reconcile_at:
                self._guarded("reconciling", self._reconcile)
            if not self._stop.is_set():
                self._guarded("taking versions", self._take_versions, now)
            self._guarded("applying retention", self._apply_retention)
            if self._drain and self._drained():
                if self.view.retention_running or self.view.retention_due:
                    continue
                # A part still waiting for other nodes is not restorable: not a success.
                failed = (bool(self.pushes.failed) or bool(self.pushes.waiting)
                          or self.taker.gave_up())
                self.health.write()
                return EXIT_FAILED if failed and self.config.once else EXIT_OK
        return EXIT_OK

    def _guarded(self, what: str, fn: Callable[..., None], *args: Any) -> None:
        """Run one step of the loop; an error of any type is reported, never the end of the
        daemon (the next reconcile, at the latest ``interval`` seconds later, retries)."""
        try:
            fn(*args)
        except Exception as e:
            self.health.error(f"{what}: {type(e).__name__}: {e}")
            log.debug("error while %s", what, exc_info=True)
            self.events("error", "internal_error", during=what, error_type=type(e).__name__,
                        error=str(e), action="continuing; the next reconcile retries")
            if self._reconcile_at is None:
                self._schedule(time.monotonic() + self.config.interval)

    def _schedule(self, at: float) -> None:
        if self._reconcile_at is None or at < self._reconcile_at:
            self._reconcile_at = at

    def _reconcile(self) -> None:
        now = time.monotonic()
        self._reconcile_at = now + self.config.interval
        if (self.view.stale(now, self.config.interval) and self.pushes.idle()
                and not self.view.retention_running):
            self.view.refresh()
            if self.view.fatal:
                return
        self.pushes.reconcile(now)
        self.health.write()

    def _take_versions(self, now: float) -> None:
        self.taker.take(now, self.view.committed, drain=self._drain)

    def _apply_retention(self) -> None:
        name = resumed_from(self.local.directory)
        self.view.apply_retention(self.config.policy, [name] if name else [])

    def _next_item(self) -> tuple[Any, ...] | None:
        now = time.monotonic()
        deadlines = [self._reconcile_at] if self._reconcile_at is not None else []
        deadlines += self.taker.deadlines(now, time.time())
        retry = self.pushes.next_retry()
        if retry is not None:
            deadlines.append(retry)
        timeout = max(0.0, min(deadlines, default=now + self.config.interval) - now)
        if self._parent is not None:
            timeout = min(timeout, _PARENT_POLL_S)
        try:
            return self._q.get(timeout=timeout + 0.001)
        except queue.Empty:
            return None

    def _handle(self, item: tuple[Any, ...], now: float) -> None:
        kind = item[0]
        if kind == "fs":
            _, t, ev, rel, is_dir = item
            self.taker.on_event(ev, rel, t, is_dir)
            # A native local commit is a directory renamed into place; debounce bursts.
            top = rel.split("/", 1)[0]
            if ev == "moved_in" and is_dir and not top.startswith("."):
                self._schedule(now + _DEBOUNCE_S)
        elif kind == "reconcile":
            self._schedule(now)
        elif kind == "pushed":
            self.pushes.on_pushed(item[1], now)
        elif kind == "push_failed":
            self.pushes.on_attempt_failed(item[1], item[2], item[3], now)
        elif kind == "snapshot":
            self.taker.on_snapshot(item[1], item[2], item[3], item[4], drain=self._drain)
        elif kind == "retention":
            self.view.on_retention(item[1])

    def _check_parent(self) -> None:
        if self._parent is None or self._drain:
            return
        gone = (os.getppid() != self._parent) if self._parent_is_ppid \
            else not pid_alive(self._parent)
        if gone:
            self.events("info", "parent_exited", parent_pid=self._parent,
                        action="uploading what is pending, then exiting")
            self._drain = True
            self._schedule(time.monotonic())
            self.taker.drain()

    # ------------------------------------------------------------------ status / stop
    def _snapshot(self) -> dict[str, Any]:
        """The parts' fields for the status file (see :class:`Health`)."""
        now, wall = time.monotonic(), time.time()
        watch = self.taker.watch_status(now, wall)
        local = self.pushes.local_names
        retired = self.view.retired.intersection(local)
        return {
            "last_reconcile_ts": self.pushes.last_reconcile,
            "synced": self.view.synced(local, self.taker.rules),
            "pending": self.pushes.pending(),
            "uploading": self.pushes.uploading(),
            # This node's part uploaded, the checkpoint not committed (not restorable):
            # name -> the nodes whose part is missing.
            "waiting_for_nodes": {n: list(w[0])
                                  for n, w in sorted(self.pushes.waiting.items())},
            "settling": [w["rule"] for w in watch if w["pending"]],
            "failed": [{"name": n, "error": f.error, "attempts": f.attempts,
                        "retryable": f.retryable}
                       for n, f in sorted(self.pushes.failed.items())],
            "skipped_by_retention": sorted(self.pushes.skipped | retired),
            "watch": watch,
            "warnings": [] if local else list(self.taker.warnings),
            "error": self.view.fatal,
        }

    def _work_left(self) -> list[str]:
        """What a stopped ``--once`` leaves undone: checkpoints not committed remotely, and
        rules whose version is still being written, copied or retried."""
        now = time.monotonic()
        left = self.pushes.outstanding()
        return left + [f"a version of rule {t.rule.spec}" for t in self.taker.trackers
                       if t.pending(now) or t.due(now, time.time(), force=True) is not None]

    def _drained(self) -> bool:
        now, wall = time.monotonic(), time.time()
        if self.taker.busy(now, wall):
            return False
        if self._reconcile_at is not None and self._reconcile_at <= now:
            return False
        return self.pushes.drained()

    def _shutdown(self) -> None:
        """Stop every thread: snapshots finish, queued uploads are cancelled, in-flight ones
        get ``stop_timeout``, then are abandoned (never committed) and cleaned up."""
        self.health.set_state("stopping")
        self.taker.shutdown()
        # Queued pushes never started: cancelled, never waited on.
        self.transfers.close()
        running = self.transfers.running()
        if running:
            self.events("info", "stopping", uploading=sorted(
                f.transfer.name for f in running if f.transfer.item is not None),
                wait_s=self.config.stop_timeout)
            deadline = time.monotonic() + self.config.stop_timeout
            for fut in running:
                fut.wait(max(0.0, deadline - time.monotonic()))
        self.transfers.abort()
        # The retention job too (it runs on the queue): a delete under way gets the same bound.
        if not self.transfers.join(_ABANDON_WAIT_S):
            # A call to the remote that did not return: leave it behind (the process exits
            # without it); what it may still write is never committed (no manifest follows).
            self.abandoned_calls = True
            stuck = [f.transfer.name for f in self.transfers.running()]
            self.events("warning", "stop_abandoned_calls", count=len(stuck),
                        detail="a call to the remote did not return; exiting without it")
        # Let completion messages land in the status (committed or abandoned).
        now = time.monotonic()
        while True:
            try:
                it = self._q.get_nowait()
            except queue.Empty:
                break
            if it[0] in ("pushed", "push_failed", "retention"):
                self._handle(it, now)
