"""The daemon core: :class:`Watcher` watches a directory and pushes what the remote lacks.

Events are hints, scans are truth (DESIGN.md, "The daemon")::

    watchdog emitter ──► _Handler.dispatch ──► queue ──► dispatcher thread ──► upload pool
    (inotify thread)     (enqueues only)                 reconcile, versions     RemoteStore.push
                                                         status file, retention

:class:`Watcher` runs the dispatcher loop and the stop; its pipelines are mixins, one module
each: :mod:`~ckptsync.daemon.watcher_state` (state, status file),
:mod:`~ckptsync.daemon.watcher_remote` (remote listing, retention),
:mod:`~ckptsync.daemon.watcher_push` (reconcile, pushes),
:mod:`~ckptsync.daemon.watcher_versions` (zero-code versions). See :mod:`ckptsync.daemon` for
the whole daemon (threads, signals, exit codes).
"""

from __future__ import annotations

import logging
import os
import queue
import time
from collections.abc import Callable
from concurrent.futures import wait as wait_futures
from pathlib import Path
from typing import Any

from ckptsync.daemon.runtime import EXIT_FAILED, EXIT_OK, EXIT_REMOTE, _pid_alive
from ckptsync.daemon.watcher_push import PushPipeline
from ckptsync.daemon.watcher_versions import VersionPipeline
from ckptsync.local import WATCH_DIR

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


