"""Bounded concurrency for transfers: :func:`run_parallel` (a thread pool that stops every
task on the first failure) and :class:`Slots` (the multipart part buffers held at once).
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import TypeVar

from ckptsync.transfer.retry import TransferAborted, check_stop

__all__ = ["Slots", "run_parallel", "wait_for_slot"]

T = TypeVar("T")


class Slots(threading.BoundedSemaphore):
    """At most ``value`` multipart parts held at once, and the part buffers themselves, reused
    (by :func:`upload_file_multipart` and :class:`MultipartStream`).

    A part being sent holds a slot and its buffer until it is sent, so at most ``value``
    buffers are in flight (plus, in :class:`MultipartStream`, the one each stream is
    filling); at most ``value`` are kept for reuse, until the owner drops its ``Slots``.

    Why reuse: a fresh 16 MiB ``bytes`` per part is a fresh mapping from the kernel whose
    pages are faulted in and zeroed every time (reading 1 GiB into fresh 32 MiB ``bytes``:
    0.65 CPU-s here; into one reused buffer: 0.17 CPU-s). Downloads do not use the buffers:
    urllib3's ``readinto`` is ``read`` plus a copy.
    """

    def __init__(self, value: int = 1) -> None:
        super().__init__(value)
        self._keep = value
        self._free: list[bytearray] = []
        self._free_lock = threading.Lock()

    def take(self, size: int) -> bytearray:
        """A buffer of exactly ``size`` bytes (contents undefined)."""
        with self._free_lock:
            buf = self._free.pop() if self._free else None
        # Another size (a file over 160 GB has larger parts): that buffer is let go.
        return buf if buf is not None and len(buf) == size else bytearray(size)

    def give(self, buf: bytearray) -> None:
        with self._free_lock:
            if len(self._free) < self._keep:
                self._free.append(buf)

    def body(self, buf: bytearray, n: int) -> tuple[bytes | bytearray, bytearray | None]:
        """What to send for a part of ``n`` bytes in ``buf``, and the buffer to hand to
        :meth:`sent`. botocore takes bytes or bytearray, not a view: a short (last) part is
        copied out, once per file, and its buffer given back at once."""
        if n == len(buf):
            return buf, buf
        data = bytes(memoryview(buf)[:n])
        self.give(buf)
        return data, None

    def sent(self, buf: bytearray | None) -> None:
        """A part is done (sent, failed or dropped): its buffer back, then its slot."""
        if buf is not None:
            self.give(buf)
        self.release()


def wait_for_slot(slots: threading.Semaphore, stop: threading.Event | None, url: str) -> None:
    """Take a slot of ``slots``, waiting as long as it takes unless ``stop`` is set
    (:class:`~ckptsync.transfer.retry.TransferAborted`, naming ``url``)."""
    while not slots.acquire(timeout=0.1):
        check_stop(stop, url)


def run_parallel(
    tasks: Sequence[Callable[[threading.Event], T]],
    *,
    max_workers: int,
    stop: threading.Event | None = None,
) -> list[T]:
    """Run ``tasks`` on a bounded thread pool; results in task order.

    Each task receives an event it must check between chunks. On the first failure (or
    when ``stop`` is set) the event is set, queued tasks are cancelled, running ones stop
    at their next chunk, and the first real error is raised once every thread has finished:
    no transfer outlives the call.
    """
    if not tasks:
        return []
    abort = threading.Event()
    watcher: threading.Thread | None = None
    done_evt = threading.Event()
    if stop is not None:

        def relay() -> None:
            while not done_evt.wait(0.05):
                if stop.is_set():
                    abort.set()
                    return

        watcher = threading.Thread(target=relay, name="ckptsync-stop-relay", daemon=True)
        watcher.start()
    try:
        with ThreadPoolExecutor(
            max_workers=max(1, min(max_workers, len(tasks))),
            thread_name_prefix="ckptsync-transfer",
        ) as pool:
            # Each worker sees the caller's context (its :func:`stopping` event).
            futures: list[Future[T]] = [pool.submit(contextvars.copy_context().run, task, abort)
                                        for task in tasks]
            try:
                _, pending = wait(futures, return_when=FIRST_EXCEPTION)
            except BaseException:  # KeyboardInterrupt: stop the workers before waiting on them
                abort.set()
                for f in futures:
                    f.cancel()
                raise
            if pending:
                abort.set()
                for f in pending:
                    f.cancel()
        errors = [
            f.exception() for f in futures if not f.cancelled() and f.exception() is not None
        ]
        if errors:
            # The root cause, not the sibling transfers it aborted.
            real = [e for e in errors if not isinstance(e, TransferAborted)]
            raise (real or errors)[0]  # type: ignore[misc]
        return [f.result() for f in futures]
    finally:
        done_evt.set()
        if watcher is not None:
            watcher.join()
