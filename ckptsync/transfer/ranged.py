"""Large downloads in parallel ranges: :func:`download_file_ranged`.

Ranges are fetched on a small pool and written (and hashed) in order, each retried on its own;
the blocks held in memory are bounded by the transfer's slots. How one range is read is the
backend's (:data:`OpenRanges`): S3 reads it through its blocking client into a reused buffer
(:mod:`ckptsync.remote.backends.s3`), any other backend through the public ``fs.cat_file``
(:func:`public_ranges`).
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Any

from ckptsync.config import TransferConfig
from ckptsync.errors import CorruptCheckpointError
from ckptsync.local import HashingWriter
from ckptsync.manifest import FileEntry
from ckptsync.progress import NullProgress, Progress
from ckptsync.transfer.files import local_write
from ckptsync.transfer.parallel import Slots
from ckptsync.transfer.retry import Retrier, check_stop

__all__ = ["OpenRanges", "RangeReader", "download_file_ranged", "public_ranges"]

RangeReader = Callable[[int, int, bytearray], "memoryview | bytes"]
"""``read(start, end, buf)``: bytes ``[start, end)`` of one remote file (fewer where it ends
first), read into ``buf`` (at least ``end - start`` long) where the backend allows (a view of
``buf`` is returned), else as fresh ``bytes``."""

OpenRanges = Callable[[str, int], AbstractContextManager[RangeReader]]
"""``open_ranges(remote_path, threads)``: a :data:`RangeReader` of one file, for up to
``threads`` threads at once, for as long as the context lasts."""


@contextlib.contextmanager
def public_ranges(fs: Any, remote_path: str) -> Iterator[RangeReader]:
    """A :data:`RangeReader` through ``fs.cat_file`` (fresh ``bytes`` per range)."""
    yield lambda start, end, _buf: bytes(fs.cat_file(remote_path, start=start, end=end))


def download_file_ranged(
    fs: Any,
    remote_path: str,
    writer: HashingWriter,
    entry: FileEntry,
    *,
    url: str,
    config: TransferConfig,
    retrier: Retrier,
    slots: threading.Semaphore,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    open_ranges: OpenRanges | None = None,
) -> None:
    """Like :func:`~ckptsync.transfer.files.download_file`, fetching ``block_size`` ranges
    in parallel, each read by ``open_ranges``' reader (the backend's:
    :meth:`ckptsync.remote.backends.Backend.open_ranges`; by default ``fs.cat_file``).

    Ranges are requested in order and written (and hashed) in order; ``slots`` bounds the
    blocks held in memory across every file of a transfer. A slot is taken before a range is
    requested, in order, so the oldest unwritten range of each file always holds one: no
    deadlock. Each range is retried on its own. The caller has checked the listed size.

    Where the reader can (S3), each range is read into a buffer reused from range to range
    (``slots``' own where it is a :class:`~ckptsync.transfer.parallel.Slots`, kept across the
    files of a transfer; else this file's): no fresh 32 MiB allocation, whose pages the
    kernel faults in and zeroes, per range.

    Raises: as :func:`~ckptsync.transfer.files.download_file`.
    """
    progress = progress or NullProgress()
    bs = config.block_size
    ranges = [(o, min(o + bs, entry.size)) for o in range(0, entry.size, bs)]
    window = max(1, min(config.max_workers, len(ranges)))
    pending: deque[tuple[int, int, bytearray, Future[memoryview | bytes]]] = deque()
    next_range = 0
    buffers = _Buffers(slots)
    # The reader is closed after the pool has joined every fetch (exit order is reversed).
    opened = open_ranges(remote_path, window) if open_ranges else public_ranges(fs, remote_path)
    with opened as read_range, \
            ThreadPoolExecutor(max_workers=window, thread_name_prefix="ckptsync-range") as pool:

        def fetch(start: int, end: int, buf: bytearray) -> memoryview | bytes:
            def attempt() -> memoryview | bytes:
                check_stop(stop, url)
                try:
                    return read_range(start, end, buf)
                except FileNotFoundError:
                    raise CorruptCheckpointError(
                        f"{url}: file listed in the manifest is missing", path=url
                    ) from None

            return retrier.call(attempt, url=url, action="download from")

        def fill() -> None:
            # Block for a slot only while holding none: every slot holder then has a
            # range in flight and releases it when written, so the transfer as a whole
            # always advances.
            nonlocal next_range
            while len(pending) < window and next_range < len(ranges):
                if not slots.acquire(blocking=not pending):
                    return
                start, end = ranges[next_range]
                next_range += 1
                buf = buffers.take(bs)
                pending.append((start, end, buf, pool.submit(fetch, start, end, buf)))

        try:
            fill()
            while pending:
                start, end, buf, fut = pending.popleft()
                try:
                    data = fut.result()
                except BaseException:
                    buffers.give(buf)
                    slots.release()
                    raise
                if len(data) != end - start:
                    buffers.give(buf)
                    slots.release()
                    raise CorruptCheckpointError(
                        f"{url}: file is shorter than the {entry.size} bytes its "
                        "manifest lists (truncated)",
                        path=url,
                    )
                try:
                    check_stop(stop, url)
                    local_write(writer, data)
                finally:
                    del data
                    buffers.give(buf)
                    slots.release()
                progress.update(end - start)
                fill()
        except BaseException:
            for _, _, _, fut in pending:
                fut.cancel()
            while pending:  # give back the slots of ranges that will never be written
                _, _, buf, fut = pending.popleft()
                if fut.cancelled() or fut.done():  # a running fetch still fills its buffer
                    buffers.give(buf)
                slots.release()
            raise

    # The listing said entry.size; make sure the content does not go on past it.
    def probe() -> bytes:
        try:
            return bytes(fs.cat_file(remote_path, start=entry.size, end=entry.size + 1))
        except Exception as e:
            # S3 and GCS answer 416 (s3fs: OSError EINVAL) for a range past the end: good.
            if getattr(e, "code", None) == 416 or "not satisfiable" in str(e):
                return b""
            raise

    tail = retrier.call(probe, url=url, action="download from")
    if tail:
        raise CorruptCheckpointError(
            f"{url}: file is larger than the {entry.size} bytes its manifest lists", path=url
        )


class _Buffers:
    """The buffers a ranged download reads into: those ``slots`` keeps for reuse where it is
    a :class:`Slots` (shared by every file of one transfer), else this file's own list."""

    def __init__(self, slots: threading.Semaphore) -> None:
        self._slots = slots if isinstance(slots, Slots) else None
        self._free: list[bytearray] = []

    def take(self, size: int) -> bytearray:
        if self._slots is not None:
            return self._slots.take(size)
        return self._free.pop() if self._free else bytearray(size)

    def give(self, buf: bytearray) -> None:
        if self._slots is not None:
            self._slots.give(buf)
        else:
            self._free.append(buf)
