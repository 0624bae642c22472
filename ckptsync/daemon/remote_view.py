"""The daemon's view of the remote: its committed checkpoints, and retention applied to it.

:class:`RemoteView` lists the remote's committed checkpoints. A failing listing keeps the
last known state (a push of a committed name is a no-op, so a stale view costs nothing);
only a permanent error at start-up ends the daemon. At start-up an unreachable remote is
listed again with the one :class:`~ckptsync.transfer.retry.RetryPolicy` until it answers or
the daemon stops. Retention runs on the daemon's transfer queue, never deleting the
checkpoint a live trainer resumed from; what it deleted is *retired*: never pending again.

Runs on the dispatcher thread, except the retention job itself (its outcome comes back
through the dispatcher's queue).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import tenacity

from ckptsync.daemon.health import Health
from ckptsync.errors import ConfigError, RemoteError
from ckptsync.manifest import Manifest
from ckptsync.output import EventLog
from ckptsync.retention import RetentionPolicy
from ckptsync.transfer import stopping
from ckptsync.transfer.queue import Attempt, Transfer, TransferFuture, TransferQueue
from ckptsync.transfer.retry import RetryPolicy
from ckptsync.zerocode.rules import is_watched

if TYPE_CHECKING:
    from ckptsync.remote import RemoteStore

__all__ = ["LIST_RETRY", "RemoteView"]

#: An unreachable remote at start-up is listed again after 2, 4, 8, ... s, at most 5 min apart.
LIST_RETRY = RetryPolicy(2.0, 300.0)
#: Seconds between two full listings (also at least 12 reconcile intervals).
REFRESH_S = 60.0
_RETENTION = "retention"  # its key on the transfer queue


class _Stopped(Exception):
    """The daemon stopped during a start-up back-off."""


def _permanent(e: BaseException) -> bool:
    return isinstance(e, ConfigError) or (isinstance(e, RemoteError) and not e.retryable)


class RemoteView:
    """What the remote holds (``committed``: name -> manifest) and its retention.

    Args:
        store: the remote.
        queue: the daemon's transfer queue (retention runs on it).
        events: the event log.
        health: where errors are reported.
        stop: the daemon's stop event (ends a start-up back-off).
        once: ``--once``: an unreachable remote at start-up ends the daemon.
        post: puts a message on the dispatcher's queue (thread-safe).
    """

    def __init__(self, store: RemoteStore, queue: TransferQueue, events: EventLog,
                 health: Health, stop: threading.Event, *, once: bool,
                 post: Callable[[tuple[Any, ...]], None]) -> None:
        self.store = store
        self._queue = queue
        self._events = events
        self._health = health
        self._stop = stop
        self._once = once
        self._post = post
        self.committed: dict[str, Manifest] = {}
        self.retired: set[str] = set()  # deleted by retention: never pending again
        self.fatal: str | None = None
        self.unreachable = False  # --once could not list the remote
        self.refreshed_at = 0.0
        self.retention_due = False
        self.retention_running = False
        self.retention_job: TransferFuture[list[str]] | None = None

    # ------------------------------------------------------------------ listing
    def stale(self, now: float, interval: float) -> bool:
        """Time for a full listing (the view may miss what another writer did)."""
        return now - self.refreshed_at > max(REFRESH_S, 12 * interval)

    def refresh(self, *, initial: bool = False) -> bool:
        """Re-list the remote's committed checkpoints.

        At start-up (``initial``) a permanent error (credentials, missing bucket, a bad URL) is
        a configuration error: False, the daemon exits; so is an unreachable remote with
        ``--once`` (``list`` has retried already); any other error is retried (:data:`LIST_RETRY`)
        until the daemon stops. Later, every error is reported and leaves the last known
        state: a later refresh retries.
        """
        if self._stop.is_set():
            return True
        try:
            listed = self._list_retrying() if initial else self._list()
        except _Stopped:
            return True
        except Exception as e:
            if self._stop.is_set():
                return True
            if initial and _permanent(e):
                self._fail_fast(e)
                return False
            if initial and self._once:
                self.unreachable = True
                self.fatal = str(e)
                self._events("error", "remote_unreachable", error=str(e),
                             hint="--once gives up: check the URL, the network and the "
                                  "endpoint, then run it again; nothing was committed")
                return False
            self._unavailable(e, None)
            return True
        self.committed = {m.name: m for m in listed}
        self.refreshed_at = time.monotonic()
        return True

    def _list(self) -> list[Manifest]:
        with stopping(self._stop):  # a stop cuts the retries' back-off short
            return self.store.list()

    def _list_retrying(self) -> list[Manifest]:
        def retried(e: BaseException) -> bool:
            return not (self._stop.is_set() or _permanent(e) or self._once)

        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else None
            if exc is not None:
                self._unavailable(exc, wait)

        def sleep(seconds: float) -> None:
            if self._stop.wait(seconds):
                raise _Stopped

        retrying = tenacity.Retrying(retry=tenacity.retry_if_exception(retried),
                                     wait=LIST_RETRY.wait(), sleep=sleep,
                                     before_sleep=before_sleep, reraise=True)
        return retrying(self._list)

    def _unavailable(self, e: BaseException, retry_in: float | None) -> None:
        self._health.error(f"listing the remote: {type(e).__name__}: {e}")
        self._events("warning", "remote_unavailable", error=str(e), error_type=type(e).__name__,
                     retry_in_s=round(retry_in, 2) if retry_in is not None else None)

    def _fail_fast(self, e: BaseException) -> None:
        self.fatal = str(e)
        self._health.set_state("failed")
        self._events("error", "fatal", error=str(e),
                     hint="a permanent remote error: fix the URL, bucket or credentials and "
                          "restart; nothing partial was committed")

    # ------------------------------------------------------------------ what it holds
    def add(self, m: Manifest) -> None:
        """``m`` was committed (by a push of this daemon)."""
        self.committed[m.name] = m
        self.retired.discard(m.name)

    def synced(self, local: Iterable[str], rules: set[str]) -> list[str]:
        """The committed remote checkpoints of this directory: the local checkpoints the remote
        holds, and every zero-code version of our rules it holds (their spool copies go)."""
        names = set(local)
        ours = [m for m in self.committed.values()
                if m.name in names or (is_watched(m) and m.source.get("rule") in rules)]
        return [m.name for m in sorted(ours, key=lambda m: m.sort_key())]

    # ------------------------------------------------------------------ retention
    def want_retention(self) -> None:
        """A push committed a checkpoint: apply retention at the next chance."""
        self.retention_due = True

    def apply_retention(self, policy: RetentionPolicy, protect: list[str]) -> None:
        """Start remote retention on the queue, if it is due and not running already."""
        if not self.retention_due or self.retention_running or self._stop.is_set():
            return
        self.retention_due = False
        self.retention_running = True

        def job(attempt: Attempt) -> list[str]:
            with stopping(attempt.stop):
                return self.store.apply_retention(policy, protect=protect)

        fut = self._queue.submit(Transfer(_RETENTION, job, name="retention"))
        self.retention_job = fut
        fut.add_done_callback(lambda f: self._post(("retention", f)))

    def on_retention(self, fut: TransferFuture[list[str]]) -> None:
        """A retention run's outcome (on the dispatcher thread)."""
        self.retention_running = False
        if fut.outcome in ("superseded", "cancelled"):
            return
        if fut.error is not None:
            self._events("warning", "retention_failed", error=str(fut.error))
            return
        for name in fut.result():
            self.committed.pop(name, None)
            self.retired.add(name)
            self._events("info", "retention_deleted", name=name)
