"""Asynchronous saves: one background worker, a handle per save, errors never lost.

``Checkpointer.save`` snapshots tensors into reusable CPU buffers in the caller's thread, then
hands serialization, hashing, fsync and the commit to :class:`BackgroundWorker`. At most one
save is in flight: the buffers are reused, so the next save waits for the previous one
(back-pressure) rather than dropping it or overwriting buffers being written.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

from ckptsync.errors import ConfigError

__all__ = ["BackgroundWorker", "SaveHandle"]

log = logging.getLogger("ckptsync.snapshot")
T = TypeVar("T")


class SaveHandle(Generic[T]):
    """The result of one ``save``: ``wait()`` blocks until it is durable, ``done()`` polls.

    ``wait()`` / ``result()`` re-raise the background error, if any.

    Under ``torch.distributed`` a handle has a ``settle`` step: the collective that shares
    rank 0's commit outcome with every rank (see ``Checkpointer.save``). ``wait()`` runs it
    first, so it returns on every rank only once rank 0's commit is durable, with rank 0's
    manifest, and raises on every rank if the commit failed; it takes no ``timeout`` there (a
    rank that stopped waiting would leave the others in the collective). On ranks other than
    0, ``done()`` turns True only once the outcome was shared (by a collective ``wait``,
    ``save`` or ``close``).
    """

    def __init__(self, future: Future[T], name: str,
                 settle: Callable[[], object] | None = None) -> None:
        self._future = future
        self.name = name
        self._settle = settle

    @property
    def future(self) -> Future[T]:
        """The future the background save completes (with its manifest, or its error)."""
        return self._future

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout: float | None = None) -> T:
        if self._settle is not None:
            if timeout is not None:
                raise ConfigError(
                    "under torch.distributed a save handle's wait() is collective and takes "
                    "no timeout: call it without one on every rank")
            self._settle()  # raises on every rank if the commit failed
        try:
            return self._future.result(timeout)
        except BaseException:
            if self._future.done():
                self._future.delivered = True  # type: ignore[attr-defined]
            raise

    result = wait

    def __repr__(self) -> str:
        return f"SaveHandle({self.name!r}, done={self.done()})"


class BackgroundWorker:
    """A single background thread running one job at a time, with back-pressure.

    Errors of a job are delivered once: by its handle's ``wait()``, or, if nobody waited on it,
    by the next :meth:`submit`, :meth:`drain` or :meth:`close`.
    """

    def __init__(self, name: str = "ckptsync-save") -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._current: Future[object] | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._at_close: list[Callable[[], object]] = []

    def at_close(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` once :meth:`close` has stopped the thread (releases what jobs used)."""
        self._at_close.append(fn)

    def drain(self) -> None:
        """Wait for the in-flight job; raise its error if it failed and was not yet raised."""
        with self._lock:
            fut = self._current
        if fut is None:
            return
        try:
            exc = fut.exception()
            if exc is not None and not getattr(fut, "delivered", False):
                fut.delivered = True  # type: ignore[attr-defined]
                raise exc
        finally:
            # Delivered (or succeeded): never raise it twice.
            with self._lock:
                if self._current is fut:
                    self._current = None

    def submit(self, fn: Callable[[], T], name: str,
               settle: Callable[[], object] | None = None) -> SaveHandle[T]:
        if self._closed:
            raise RuntimeError("this checkpointer is closed")
        self.drain()
        fut: Future[T] = self._pool.submit(fn)
        with self._lock:
            self._current = fut  # type: ignore[assignment]
        return SaveHandle(fut, name, settle)

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.drain()
        finally:
            self._closed = True
            self._pool.shutdown(wait=True)
            for fn in self._at_close:
                fn()
