"""Plain file transfers through the public fsspec API, any backend: :func:`upload_file`,
:func:`download_file` and :func:`hash_remote_file` (large downloads in parallel ranges:
:mod:`ckptsync.transfer.ranged`).

Memory stays bounded: files are streamed in ``chunk_size`` pieces through the backend's file
object, whose buffer is ``block_size`` (for S3 that is the multipart part size, so a large
file becomes a multipart upload). At most ``max_workers`` files move at once, so at most about
``max_workers * (block_size + chunk_size)`` bytes are buffered, whatever the checkpoint's size.

Where the backend keeps a checksum of its own (S3, GCS), an upload declares it: the caller
passes the backend's :data:`BodyChecks` (:meth:`ckptsync.remote.backends.Backend.body_check`),
which gets each chunk in the pass that reads it; nothing here knows which backend it is.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from fsspec.spec import AbstractBufferedFile

from ckptsync.config import TransferConfig
from ckptsync.errors import CorruptCheckpointError, LocalStorageError
from ckptsync.local import HashingWriter
from ckptsync.manifest import WRITE_ALGO, FileEntry, new_hasher
from ckptsync.progress import NullProgress, Progress
from ckptsync.transfer.checksums import Buffer
from ckptsync.transfer.retry import Retrier, check_stop

__all__ = ["BodyCheck", "BodyChecks", "download_file", "hash_remote_file", "local_write",
           "open_local", "upload_file"]

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


class BodyCheck(Protocol):
    """The backend's own checksum of one upload through a file it opened, which the server
    checks (so that bytes damaged in transit never become an object)."""

    def update(self, chunk: Buffer) -> None:
        """Carry the checksum on over ``chunk`` (the next bytes written, in order)."""

    def seal(self) -> None:
        """The last chunk was written: fix the checksum before the close sends it."""

    def landed(self, size: int) -> bool:
        """The close that completes the upload failed: did the upload take effect anyway,
        with these ``size`` bytes? (Read from the remote; False when unknown.)"""

    def check(self) -> None:
        """After the close: whatever the backend verifies once the upload completed."""


BodyChecks = Callable[[Any, int], "BodyCheck | None"]
"""``body_check(f, size)``: the :class:`BodyCheck` of an upload of ``size`` bytes through
``f``, a file the backend just opened for writing; None where it declares no checksum."""


def open_local(path: Path) -> BinaryIO:
    """``path`` opened for reading, or :class:`LocalStorageError` naming it."""
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
    body_check: BodyChecks | None = None,
) -> None:
    """Stream ``local_path`` to ``remote_path`` (multipart where the backend does it).

    ``finish``, if given, runs after the upload completed (e.g. renaming a temporary file
    into place on backends where a file being written is visible). ``wrap``, if given, wraps
    each attempt's remote file in a writer of the same shape (``write``, ``close``, and
    ``abandon`` to drop it): e.g. :meth:`ckptsync.crypto.KeyRing.encryptor`. ``body_check``:
    the backend's checksum of the bytes sent (not where ``wrap`` changes them on the way: the
    GCM tags and the stored digest guard those).

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
        with open_local(local_path) as src:
            dst = fs.open(remote_path, "wb", block_size=config.block_size)
            try:
                # The backend's own checksum, computed in this pass over the bytes sent (not
                # where ``wrap`` encrypts them on the way: the GCM tags and the stored digest
                # guard those).
                check = body_check(dst, entry.size) if body_check and wrap is None else None
                if wrap is not None:
                    dst = wrap(dst)
            except BaseException:
                # An open writer left behind (s3fs's) hangs the interpreter's exit: abandon it.
                _abandon(dst)
                raise
            try:
                while True:
                    check_stop(stop, url)
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
                    if check is not None:
                        check.update(chunk)
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
            if check is not None:
                check.seal()  # the server refuses a damaged body
            try:
                dst.close()  # completes the upload (the last multipart part, the resumable PUT)
            except Exception as e:
                # The reply to the request that finalized the upload can be lost after the
                # object was made: ambiguous, so read the remote (DESIGN.md, "The daemon").
                if check is None or not check.landed(sent):
                    _abandon(dst)  # never left open: the interpreter's exit would wait on it
                    raise
                log.info("finishing the upload of %s failed (%s: %s), but the object is there "
                         "with the size and checksum sent: the upload took effect", url,
                         type(e).__name__, e)
            if check is not None:
                check.check()
        if finish is not None:
            finish()

    retrier.call(attempt, url=url, action="upload to")


def local_write(writer: HashingWriter, chunk: bytes | memoryview) -> None:
    """``chunk`` into ``writer``, or :class:`LocalStorageError` naming its file."""
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
                check_stop(stop, url)
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
                local_write(writer, chunk)
                done += len(chunk)
                progress.update(len(chunk))
        if done != entry.size:
            raise CorruptCheckpointError(
                f"{url}: file has {done} bytes, its manifest lists {entry.size} (truncated)",
                path=url,
            )

    retrier.call(attempt, url=url, action="download from")


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
                    check_stop(stop, url)
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