class Watcher(PushPipeline, VersionPipeline):
    """The daemon core: watch ``config.local_dir``, push what the remote lacks.

    ``run()`` blocks until stopped (``request_stop()``, or the end of ``--once``) and returns
    an exit code. Thread-safe controls: :meth:`request_stop`, :meth:`request_reconcile`.

    Args:
        config: the resolved configuration.
        store: a remote store (default: built from ``config.remote``); a fault seam in tests.
        events: the structured log sink (default: stderr).
        spool_ops: file system calls into the zero-code spool (a fault seam in tests).
    """

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
                    remote=self._redacted(), rules=[r.spec for r in self.config.rules],
                    once=self.config.once)
        try:
            observer.start()
            code = self._loop()
        finally:
            observer.stop()
            observer.join(timeout=10)
            self._shutdown()
        self._state = "failed" if self._fatal else "stopped"
        self._write_status()
        self.events("info" if code == EXIT_OK else "error", "exit", code=code,
                    pending=self._pending_names(), failed=sorted(self._failed),
                    waiting_for_nodes=sorted(self._waiting))
        return code

    def _loop(self) -> int:
        if not self._refresh_remote(initial=True):
            return EXIT_FAILED if self._unreachable else EXIT_REMOTE
        if self._stop.is_set():  # stopped while the remote was out of reach: push nothing
            return EXIT_OK
        self._init_signatures()
        self._state = "running"
        self._reconcile()
        self._warn_without_rules()
        # What was finished before the daemon started is taken now, not after an interval.
        self._take_versions(time.monotonic())
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
            if self._fatal:
                return EXIT_REMOTE
            self._check_parent()
            now = time.monotonic()
            if self._reconcile_at is not None and now >= self._reconcile_at:
                self._guarded("reconciling", self._reconcile)
            self._guarded("taking versions", self._take_versions, now)
            self._guarded("applying retention", self._maybe_retention)
            if self._drain and self._drained():
                if self._retention_running or self._retention_due:
                    continue
                # A part still waiting for other nodes is not restorable: not a success.
                failed = (bool(self._failed) or bool(self._waiting)
                          or any(t.gave_up for t in self._trackers))
                self._write_status()
                return EXIT_FAILED if failed and self.config.once else EXIT_OK
        return EXIT_OK

    def _guarded(self, what: str, fn: Callable[..., None], *args: Any) -> None:
        """Run one step of the loop; an error of any type is reported, never the end of the
        daemon (the next reconcile, at the latest ``interval`` seconds later, retries)."""
        try:
            fn(*args)
        except Exception as e:
            self._last_error = f"{what}: {type(e).__name__}: {e}"
            log.debug("error while %s", what, exc_info=True)
            self.events("error", "internal_error", during=what, error_type=type(e).__name__,
                        error=str(e), action="continuing; the next reconcile retries")
            if self._reconcile_at is None:
                self._schedule(time.monotonic() + self.config.interval)

    def _next_item(self) -> tuple[Any, ...] | None:
        now = time.monotonic()
        deadlines = [self._reconcile_at] if self._reconcile_at is not None else []
        wall = time.time()
        deadlines += [d for t in self._trackers
                      if (d := t.next_deadline(now, wall)) is not None]
        if self._failed:
            deadlines.append(min(f.retry_at for f in self._failed.values()))
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
            for tr in self._trackers:
                tr.on_event(ev, rel, t, is_dir)
            # A native local commit is a directory renamed into place; debounce bursts.
            top = rel.split("/", 1)[0]
            if ev == "moved_in" and is_dir and not top.startswith("."):
                self._schedule(now + _DEBOUNCE_S)
        elif kind == "reconcile":
            self._schedule(now)
        elif kind == "pushed":
            self._on_pushed(item[1], item[2], now)
        elif kind == "snapshot":
            self._on_snapshot(item[1], item[2], item[3], item[4])
        elif kind == "retention":
            self._on_retention(item[1])

    def _check_parent(self) -> None:
        if self._parent is None or self._drain:
            return
        gone = (os.getppid() != self._parent) if self._parent_is_ppid \
            else not _pid_alive(self._parent)
        if gone:
            self.events("info", "parent_exited", parent_pid=self._parent,
                        action="uploading what is pending, then exiting")
            self._drain = True
            self._schedule(time.monotonic())
            for tr in self._trackers:
                tr.settle = 0.0

    # ------------------------------------------------------------------ status / stop
    def _drained(self) -> bool:
        if self._inflight or any(t.busy or (t.retry_at is not None and not t.gave_up)
                                 for t in self._trackers):
            return False
        wall, now = time.time(), time.monotonic()
        if any(t.due(now, wall, force=True) is not None for t in self._trackers):
            return False
        if self._reconcile_at is not None and self._reconcile_at <= now:
            return False
        pending = [n for n in self._pending_names() if n not in self._failed]
        if pending:
            return False
        # With failures: --once gives up after a few attempts; a drain on parent exit as well.
        return all(f.attempts >= 3 for f in self._failed.values())

    def _shutdown(self) -> None:
        """Stop every thread: snapshots finish, queued uploads are cancelled, in-flight ones
        get ``stop_timeout``, then are abandoned (never committed) and cleaned up."""
        self._state = "stopping"
        self._snap_pool.shutdown(wait=True, cancel_futures=True)
        # Queued pushes never started: cancel them, never wait on them (a cancelled future
        # that no worker picked up is never "done" to concurrent.futures.wait).
        self._pool.shutdown(wait=False, cancel_futures=True)
        running = {f for f in self._inflight.values() if not f.cancel() and not f.done()}
        if running:
            self.events("info", "stopping", uploading=sorted(
                n for n, f in self._inflight.items() if f in running),
                wait_s=self.config.stop_timeout)
            _, running = wait_futures(running, timeout=self.config.stop_timeout)
        self._abort.set()
        # The retention job too: a delete under way gets the same bound.
        job = self._retention_job
        pending = [*running, *([job] if job is not None and not job.cancelled() else [])]
        _, stuck = wait_futures(pending, timeout=_ABANDON_WAIT_S)
        if stuck:
            # A call to the remote that did not return: leave it behind (the process exits
            # without it); what it may still write is never committed (no manifest follows).
            self.abandoned_calls = True
            self.events("warning", "stop_abandoned_calls", count=len(stuck),
                        detail="a call to the remote did not return; exiting without it")
        else:
            self._pool.shutdown(wait=True)
        # Let completion messages land in the status (committed or abandoned).
        while True:
            try:
                it = self._q.get_nowait()
            except queue.Empty:
                break
            if it[0] == "pushed":
                self._on_pushed(it[1], it[2], time.monotonic())
            elif it[0] == "retention":
                self._on_retention(it[1])

