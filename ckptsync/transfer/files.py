"""Plain file transfers through the public fsspec API, any backend: :func:`upload_file`,
:func:`download_file`, :func:`download_file_ranged` and :func:`hash_remote_file`.

Memory stays bounded: files are streamed in ``chunk_size`` pieces through the backend's file
object, whose buffer is ``block_size`` (for S3 that is the multipart part size, so a large
file becomes a multipart upload). At most ``max_workers`` files move at once, so at most about
``max_workers * (block_size + chunk_size)`` bytes are buffered, whatever the checkpoint's size.
Large downloads fetch ranges in parallel (:func:`download_file_ranged`; on s3fs through
:func:`ckptsync.transfer.s3.range_reader`).

Every upload hashes what it reads and compares it with the local manifest (a local file changed
after its commit is never uploaded as if it were the committed one); every download writes
through the local store's hashing writer, refuses bytes past the listed size, and checks size
and digest (with the entry's algorithm) at the end. An upload retries its whole file; a
download or a remote hash resumes at the offset it reached (a ranged download refetches only
its range).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

from fsspec.spec import AbstractBufferedFile

from ckptsync.config import TransferConfig
from ckptsync.errors import CorruptCheckpointError, LocalStorageError
from ckptsync.local import HashingWriter
from ckptsync.manifest import WRITE_ALGO, FileEntry, new_hasher
from ckptsync.progress import NullProgress, Progress
from ckptsync.transfer.checksums import checksum, checksum_field, encode
from ckptsync.transfer.gcs import crc32c_sender
from ckptsync.transfer.parallel import Slots
from ckptsync.transfer.retry import Retrier, _check_stop
from ckptsync.transfer.s3 import range_reader, single_put_extras

__all__ = ["download_file", "download_file_ranged", "hash_remote_file", "upload_file"]

log = logging.getLogger(__name__)


def _abandon(f: Any) -> None:
    """Close a half-written remote file without committing it, where the backend allows."""
    try:
        if callable(getattr(f, "abandon", None)):  # a stream wrapper (upload_file's ``wrap``)
            f.abandon()
        elif isinstance(f, AbstractBufferedFile):
            # Aborts the multipart/resumable upload (S3, GCS, Drive); nothing becomes visible.
            f.discard()
            f.closed = True
        else:
            f.close()  # local and memory files: a partial file, never listed in a manifest
    except Exception:  # best effort: gc collects what is left
        log.debug("could not abandon remote file cleanly", exc_info=True)


def _open_local(path: Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as e:
        raise LocalStorageError(
            f"cannot read local checkpoint file {path}: {e.strerror or e}; "
            "check that it exists and is readable"
        ) from e


def upload_file(
    fs: Any,
    local_path: Path,
    remote_path: str,
    entry: FileEntry,
    *,
    url: str,
    config: TransferConfig,
    retrier: Retrier,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    finish: Callable[[], None] | None = None,
    wrap: Callable[[Any], Any] | None = None,
) -> None:
    """Stream ``local_path`` to ``remote_path`` (multipart where the backend does it).

    ``finish``, if given, runs after the upload completed (e.g. renaming a temporary file
    into place on backends where a file being written is visible). ``wrap``, if given, wraps
    each attempt's remote file in a writer of the same shape (``write``, ``close``, and
    ``abandon`` to drop it): e.g. :meth:`ckptsync.crypto.KeyRing.encryptor`.

    The bytes read are hashed and must match ``entry`` (size and digest), otherwise the
    remote file is abandoned and :class:`CorruptCheckpointError` names the local file.

    Raises:
        RemoteError: the backend failed (after retries where retryable).
        LocalStorageError: the local file cannot be read.
        CorruptCheckpointError: the local file does not match its manifest.
        TransferAborted: ``stop`` was set.
    """
    progress = progress or NullProgress()

    def attempt() -> None:
        sent = 0
        digest = new_hasher(entry.algo)
        crc = 0
        with _open_local(local_path) as src:
            dst = fs.open(remote_path, "wb", block_size=config.block_size)
            try:
                # The backend's own checksum of a one-request upload, computed in this pass
                # over the bytes sent (so not where ``wrap`` encrypts them on the way: the GCM
                # tags and the stored digest guard those).
                small = entry.size < config.block_size
                extras = single_put_extras(dst) if wrap is None and small else None
                # GCS: the request that finalizes the upload carries the CRC32C
                # (transfer/gcs.py).
                crc32c = crc32c_sender(dst) if wrap is None else None
                if wrap is not None:
                    dst = wrap(dst)
            except BaseException:
                # An open writer left behind (s3fs's) hangs the interpreter's exit: abandon it.
                _abandon(dst)
                raise
            try:
                while True:
                    _check_stop(stop, url)
                    try:
                        chunk = src.read(config.chunk_size)
                    except OSError as e:
                        raise LocalStorageError(
                            f"cannot read local checkpoint file {local_path}: {e.strerror or e}"
                        ) from e
                    if not chunk:
                        break
                    dst.write(chunk)
                    digest.update(chunk)
                    if extras is not None:
                        crc = checksum(chunk, crc)
                    if crc32c is not None:
                        crc32c.update(chunk)
                    sent += len(chunk)
                    progress.update(len(chunk))
                if sent != entry.size or digest.hexdigest() != entry.digest:
                    raise CorruptCheckpointError(
                        f"{local_path}: content no longer matches its manifest (read {sent} "
                        f"bytes, expected {entry.size}); the file changed after its checkpoint "
                        "was committed, so it is not uploaded",
                        path=str(local_path),
                    )
            except BaseException:
                progress.update(-sent)
                _abandon(dst)
                raise
            if extras is not None and single_put_extras(dst) is extras:
                extras[checksum_field()] = encode(crc)  # the server refuses a damaged body
            if crc32c is not None:
                crc32c.seal()
            try:
                dst.close()  # completes the upload (the last multipart part, the resumable PUT)
            except Exception as e:
                # The reply to the request that finalized a GCS upload can be lost after the
                # object was made: ambiguous, so read the remote (DESIGN.md, "The daemon").
                if crc32c is None or not crc32c.landed(sent):
                    _abandon(dst)  # never left open: the interpreter's exit would wait on it
                    raise
                log.info("finishing the upload of %s failed (%s: %s), but the object is there "
                         "with the size and CRC32C sent: the upload took effect", url,
                         type(e).__name__, e)
            if crc32c is not None:
                crc32c.check()
        if finish is not None:
            finish()

    retrier.call(attempt, url=url, action="upload to")



def _local_write(writer: HashingWriter, chunk: bytes | memoryview) -> None:
    try:
        writer.write(chunk)
    except OSError as e:
        raise LocalStorageError(
            f"cannot write {writer.path}: {e.strerror or e}; free disk space or choose "
            "another directory"
        ) from e


def download_file(
    fs: Any,
    remote_path: str,
    writer: HashingWriter,
    entry: FileEntry,
    *,
    url: str,
    config: TransferConfig,
    retrier: Retrier,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Stream ``remote_path`` into ``writer``, never accepting more than ``entry.size`` bytes.

    A retry resumes at the offset already written. The caller checks the writer's digest
    (computed while writing) against ``entry`` when it closes the file.

    Raises:
        CorruptCheckpointError: the remote file is missing, longer or shorter than listed.
        RemoteError, LocalStorageError, TransferAborted: as for :func:`upload_file`.
    """
    progress = progress or NullProgress()
    done = 0

    def attempt() -> None:
        nonlocal done
        try:
            src = fs.open(remote_path, "rb", block_size=min(config.block_size, entry.size or 1))
        except FileNotFoundError:
            raise CorruptCheckpointError(
                f"{url}: file listed in the manifest is missing", path=url
            ) from None
        with src:
            if done:
                src.seek(done)
            while True:
                _check_stop(stop, url)
                # Ask for one byte past the listed size: a longer file is detected, not trusted.
                want = min(config.chunk_size, entry.size - done + 1)
                chunk = src.read(want)
                if not chunk:
                    break
                if done + len(chunk) > entry.size:
                    raise CorruptCheckpointError(
                        f"{url}: file is larger than the {entry.size} bytes its manifest lists",
                        path=url,
                    )
                _local_write(writer, chunk)
                done += len(chunk)
                progress.update(len(chunk))
        if done != entry.size:
            raise CorruptCheckpointError(
                f"{url}: file has {done} bytes, its manifest lists {entry.size} (truncated)",
                path=url,
            )

    retrier.call(attempt, url=url, action="download from")


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
) -> None:
    """Like :func:`download_file`, fetching ``block_size`` ranges in parallel.

    Ranges are requested in order and written (and hashed) in order; ``slots`` bounds the
    blocks held in memory across every file of a transfer. A slot is taken before a range is
    requested, in order, so the oldest unwritten range of each file always holds one: no
    deadlock. Each range is retried on its own. The caller has checked the listed size.

    On S3 each range is read into a buffer reused from range to range (``slots``' own where
    it is a :class:`~ckptsync.transfer.parallel.Slots`, kept across the files of a transfer;
    else this file's): no fresh 32 MiB allocation, whose pages the kernel faults in and
    zeroes, per range.

    Raises: as :func:`download_file`.
    """
    progress = progress or NullProgress()
    bs = config.block_size
    ranges = [(o, min(o + bs, entry.size)) for o in range(0, entry.size, bs)]
    window = max(1, min(config.max_workers, len(ranges)))
    pending: deque[tuple[int, int, bytearray, Future[memoryview | bytes]]] = deque()
    next_range = 0
    buffers = _Buffers(slots)
    # The reader is closed after the pool has joined every fetch (exit order is reversed).
    with range_reader(fs, remote_path, window) as read_range, \
            ThreadPoolExecutor(max_workers=window, thread_name_prefix="ckptsync-range") as pool:

        def fetch(start: int, end: int, buf: bytearray) -> memoryview | bytes:
            def attempt() -> memoryview | bytes:
                _check_stop(stop, url)
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
                    _check_stop(stop, url)
                    _local_write(writer, data)
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


def hash_remote_file(
    fs: Any,
    remote_path: str,
    *,
    url: str,
    config: TransferConfig,
    retrier: Retrier,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    algo: str = WRITE_ALGO,
) -> tuple[int, str]:
    """``(size, hex digest under algo)`` of a remote file, streamed (bounded memory).

    A retry resumes at the offset already hashed (the digest carries on), as downloads do.
    """
    progress = progress or NullProgress()
    digest = new_hasher(algo)
    size = 0

    def attempt() -> tuple[int, str]:
        nonlocal size
        try:
            with fs.open(remote_path, "rb", block_size=config.block_size) as src:
                if size:
                    src.seek(size)
                while True:
                    _check_stop(stop, url)
                    chunk = src.read(config.chunk_size)
                    if not chunk:
                        break
                    digest.update(chunk)
                    size += len(chunk)
                    progress.update(len(chunk))
        except FileNotFoundError:
            raise CorruptCheckpointError(
                f"{url}: file listed in the manifest is missing", path=url
            ) from None
        return size, digest.hexdigest()

    return retrier.call(attempt, url=url, action="read")

