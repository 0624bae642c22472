"""One bounded, cancellable transfer queue with one retry policy: :class:`TransferQueue`.

Every upload ckptsync runs in the background goes through one: the in-process uploader
(:mod:`ckptsync.client.uploader`), the daemon's pushes (:mod:`ckptsync.daemon.pushes`) and
the Lightning integration (:mod:`ckptsync.integrations.lightning`).

**Latest wins, per key** (DESIGN.md, "Latest wins"). A :class:`Transfer` is keyed by what it
updates: a checkpoint stream, a file path such as Lightning's ``last.ckpt``. Per key, at most
one transfer runs and at most one waits. A newer transfer of a key replaces the one waiting
(which is then *superseded*: it never runs, its future says so) and takes its place in line,
so the newest version of a key never waits behind work queued after that key. Keys are
served in the order they first had work waiting, so no key starves another.

**Bounded**: ``workers`` threads, and per key one running and one waiting transfer, however
slow the remote: the backlog never grows with the number of saves.

**One retry policy**: a failed attempt is offered to the transfer's ``retry``, which says
which :class:`~ckptsync.transfer.retry.RetryPolicy` applies to that error (None: not
retried). A transfer to be retried waits in its key's place, without holding a thread; the
wait grows with the key's failures in a row, and holds for a newer transfer that replaces
it (the remote is failing: the newest goes next, after the back-off). Every attempt is told
its number: an attempt after the first must resolve what the last one may have done by
reading the remote (``RemoteStore.push`` does, unless told the checkpoint is ``fresh``),
never assume it either way.

**Cancellable**: :meth:`TransferQueue.discard` drops a key's waiting transfer;
:meth:`~TransferQueue.close` refuses new work and cancels every waiting transfer;
:meth:`~TransferQueue.abort` sets the stop event every running attempt receives (an upload
stopped so is never committed); :meth:`~TransferQueue.join` waits for the threads.

Example::

    q = TransferQueue(workers=1, name="ckptsync-upload")
    fut = q.submit(Transfer("run", lambda a: store.push(ckpt, stop=a.stop, fresh=a.first),
                            retry=lambda e: RetryPolicy(0.5, 30.0)))
    q.submit(Transfer("run", ...))   # a newer checkpoint: replaces the first if it waits
    fut.wait(60); q.close(); q.abort(); q.join(10)
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import CancelledError
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

from ckptsync.transfer.retry import RetryPolicy

__all__ = ["Attempt", "Outcome", "Transfer", "TransferFuture", "TransferQueue"]

log = logging.getLogger(__name__)

T = TypeVar("T")
Outcome = Literal["done", "failed", "superseded", "cancelled"]


def _never(exc: BaseException) -> RetryPolicy | None:
    return None


@dataclass(frozen=True)
class Attempt:
    """What one attempt of a transfer is told: its number (1 for the first) and the stop
    event it must check between chunks (set by :meth:`TransferQueue.abort`)."""

    number: int
    stop: threading.Event

    @property
    def first(self) -> bool:
        return self.number == 1


@dataclass(eq=False)
class Transfer(Generic[T]):
    """One unit of work for a :class:`TransferQueue`.

    Args:
        key: what it updates; a newer transfer of the same key supersedes a waiting one.
        run: the work, called once per attempt in a queue thread.
        name: what it is, for messages (a checkpoint name).
        retry: which policy retries a failed attempt's error (None: not retried).
        failed: called in the queue thread after each failed attempt with the transfer's
            future (``attempts`` counts that one), the error and the seconds until the key's
            next attempt (None: given up).
        item: the owner's data (the checkpoint it uploads), handed back through the future.
    """

    key: str
    run: Callable[[Attempt], T]
    name: str = ""
    retry: Callable[[BaseException], RetryPolicy | None] = _never
    failed: Callable[[TransferFuture[T], BaseException, float | None], None] | None = None
    item: Any = None


class TransferFuture(Generic[T]):
    """The outcome of one :class:`Transfer`: ``done`` (it succeeded), ``failed`` (its last
    attempt's error, not retried), ``superseded`` (a newer transfer of its key replaced it) or
    ``cancelled`` (discarded, or the queue closed, before it ran)."""

    def __init__(self, transfer: Transfer[T]) -> None:
        self.transfer = transfer
        self.attempts = 0
        self.outcome: Outcome | None = None
        self.error: BaseException | None = None
        self._value: T | None = None
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[TransferFuture[T]], None]] = []

    def done(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the transfer has an outcome; True if it has."""
        return self._event.wait(timeout)

    def result(self, timeout: float | None = None) -> T:
        """The transfer's value.

        Raises:
            TimeoutError: no outcome within ``timeout``.
            CancelledError: superseded or cancelled.
            BaseException: the error of its last attempt.
        """
        if not self._event.wait(timeout):
            raise TimeoutError(f"transfer {self.transfer.name or self.transfer.key} not done")
        if self.outcome in ("superseded", "cancelled"):
            raise CancelledError(f"{self.transfer.name or self.transfer.key}: {self.outcome}")
        if self.error is not None:
            raise self.error
        return self._value  # type: ignore[return-value]

    def add_done_callback(self, fn: Callable[[TransferFuture[T]], None]) -> None:
        """Call ``fn(self)`` once the transfer has an outcome (at once if it has one)."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    def _finish(self, outcome: Outcome, value: T | None = None,
                error: BaseException | None = None) -> None:
        with self._lock:
            if self._event.is_set():
                return
            self.outcome, self._value, self.error = outcome, value, error
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            try:
                fn(self)
            except Exception:  # a callback's bug must not kill a queue thread
                log.exception("a transfer callback of %s failed", self.transfer.name)


@dataclass
class _Waiting:
    future: TransferFuture[Any]
    not_before: float = 0.0


@dataclass
class _Keys:
    """What the queue holds, per key (guarded by the queue's condition)."""

    waiting: OrderedDict[str, _Waiting] = field(default_factory=OrderedDict)
    running: dict[str, TransferFuture[Any]] = field(default_factory=dict)
    streak: dict[str, int] = field(default_factory=dict)  # failed attempts in a row

    def next_ready(self, now: float) -> tuple[TransferFuture[Any] | None, float | None]:
        """The first waiting transfer that may start now, else when one may."""
        wake: float | None = None
        for key, w in self.waiting.items():
            if key in self.running:
                continue
            if w.not_before > now:
                wake = w.not_before if wake is None else min(wake, w.not_before)
                continue
            del self.waiting[key]
            self.running[key] = w.future
            return w.future, None
        return None, wake


class TransferQueue:
    """Runs :class:`Transfer` objects on ``workers`` threads: latest wins per key, failed
    attempts retried by the one :class:`RetryPolicy`; see the module doc.

    Args:
        workers: threads (started on the first submit; daemon threads).
        name: the threads' name prefix.
    """

    def __init__(self, workers: int = 1, *, name: str = "ckptsync-transfer") -> None:
        self.workers = max(1, workers)
        self.name = name
        self._cv = threading.Condition()
        self._keys = _Keys()
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._closed = False

    @property
    def stop(self) -> threading.Event:
        """The event every running attempt receives; set by :meth:`abort`."""
        return self._stop

    # ------------------------------------------------------------------ submitting
    def submit(self, transfer: Transfer[T]) -> TransferFuture[T]:
        """Queue ``transfer``; it replaces its key's waiting transfer, if any (that one is
        superseded), keeping that one's place in line and back-off. After :meth:`close` the
        returned future is cancelled at once."""
        fut: TransferFuture[T] = TransferFuture(transfer)
        old: _Waiting | None = None
        with self._cv:
            closed = self._closed
            if not closed:
                old = self._keys.waiting.get(transfer.key)
                self._keys.waiting[transfer.key] = _Waiting(
                    fut, old.not_before if old is not None else 0.0)
                self._start_threads()
                self._cv.notify()
        if old is not None:
            old.future._finish("superseded")
        if closed:
            fut._finish("cancelled")
        return fut

    def discard(self, key: str) -> TransferFuture[Any] | None:
        """Cancel ``key``'s waiting transfer (not a running one); return its future."""
        with self._cv:
            w = self._keys.waiting.pop(key, None)
            self._cv.notify_all()
        if w is None:
            return None
        w.future._finish("cancelled")
        return w.future

    # ------------------------------------------------------------------ looking
    def running(self) -> list[TransferFuture[Any]]:
        """The transfers running now."""
        with self._cv:
            return list(self._keys.running.values())

    def waiting(self) -> list[tuple[TransferFuture[Any], float]]:
        """The transfers waiting, in line order, each with the monotonic time before which
        it does not start (its key's back-off; 0 when none)."""
        with self._cv:
            return [(w.future, w.not_before) for w in self._keys.waiting.values()]

    def failures(self, key: str) -> int:
        """Failed attempts of ``key`` in a row (0 after a success)."""
        with self._cv:
            return self._keys.streak.get(key, 0)

    def idle(self) -> bool:
        """Nothing running, nothing waiting."""
        with self._cv:
            return not self._keys.waiting and not self._keys.running

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until :meth:`idle` (True) or ``timeout`` seconds passed (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while self._keys.waiting or self._keys.running:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(left)
            return True

    # ------------------------------------------------------------------ stopping
    def close(self) -> list[TransferFuture[Any]]:
        """Refuse new work and cancel every waiting transfer (returned); running ones go on
        (:meth:`abort` stops them). Idempotent."""
        with self._cv:
            self._closed = True
            waiting = [w.future for w in self._keys.waiting.values()]
            self._keys.waiting.clear()
            self._cv.notify_all()
        for fut in waiting:
            fut._finish("cancelled")
        return waiting

    def abort(self) -> None:
        """Set the stop event of every running attempt: each stops at its next check, and
        is not retried."""
        self._stop.set()
        with self._cv:
            self._cv.notify_all()

    def join(self, timeout: float | None = None) -> bool:
        """After :meth:`close`, wait for the threads; True when every one has ended."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in list(self._threads):
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    # ------------------------------------------------------------------ the threads
    def _start_threads(self) -> None:
        """Start a thread for the work waiting, up to ``workers`` (the lock is held)."""
        alive = [t for t in self._threads if t.is_alive()]
        if len(alive) >= min(self.workers, len(self._keys.waiting) + len(self._keys.running)):
            return
        t = threading.Thread(target=self._work, name=f"{self.name}-{len(self._threads)}",
                             daemon=True)
        self._threads.append(t)
        t.start()

    def _work(self) -> None:
        while True:
            with self._cv:
                fut: TransferFuture[Any] | None = None
                while fut is None:
                    if self._closed:
                        return
                    now = time.monotonic()
                    fut, wake = self._keys.next_ready(now)
                    if fut is None:
                        self._cv.wait(None if wake is None else wake - now)
            self._attempt(fut)

    def _attempt(self, fut: TransferFuture[Any]) -> None:
        t = fut.transfer
        fut.attempts += 1
        try:
            value = t.run(Attempt(fut.attempts, self._stop))
        except BaseException as e:  # every outcome reaches the future, whatever it is
            self._failed(fut, e)
            return
        with self._cv:
            del self._keys.running[t.key]
            self._keys.streak.pop(t.key, None)
            self._cv.notify_all()
        fut._finish("done", value)

    def _failed(self, fut: TransferFuture[Any], exc: BaseException) -> None:
        t = fut.transfer
        policy: RetryPolicy | None = None
        if not self._stop.is_set():
            try:
                policy = t.retry(exc)
            except Exception:
                log.exception("deciding whether to retry %s failed", t.name)
        delay: float | None = None
        superseded = False
        with self._cv:
            del self._keys.running[t.key]
            streak = self._keys.streak[t.key] = self._keys.streak.get(t.key, 0) + 1
            if policy is not None and not policy.exhausted(fut.attempts) and not self._closed:
                delay = policy.delay(streak)
                at = time.monotonic() + delay
                newer = self._keys.waiting.get(t.key)
                if newer is not None:  # the newer one goes instead, after the back-off
                    newer.not_before = max(newer.not_before, at)
                    superseded = True
                else:  # first in line: it is the oldest work there is
                    self._keys.waiting[t.key] = _Waiting(fut, at)
                    self._keys.waiting.move_to_end(t.key, last=False)
            self._cv.notify_all()
        if t.failed is not None:
            try:
                t.failed(fut, exc, delay)
            except Exception:
                log.exception("reporting the failure of %s failed", t.name)
        if delay is None:
            fut._finish("failed", error=exc)
        elif superseded:
            fut._finish("superseded", error=exc)
