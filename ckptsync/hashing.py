"""Hashing while writing, and hashing a file back: the digests a manifest records.

:class:`HashingWriter` computes a file's size and digest as it is written (never by reading it
back), hashing large writes on a helper thread, and hands dirty pages to the disk as it goes
(``sync_file_range``) so that the fsync at close waits for the tail only. :func:`hash_file`
and :func:`open_verified` hash a file already on disk. :class:`WriteOps` holds the file system
calls a writer makes (a fault seam: :class:`ckptsync.local.FileOps` extends it).
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, BinaryIO

from ckptsync.errors import CorruptCheckpointError
from ckptsync.manifest import WRITE_ALGO, FileEntry, new_hasher

__all__ = ["CHUNK", "WRITEBACK_BYTES", "HashingWriter", "WriteOps", "hash_file", "open_verified"]

CHUNK = 8 * 1024 * 1024
# A HashingWriter asks the kernel to start writing its pages to disk every this many bytes, so
# that the fsync at close waits for the tail, not for the whole file (see WriteOps.writeback).
WRITEBACK_BYTES = 16 * 1024 * 1024
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of dirty pages, do not wait
# A HashingWriter hashes writes of at least this many bytes on a helper thread while it writes
# them (see HashingWriter.write); smaller ones (zip headers, pickles) inline.
PARALLEL_HASH_BYTES = 1024 * 1024


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range`` (Linux only; Python's os module does not wrap it). Looked up
    in the running interpreter, which links libc: ``ctypes.util.find_library`` would spawn
    ``ldconfig`` at every import of this module (~20 ms)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SFR = _sync_file_range()


class WriteOps:
    """The file system calls a :class:`HashingWriter` makes. Subclass to inject faults."""

    def open_write(self, path: Path) -> BinaryIO:
        return open(path, "xb")

    def write(self, f: BinaryIO, data: Any) -> int:
        return f.write(data)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def writeback(self, fd: int, offset: int, nbytes: int) -> bool:
        """Start writing ``[offset, offset + nbytes)`` to disk without waiting for it.

        Linux keeps up to ``dirty_background_ratio`` of RAM (gigabytes) dirty before it
        writes anything back, so without this a 1 GB file is written to disk only by the
        fsync at close, after the last byte: ~0.6 s here on every save and every pull. This
        overlaps that disk write with serialization or download instead. The fsync still
        guarantees durability; this only moves work earlier. Returns False when unsupported
        (not Linux, or a file system that refuses it): the caller stops asking.
        """
        if _SFR is None:
            return False
        # Non-zero: EIO/ENOSPC are reported again by the fsync at close, with the path;
        # ESPIPE, EINVAL, ENOSYS: this file system does not do it. Either way, stop asking.
        return _SFR(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE) == 0

class HashingWriter:
    """A binary file opened for writing that computes size and digest as bytes go through.

    The hash (``algo``: BLAKE3 unless a pull keeps a ``ckptsync/1`` checkpoint's sha256) is
    computed while writing, never by reading the file back. ``close()`` flushes and fsyncs.
    Usable wherever a writable binary file object is expected (``torch.save``).
    """

    def __init__(self, path: Path, ops: WriteOps | None = None, algo: str = WRITE_ALGO) -> None:
        self.path = path
        self.algo = algo
        self._hash = new_hasher(algo)
        self._ops = ops or WriteOps()
        self._f = self._ops.open_write(path)
        self.size = 0
        self.closed = False
        self.error: OSError | None = None
        # Also given every byte once written and hashed (the checkpointer streams large files
        # to the remote while they are serialized); must not raise.
        self.tee: Callable[[memoryview], None] | None = None
        self._written_back = 0  # bytes handed to WriteOps.writeback so far; -1: unsupported
        self._hasher: ThreadPoolExecutor | None = None  # started by the first large write

    def write(self, data: Any) -> int:
        """Write, hash and tee ``data``; returns once all three are done with it.

        A large write is hashed on a helper thread while this one writes it (and tees it):
        hashing is a large part of the CPU of a save, and split over two threads it slows both of a
        two-thread training loop's threads alike, instead of stopping one of them while the
        other waits for it. Hashes stay in order: each write waits for its hash.
        """
        mv = memoryview(data).cast("B")
        if len(mv) < PARALLEL_HASH_BYTES:
            self._write_all(mv)
            self._hash.update(mv)
            self._wrote(mv)
            return len(mv)
        if self._hasher is None:
            self._hasher = ThreadPoolExecutor(1, thread_name_prefix="ckptsync-hash")
        hashed = self._hasher.submit(self._hash.update, mv)
        try:
            self._write_all(mv)
            self._wrote(mv)
        finally:
            hashed.result()  # the caller may reuse its buffer once this returns
        return len(mv)

    def _wrote(self, mv: memoryview) -> None:
        self.size += len(mv)
        if self._written_back >= 0 and self.size - self._written_back >= WRITEBACK_BYTES:
            self._start_writeback()
        if self.tee is not None:
            self.tee(mv)

    def _write_all(self, mv: memoryview) -> None:
        try:
            n = self._ops.write(self._f, mv)
            if n is None:
                n = len(mv)
            rest = mv[n:]
            while len(rest):  # raw short write: finish it
                k = self._ops.write(self._f, rest)
                rest = rest[k:]
        except OSError as e:
            # Kept so that a caller whose library wraps the error (torch.save raises a
            # RuntimeError) can still report the real cause: no space, no permission.
            self.error = e
            raise

    def _start_writeback(self) -> None:
        try:
            self._f.flush()  # the buffered tail must reach the kernel first
            ok = self._ops.writeback(self._f.fileno(), self._written_back,
                                     self.size - self._written_back)
        except OSError as e:
            self.error = e
            raise
        self._written_back = self.size if ok else -1

    def flush(self) -> None:
        self._f.flush()

    def fileno(self) -> int:
        """The file descriptor being written (for a caller that must hand one on)."""
        return self._f.fileno()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self.size

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._f.flush()
            self._ops.fsync(self._f.fileno())
        finally:
            self._f.close()
            self._stop_hasher()
            self.closed = True

    def abort(self) -> None:
        try:
            self._f.close()
        finally:
            self._stop_hasher()
            self.closed = True

    def _stop_hasher(self) -> None:
        if self._hasher is not None:
            self._hasher.shutdown(wait=False)  # idle: every write waited for its hash
            self._hasher = None

    def entry(self, relpath: str) -> FileEntry:
        return FileEntry(relpath, self.size, self.algo, self._hash.hexdigest())

    def __enter__(self) -> HashingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:
            self.abort()


def hash_file(path: Path | str, chunk: int = CHUNK, algo: str = WRITE_ALGO) -> tuple[int, str]:
    """``(size, hex digest under algo)`` of a file, read in chunks (bounded memory)."""
    h = new_hasher(algo)
    size = 0
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
            size += len(b)
    return size, h.hexdigest()

def open_verified(path: Path, entry: FileEntry) -> IO[bytes]:
    """Open a checkpoint file after checking its size and digest against ``entry``."""
    size, digest = hash_file(path, algo=entry.algo)
    if size != entry.size or digest != entry.digest:
        raise CorruptCheckpointError(
            f"{path}: content does not match the manifest (size {size}, expected {entry.size})",
            path=str(path),
        )
    return open(path, "rb")
