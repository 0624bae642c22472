"""Parallel, streaming, retried file transfers between a local directory and an fsspec filesystem.

Memory stays bounded: files are streamed in ``chunk_size`` pieces through the backend's file
object, whose buffer is ``block_size`` (for S3 that is the multipart part size, so a large
file becomes a multipart upload). At most ``max_workers`` files move at once, so at most about
``max_workers * (block_size + chunk_size)`` bytes are buffered, whatever the checkpoint's size.

On S3 a large file goes through :func:`upload_file_multipart` instead: its parts are read and
hashed in order by one thread and sent concurrently, at most ``parts_in_flight`` parts (shared by
every file of a push) held in memory at once. Large downloads fetch ranges in parallel the same
way (:func:`download_file_ranged`).

Every upload hashes what it reads and compares it with the local manifest (a local file changed
after its commit is never uploaded as if it were the committed one); every download writes
through the local store's hashing writer, refuses bytes past the listed size, and checks size
and digest (with the entry's algorithm) at the end. Retries (tenacity: exponential back-off
with full jitter) apply only to errors the translator marks retryable (a connection reset or a
body cut short mid-read among them); an upload restarts its file (a multipart upload only its
part), a download or a remote hash resumes at the offset it reached (a ranged download
refetches only its range).

This module does not know which backend it talks to; :mod:`ckptsync.remote` passes the
filesystem and the one function that translates backend exceptions.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeVar

import tenacity
from fsspec.spec import AbstractBufferedFile

from ckptsync.config import TransferConfig
from ckptsync.errors import CkptSyncError, CorruptCheckpointError, LocalStorageError, RemoteError
from ckptsync.local import HashingWriter
from ckptsync.manifest import WRITE_ALGO, FileEntry, new_hasher

__all__ = [
    "MultipartStream",
    "NullProgress",
    "Progress",
    "Retrier",
    "Slots",
    "TransferAborted",
    "Translate",
    "download_file",
    "download_file_ranged",
    "hash_remote_file",
    "is_s3fs",
    "run_parallel",
    "stopping",
    "upload_file",
    "upload_file_multipart",
]

log = logging.getLogger("ckptsync.transfer")

T = TypeVar("T")
Translate = Callable[[BaseException, str, str], CkptSyncError]
"""``translate(exc, url, action) -> CkptSyncError``: the one backend-exception boundary."""

# The stop event of the operation this thread works for (see :func:`stopping`).
_STOP: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar(
    "ckptsync_stop", default=None)


@contextlib.contextmanager
def stopping(stop: threading.Event | None) -> Iterator[None]:
    """Within the block, :meth:`Retrier.call` in this thread (and in the workers of
    :func:`run_parallel` started from it) ends its back-off as soon as ``stop`` is set, raising
    :class:`TransferAborted`, instead of sleeping out its retries."""
    token = _STOP.set(stop)
    try:
        yield
    finally:
        _STOP.reset(token)


class TransferAborted(RemoteError):
    """A transfer stopped because it was asked to (shutdown, or a sibling transfer failed).

    An aborted upload is never committed.
    """


class Progress(Protocol):
    """Receives byte counts from transfers; called from worker threads."""

    def start(self, total: int, description: str) -> None: ...

    def update(self, n: int) -> None: ...

    def close(self) -> None: ...


class NullProgress:
    """A progress sink that ignores everything (the default)."""

    def start(self, total: int, description: str) -> None:
        pass

    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, RemoteError) and exc.retryable and not isinstance(exc, TransferAborted)


class Retrier:
    """Runs a callable, translating backend exceptions and retrying the retryable ones.

    Args:
        config: attempts and back-off.
        translate: maps a backend exception to a :class:`CkptSyncError` (kept as ``__cause__``).
    """

    def __init__(self, config: TransferConfig, translate: Translate) -> None:
        self.config = config
        self.translate = translate

    def call(self, fn: Callable[[], T], *, url: str, action: str) -> T:
        """``fn()``, retried with back-off and jitter while it fails with a retryable error.

        Raises:
            CkptSyncError: the translated error of the last attempt.
        """

        def attempt() -> T:
            try:
                return fn()
            except CkptSyncError:
                raise
            except Exception as e:
                err = self.translate(e, url, action)
                # The translator may swap the cause for a stand-in without secrets in its text.
                raise err from (err.__cause__ or e)

        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.warning(
                "%s (attempt %d of %d); retrying", exc, state.attempt_number, self.config.retries
            )

        stop = _STOP.get()

        def sleep(seconds: float) -> None:
            if stop is None:
                time.sleep(seconds)
            elif stop.wait(seconds):
                raise TransferAborted(f"{action} {url} was stopped while backing off", url=url,
                                      retryable=False)

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.config.retries),
            wait=tenacity.wait_random_exponential(
                multiplier=self.config.backoff_initial, max=self.config.backoff_max
            ),
            retry=tenacity.retry_if_exception(_retryable),
            before_sleep=before_sleep,
            sleep=sleep,
            reraise=True,
        )
        return retrying(attempt)


def _check_stop(stop: threading.Event | None, url: str) -> None:
    if stop is not None and stop.is_set():
        raise TransferAborted(f"transfer of {url} was stopped", url=url, retryable=False)


def _abandon(f: Any) -> None:
    """Close a half-written remote file without committing it, where the backend allows."""
    try:
        if isinstance(f, AbstractBufferedFile):
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
) -> None:
    """Stream ``local_path`` to ``remote_path`` (multipart where the backend does it).

    ``finish``, if given, runs after the upload completed (e.g. renaming a temporary file
    into place on backends where a file being written is visible).

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
        with _open_local(local_path) as src:
            dst = fs.open(remote_path, "wb", block_size=config.block_size)
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
            dst.close()  # completes the upload (the last multipart part, the resumable PUT)
        if finish is not None:
            finish()

    retrier.call(attempt, url=url, action="upload to")


_botocore_lock = threading.Lock()
_botocore_session: Any = None


def _blocking_client(fs: Any, bucket: str, pool_size: int) -> Any:
    """A blocking botocore S3 client equivalent to ``fs``'s own (s3fs's async one).

    Same endpoint, region, botocore config and credentials: the ones the async client
    resolved (keys, profile, environment, role), frozen for the life of this client, which
    is one file's transfer (a temporary token that expires during it fails that transfer with
    an access error; the next push, e.g. the daemon's retry, gets fresh credentials). Raises
    whatever fails; the caller then keeps to s3fs.
    """
    import botocore.session
    from botocore.config import Config
    from fsspec.asyn import sync

    global _botocore_session

    async def resolve() -> tuple[Any, Any]:
        await fs.set_session()
        s3 = await fs.get_s3(bucket)
        creds = s3._get_credentials()
        return s3, (await creds.get_frozen_credentials() if creds is not None else None)

    s3, frozen = sync(fs.loop, resolve)
    options = {k: v for k, v in s3.meta.config._user_provided_options.items()
               if k in Config.OPTION_DEFAULTS}
    options["max_pool_connections"] = max(pool_size, options.get("max_pool_connections") or 0)
    kwargs: dict[str, Any] = {"region_name": s3.meta.region_name,
                              "config": Config(**options)}
    if fs.endpoint_url or fs.client_kwargs.get("endpoint_url"):
        kwargs["endpoint_url"] = s3.meta.endpoint_url
    if "verify" in fs.client_kwargs:
        kwargs["verify"] = fs.client_kwargs["verify"]
    if frozen is not None:
        kwargs.update(aws_access_key_id=frozen.access_key,
                      aws_secret_access_key=frozen.secret_key, aws_session_token=frozen.token)
    with _botocore_lock:  # botocore sessions are not thread-safe
        if _botocore_session is None:
            _botocore_session = botocore.session.get_session()
        return _botocore_session.create_client("s3", **kwargs)


def is_s3fs(fs: Any) -> bool:
    """Is ``fs`` an s3fs filesystem whose calls :class:`_BlockingS3` can mirror?"""
    return all(hasattr(fs, a) for a in ("_call_s3", "loop", "split_path",
                                        "_get_s3_method_kwargs"))


class _BlockingS3:
    """The bulk S3 calls for one object (``upload_part``, ranged ``get_object``), run in the
    caller's thread.

    s3fs runs every request on its one event-loop thread, and botocore and aiohttp do the
    per-byte work there: the payload sha256 that SigV4 signs over plain http, the CRC32
    checksum, copies of each body (and TLS over https). However many parts or ranges are in
    flight, that is one core for every byte moved. The bulk calls therefore go through a
    blocking botocore client built like s3fs's (:func:`_blocking_client`), from the transfer
    threads, which share that work between cores as boto3's transfer manager does. The few
    small calls (create, complete, abort) stay on s3fs. If the blocking client cannot be
    built, everything goes through s3fs. Backend errors come out as s3fs raises them
    (``translate_boto_error``), so both paths read the same to
    :func:`ckptsync.remote.translate_error`.
    """

    def __init__(self, fs: Any, remote_path: str, pool_size: int) -> None:
        self.fs = fs
        self.path = remote_path
        self.bucket, self.key, _ = fs.split_path(remote_path)
        self._client: Any = None
        try:
            self._client = _blocking_client(fs, self.bucket, pool_size)
        except Exception:
            log.debug("no blocking S3 client for %s; its transfer goes through s3fs",
                      remote_path, exc_info=True)

    def call(self, method: str, **kwargs: Any) -> Any:
        from fsspec.asyn import sync

        return sync(self.fs.loop, self.fs._call_s3, method, Bucket=self.bucket, Key=self.key,
                    **kwargs)

    def upload_part(self, **kwargs: Any) -> Any:
        if self._client is None:
            return self.call("upload_part", **kwargs)
        from botocore.exceptions import ClientError
        from s3fs.errors import translate_boto_error

        # s3fs's request-wide extras (SSE-C keys, RequestPayer) apply to every part.
        kw = self.fs._get_s3_method_kwargs(self._client.upload_part, Bucket=self.bucket,
                                           Key=self.key, **kwargs)
        try:
            return self._client.upload_part(**kw)
        except ClientError as e:
            raise translate_boto_error(e) from e

    def get_range(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the object (``end`` > ``start``)."""
        if self._client is None:
            return bytes(self.fs.cat_file(self.path, start=start, end=end))
        from botocore.exceptions import ClientError
        from s3fs.errors import translate_boto_error

        kw = self.fs._get_s3_method_kwargs(self._client.get_object, Bucket=self.bucket,
                                           Key=self.key, Range=f"bytes={start}-{end - 1}")
        try:
            body = self._client.get_object(**kw)["Body"]
            try:
                data: bytes = body.read()
            finally:
                body.close()
            return data
        except ClientError as e:
            raise translate_boto_error(e) from e

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def _read_into(src: Any, buf: bytearray) -> int:
    """Fill ``buf`` from ``src`` (``readinto``); the bytes read (short only at the end)."""
    view = memoryview(buf)
    n = 0
    while n < len(view):
        k = src.readinto(view[n:])
        if not k:
            break
        n += k
    return n


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


def _acquire(slots: threading.Semaphore, stop: threading.Event | None, url: str) -> None:
    while not slots.acquire(timeout=0.1):
        _check_stop(stop, url)


def upload_file_multipart(
    fs: Any,
    local_path: Path,
    remote_path: str,
    entry: FileEntry,
    *,
    url: str,
    config: TransferConfig,
    retrier: Retrier,
    slots: Slots,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Upload ``local_path`` to S3 as a multipart upload whose parts are sent concurrently.

    ``fs`` is an ``s3fs.S3FileSystem``. One thread reads the file in order, part by part,
    hashing every byte it reads; each part is then sent on a small pool (through
    :class:`_BlockingS3`), so hashing, reading and sending overlap. A part holds a slot of
    ``slots`` from before it is read until it is sent: memory is bounded by the slots, whatever the
    file's size. Each part is retried on its own. The upload is completed only when the bytes
    read hash to ``entry``; otherwise (or on any error, or ``stop``) it is aborted, so no
    object ever appears.

    Raises: as :func:`upload_file`.
    """
    progress = progress or NullProgress()
    part_size = max(config.part_size, -(-entry.size // 10_000))  # S3: at most 10,000 parts

    window = max(1, config.parts_in_flight)
    sender = _BlockingS3(fs, remote_path, window)
    call = sender.call

    try:
        upload_id: str = retrier.call(lambda: call("create_multipart_upload")["UploadId"],
                                      url=url, action="upload to")
    except BaseException:
        sender.close()
        raise
    reported = [0]  # bytes given to progress, taken back if the upload fails
    lock = threading.Lock()

    def put(number: int, data: bytes | bytearray, buf: bytearray | None) -> dict[str, Any]:
        try:
            def attempt() -> Any:
                _check_stop(stop, url)
                return sender.upload_part(PartNumber=number, UploadId=upload_id, Body=data)

            resp = retrier.call(attempt, url=url, action="upload to")
            progress.update(len(data))
            with lock:
                reported[0] += len(data)
            return {"PartNumber": number, "ETag": resp["ETag"]}
        finally:
            slots.sent(buf)

    digest = new_hasher(entry.algo)
    size = 0
    futures: list[Future[dict[str, Any]]] = []
    try:
        with _open_local(local_path) as src, ThreadPoolExecutor(
            max_workers=window, thread_name_prefix="ckptsync-part"
        ) as pool:
            try:
                while True:
                    _check_stop(stop, url)
                    failed = next((f for f in futures if f.done() and f.exception()), None)
                    if failed is not None:
                        failed.result()  # raises the part's error: fail fast
                    _acquire(slots, stop, url)
                    buf = slots.take(part_size)
                    try:
                        n = _read_into(src, buf)
                    except OSError as e:
                        slots.sent(buf)
                        raise LocalStorageError(
                            f"cannot read local checkpoint file {local_path}: {e.strerror or e}"
                        ) from e
                    if not n:
                        slots.sent(buf)
                        break
                    data, lent = slots.body(buf, n)
                    digest.update(data)
                    size += n
                    futures.append(pool.submit(put, len(futures) + 1, data, lent))
                    del data, buf, lent
                parts = [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        # The bytes sent are the bytes hashed: complete only if they are the committed ones.
        if size != entry.size or digest.hexdigest() != entry.digest:
            raise CorruptCheckpointError(
                f"{local_path}: content no longer matches its manifest (read {size} bytes, "
                f"expected {entry.size}); the file changed after its checkpoint was committed, "
                "so it is not uploaded",
                path=str(local_path),
            )
        complete_multipart(call, upload_id, parts, entry.size, url=url, retrier=retrier)
    except BaseException:
        with lock:
            progress.update(-reported[0])
        try:
            call("abort_multipart_upload", UploadId=upload_id)
        except Exception:  # best effort: gc aborts what is left
            log.debug("could not abort multipart upload of %s", url, exc_info=True)
        raise
    finally:
        sender.close()
        fs.invalidate_cache(remote_path)


def _multipart_etag(parts: list[dict[str, Any]]) -> str | None:
    """The ETag S3 gives the object a multipart upload of ``parts`` completes into."""
    try:
        digests = b"".join(bytes.fromhex(str(p["ETag"]).strip('"')) for p in parts)
    except ValueError:
        return None  # not MD5 part ETags (e.g. SSE-KMS): compare sizes only
    return f"{hashlib.md5(digests, usedforsecurity=False).hexdigest()}-{len(parts)}"


def complete_multipart(call: Callable[..., Any], upload_id: str | None,
                       parts: list[dict[str, Any]], size: int, *, url: str,
                       retrier: Retrier) -> None:
    """CompleteMultipartUpload, retried, with an ambiguous outcome resolved by reading the
    remote (DESIGN.md, "The daemon").

    A timeout or a reset can come after S3 completed the upload; a retry then gets NoSuchUpload
    (the upload is gone because it succeeded). So after any failed attempt, the object is
    looked up: when it is there with ``size`` bytes (and, where S3 computes it so, the ETag
    of exactly these parts), the upload completed and this returns; otherwise the attempt's
    error stands (and is retried where retryable).

    ``call(method, **kwargs)`` runs one S3 call on the object (Bucket and Key filled in).
    """
    expected = _multipart_etag(parts)

    def completed() -> bool:
        try:
            head = call("head_object")
        except Exception:  # not there (or unreadable): not known to be completed
            return False
        etag = str(head.get("ETag") or "").strip('"')
        if int(head.get("ContentLength", -1)) != size:
            return False
        return expected is None or "-" not in etag or etag == expected

    def attempt() -> None:
        try:
            call("complete_multipart_upload", UploadId=upload_id,
                 MultipartUpload={"Parts": parts})
        except Exception as e:
            if completed():
                log.info("completing the multipart upload of %s failed (%s: %s), but the "
                         "object is there, complete: the first attempt took effect", url,
                         type(e).__name__, e)
                return
            raise

    retrier.call(attempt, url=url, action="upload to")


class MultipartStream:
    """Uploads bytes to S3 as they are written: a parallel multipart upload fed by a writer.

    The checkpointer tees a file being serialized (and hashed, and written locally) into
    :meth:`write`, which copies it into a part buffer lent by ``slots``; every full
    ``part_size`` part is sent on a small pool at once, so
    serialization, hashing and upload overlap and the file is never read back. The multipart
    upload is created with the first full part (a smaller file is left to the normal upload).
    ``slots`` bound the parts held in memory; a full window makes :meth:`write` wait.
    :meth:`write` never raises: a failure marks the stream failed, and :meth:`finish` then
    returns False so that the caller uploads the committed file the normal way. Nothing is
    visible remotely until :meth:`finish` completes the upload; :meth:`abort` drops it.
    """

    def __init__(self, fs: Any, remote_path: str, *, url: str, config: TransferConfig,
                 retrier: Retrier, slots: Slots) -> None:
        self.fs = fs
        self.remote_path = remote_path
        self.url = url
        self.retrier = retrier
        self.slots = slots
        self.part_size = config.part_size
        self.size = 0
        self.error: BaseException | None = None
        # The part being filled (a buffer lent by ``slots``; its slot is taken only to send
        # it, so that streams waiting for their commit never hold the window) and its fill.
        self._part: bytearray | None = None
        self._fill = 0
        self._upload_id: str | None = None
        self._futures: list[Future[dict[str, Any]]] = []
        self._pool: ThreadPoolExecutor | None = None
        self._done = False
        self._window = max(1, config.parts_in_flight)
        self._sender: _BlockingS3 | None = None

    def _call(self, method: str, **kwargs: Any) -> Any:
        if self._sender is None:
            self._sender = _BlockingS3(self.fs, self.remote_path, self._window)
        return self._sender.call(method, **kwargs)

    def write(self, data: memoryview) -> None:
        if self.error is not None or self._done:
            return
        try:
            self.size += len(data)
            while len(data):
                if self._part is None:
                    self._part = self.slots.take(self.part_size)
                    self._fill = 0
                k = min(len(data), self.part_size - self._fill)
                self._part[self._fill:self._fill + k] = data[:k]  # the one copy of each byte
                self._fill += k
                data = data[k:]
                if self._fill == self.part_size:
                    part, self._part = self._part, None
                    self.slots.acquire()  # back-pressure: wait while the window is full
                    self._send(part, part)
        except BaseException as e:  # the local save must go on: fall back to a normal upload
            log.info("streaming upload of %s stopped, will upload after commit: %s", self.url, e)
            self.error = e
            self._drop_part()

    def _drop_part(self) -> None:
        if self._part is not None:
            self.slots.give(self._part)
            self._part = None

    def _send(self, data: bytes | bytearray, buf: bytearray | None) -> None:
        """Send one part; the caller holds its slot (and ``buf``), handed to the part here."""
        try:
            if self._upload_id is None:
                self._upload_id = self.retrier.call(
                    lambda: self._call("create_multipart_upload")["UploadId"], url=self.url,
                    action="upload to")
                self._pool = ThreadPoolExecutor(self._window,
                                                thread_name_prefix="ckptsync-stream")
            failed = next((f for f in self._futures if f.done() and f.exception()), None)
            if failed is not None:
                failed.result()
            assert self._pool is not None
            self._futures.append(self._pool.submit(self._put, len(self._futures) + 1, data,
                                                   buf))
        except BaseException:
            self.slots.sent(buf)
            raise

    def _put(self, number: int, data: bytes | bytearray,
             buf: bytearray | None) -> dict[str, Any]:
        try:
            assert self._sender is not None  # made by the create call
            sender = self._sender
            resp = self.retrier.call(
                lambda: sender.upload_part(PartNumber=number, UploadId=self._upload_id,
                                           Body=data),
                url=self.url, action="upload to")
            return {"PartNumber": number, "ETag": resp["ETag"]}
        finally:
            self.slots.sent(buf)

    def finish(self, entry: FileEntry, progress: Progress | None = None) -> bool:
        """Send the rest and complete the upload; True if ``remote_path`` now holds exactly the
        ``entry.size`` bytes written (the bytes hashed into ``entry``), False if the caller must
        upload the file itself."""
        if self._done:
            return False
        try:
            if self.error is not None or self._upload_id is None or self.size != entry.size:
                return False
            if self._part is not None:  # the short last part
                part, self._part = self._part, None
                self.slots.acquire()
                self._send(*self.slots.body(part, self._fill))
            parts = [f.result() for f in self._futures]
            complete_multipart(self._call, self._upload_id, parts, entry.size, url=self.url,
                               retrier=self.retrier)
            self._upload_id = None  # completed: nothing to abort
            if progress is not None:
                progress.update(entry.size)
            return True
        except BaseException as e:
            log.info("streaming upload of %s failed, uploading the file instead: %s", self.url, e)
            self.error = e
            return False
        finally:
            self.abort()

    def abort(self) -> None:
        """Drop the upload (idempotent); nothing becomes visible."""
        self._done = True
        self._drop_part()
        for f in self._futures:
            if f.cancel():  # it will never run to give back its slot (``slots`` outlives us)
                self.slots.release()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._upload_id is not None:
            upload_id, self._upload_id = self._upload_id, None
            try:
                self._call("abort_multipart_upload", UploadId=upload_id)
            except Exception:  # best effort: gc aborts what is left
                log.debug("could not abort multipart upload of %s", self.url, exc_info=True)
        if self._sender is not None:
            self._sender.close()
        self.fs.invalidate_cache(self.remote_path)


def _local_write(writer: HashingWriter, chunk: bytes) -> None:
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

    Raises: as :func:`download_file`.
    """
    progress = progress or NullProgress()
    bs = config.block_size
    ranges = [(o, min(o + bs, entry.size)) for o in range(0, entry.size, bs)]
    window = max(1, min(config.max_workers, len(ranges)))
    getter = _BlockingS3(fs, remote_path, window) if is_s3fs(fs) else None

    def fetch(start: int, end: int) -> bytes:
        def attempt() -> bytes:
            _check_stop(stop, url)
            try:
                if getter is not None:
                    return getter.get_range(start, end)
                return bytes(fs.cat_file(remote_path, start=start, end=end))
            except FileNotFoundError:
                raise CorruptCheckpointError(
                    f"{url}: file listed in the manifest is missing", path=url
                ) from None

        return retrier.call(attempt, url=url, action="download from")

    pending: deque[tuple[int, int, Future[bytes]]] = deque()
    next_range = 0
    # The client is closed after the pool has joined every fetch (exit order is reversed).
    with (contextlib.closing(getter) if getter is not None else contextlib.nullcontext()), \
            ThreadPoolExecutor(max_workers=window, thread_name_prefix="ckptsync-range") as pool:

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
                pending.append((start, end, pool.submit(fetch, start, end)))

        try:
            fill()
            while pending:
                start, end, fut = pending.popleft()
                try:
                    data = fut.result()
                finally:
                    slots.release()
                if len(data) != end - start:
                    raise CorruptCheckpointError(
                        f"{url}: file is shorter than the {entry.size} bytes its "
                        "manifest lists (truncated)",
                        path=url,
                    )
                _check_stop(stop, url)
                _local_write(writer, data)
                progress.update(len(data))
                del data
                fill()
        except BaseException:
            for _, _, fut in pending:
                fut.cancel()
            while pending:  # give back the slots of ranges that will never be written
                pending.popleft()
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
