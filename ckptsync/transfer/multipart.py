"""S3 multipart uploads whose parts are sent concurrently: one state machine
(:class:`MultipartUpload`) and its two drivers, :func:`upload_file_multipart` (a committed
local file) and :class:`MultipartStream` (a file while it is being written).

Parts are read (or written) and hashed in order by one thread and sent on a small pool, at
most ``parts_in_flight`` parts (shared by every file of a push, :class:`Slots`) held in memory
at once. Each part is retried on its own. Nothing is visible remotely until the upload is
completed, and it is completed only when the bytes sent hash to the manifest's entry;
otherwise (or on any error, or a stop) it is aborted. When s3fs's private API fails
(:class:`~ckptsync.transfer.s3.S3ApiChanged`, warned about once), the file goes up through
the public fsspec API instead (:func:`~ckptsync.transfer.files.upload_file`).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ckptsync.config import TransferConfig
from ckptsync.errors import CorruptCheckpointError, LocalStorageError
from ckptsync.manifest import FileEntry, new_hasher
from ckptsync.progress import NullProgress, Progress
from ckptsync.transfer.checksums import PartChecksums, checksum, full_object_args
from ckptsync.transfer.files import _open_local, upload_file
from ckptsync.transfer.parallel import Slots, _acquire
from ckptsync.transfer.retry import Retrier, _check_stop
from ckptsync.transfer.s3 import S3ApiChanged, _BlockingS3, fallen_back, private_api_usable

__all__ = ["MultipartStream", "MultipartUpload", "complete_multipart", "upload_file_multipart"]

log = logging.getLogger(__name__)


def _multipart_etag(parts: list[dict[str, Any]]) -> str | None:
    """The ETag S3 gives the object a multipart upload of ``parts`` completes into."""
    try:
        digests = b"".join(bytes.fromhex(str(p["ETag"]).strip('"')) for p in parts)
    except ValueError:
        return None  # not MD5 part ETags (e.g. SSE-KMS): compare sizes only
    return f"{hashlib.md5(digests, usedforsecurity=False).hexdigest()}-{len(parts)}"


def complete_multipart(call: Callable[..., Any], upload_id: str | None,
                       parts: list[dict[str, Any]], size: int, *, url: str,
                       retrier: Retrier, extra: dict[str, Any] | None = None) -> None:
    """CompleteMultipartUpload, retried, with an ambiguous outcome resolved by reading the
    remote (DESIGN.md, "The daemon").

    A timeout or a reset can come after S3 completed the upload; a retry then gets NoSuchUpload
    (the upload is gone because it succeeded). So after any failed attempt, the object is
    looked up: when it is there with ``size`` bytes (and, where S3 computes it so, the ETag
    of exactly these parts), the upload completed and this returns; otherwise the attempt's
    error stands (and is retried where retryable).

    ``call(method, **kwargs)`` runs one S3 call on the object (Bucket and Key filled in).
    ``extra``: more arguments (the full-object checksum: :meth:`PartChecksums.complete_args`).
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
                 **{"MultipartUpload": {"Parts": parts}, **(extra or {})})
        except Exception as e:
            if completed():
                log.info("completing the multipart upload of %s failed (%s: %s), but the "
                         "object is there, complete: the first attempt took effect", url,
                         type(e).__name__, e)
                return
            raise

    retrier.call(attempt, url=url, action="upload to")


class MultipartUpload:
    """One multipart upload of one object, its parts sent on a pool of ``window`` threads.

    :meth:`create` starts it (:meth:`start` starts it without waiting: the parts sent wait
    for it on the pool); :meth:`send` queues the next part (the caller holds its slot of
    ``slots`` and its buffer, handed over: given back when the part is sent, fails or is
    dropped); :meth:`parts` waits for every part; :meth:`complete` completes the upload;
    :meth:`abort` drops it (idempotent: nothing becomes visible); :meth:`close` lets the S3
    client go. Each call is retried by ``retrier``; a part first checks ``stop``, and
    ``on_part(n)`` (an attribute, set before parts are sent) is told of each part of ``n``
    bytes sent.

    Each part carries its CRC, computed over the body sent, and the upload is created and
    completed with the full-object CRC (:mod:`~ckptsync.transfer.checksums`), so that the
    server refuses a part or an object damaged in transit; a server that refuses to create
    such an upload gets one without checksums (logged).

    Raises: the translated backend errors; :class:`S3ApiChanged` when s3fs's private API
    failed (already warned about).
    """

    def __init__(self, fs: Any, remote_path: str, *, url: str, retrier: Retrier, slots: Slots,
                 window: int, thread_name: str, stop: threading.Event | None = None,
                 on_part: Callable[[int], None] | None = None) -> None:
        self.fs = fs
        self.remote_path = remote_path
        self.url = url
        self.retrier = retrier
        self.slots = slots
        self.window = window
        self.upload_id: str | None = None
        self.futures: list[Future[dict[str, Any]]] = []
        self._thread_name = thread_name
        self._stop = stop
        self.on_part = on_part
        self._pool: ThreadPoolExecutor | None = None
        self._sender: _BlockingS3 | None = None
        self._created: Future[None] | None = None  # the create of :meth:`start`
        self.checksums: PartChecksums | None = PartChecksums()

    def call(self, method: str, **kwargs: Any) -> Any:
        """One S3 call on the object (Bucket and Key filled in)."""
        if self._sender is None:
            self._sender = _BlockingS3(self.fs, self.remote_path, self.window)
        return self._sender.call(method, **kwargs)

    def create(self) -> None:
        self._create()
        self._pool = ThreadPoolExecutor(self.window, thread_name_prefix=self._thread_name)

    def _create(self) -> None:
        def attempt() -> str:
            if self.checksums is not None:
                try:
                    return str(self.call("create_multipart_upload",
                                         **full_object_args())["UploadId"])
                except (ValueError, NotImplementedError, OSError) as e:
                    if not isinstance(e, (ValueError, NotImplementedError)) \
                            and e.errno not in (errno.EINVAL, errno.ENOSYS):
                        raise
                    log.warning("%s: the server refused a multipart upload with a full-object "
                                "checksum (%s); uploading without one (the manifest's digest "
                                "still verifies every download)", self.url, e)
                    self.checksums = None
            return str(self.call("create_multipart_upload")["UploadId"])

        self.upload_id = self.retrier.call(attempt, url=self.url, action="upload to")

    def start(self) -> None:
        """Create the upload on the pool, without waiting for it: parts sent meanwhile wait
        for it there (a slow or failing create delays them, never the caller)."""
        self._pool = ThreadPoolExecutor(self.window, thread_name_prefix=self._thread_name)
        self._created = self._pool.submit(self._create)

    @property
    def started(self) -> bool:
        return self._pool is not None or self.upload_id is not None

    def raise_failed(self) -> None:
        """Raise the error of the create or a part that failed already, if any: fail fast."""
        futures: list[Future[Any]] = [*self.futures]
        if self._created is not None:
            futures.insert(0, self._created)
        failed = next((f for f in futures if f.done() and f.exception()), None)
        if failed is not None:
            failed.result()

    def send(self, data: bytes | bytearray, buf: bytearray | None, crc: int | None = None) -> None:
        """Queue part number ``len(futures) + 1``; ``buf`` (with the caller's slot) goes with it.
        ``crc``: the part's CRC (:func:`~ckptsync.transfer.checksums.checksum`), computed by
        the caller in the pass that read or filled the part; None: computed here."""
        try:
            assert self._pool is not None, "create() first"
            self.futures.append(self._pool.submit(self._put, len(self.futures) + 1, data, buf,
                                                  crc))
        except BaseException:
            self.slots.sent(buf)
            raise

    def _put(self, number: int, data: bytes | bytearray, buf: bytearray | None,
             crc: int | None) -> dict[str, Any]:
        try:
            if self._created is not None:
                self._created.result()  # the create failed: so does every part
            assert self._sender is not None  # made by the create call
            sender = self._sender
            # The part's CRC, once, over the very bytes sent: the server checks the body.
            sums = self.checksums
            declared = ({} if sums is None else sums.part(number, data) if crc is None
                        else sums.record(number, crc, len(data)))

            def attempt() -> Any:
                _check_stop(self._stop, self.url)
                return sender.upload_part(PartNumber=number, UploadId=self.upload_id, Body=data,
                                          **declared)

            resp = self.retrier.call(attempt, url=self.url, action="upload to")
            if self.on_part is not None:
                self.on_part(len(data))
            return {"PartNumber": number, "ETag": resp["ETag"]}
        finally:
            self.slots.sent(buf)

    def parts(self) -> list[dict[str, Any]]:
        """Every part's number and ETag, once sent (raises the first part's error)."""
        return [f.result() for f in self.futures]

    def complete(self, parts: list[dict[str, Any]], size: int) -> None:
        """Complete the upload of ``parts``, ``size`` bytes (see :func:`complete_multipart`)."""
        extra = self.checksums.complete_args(parts) if self.checksums is not None else {}
        complete_multipart(self.call, self.upload_id, parts, size, url=self.url,
                           retrier=self.retrier, extra=extra)
        self.upload_id = None  # completed: nothing to abort

    def cancel(self) -> None:
        """Cancel the parts not started; their slots go back (``slots`` outlives us).
        Idempotent: a part cancelled before is not counted again."""
        for f in self.futures:
            if not f.cancelled() and f.cancel():
                self.slots.release()

    def join(self) -> None:
        """Wait for the parts being sent."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def abort(self) -> None:
        """Drop the upload (idempotent); nothing becomes visible."""
        self.cancel()
        self.join()
        if self.upload_id is not None:
            upload_id, self.upload_id = self.upload_id, None
            try:
                self.call("abort_multipart_upload", UploadId=upload_id)
            except Exception:  # best effort: gc aborts what is left
                log.debug("could not abort multipart upload of %s", self.url, exc_info=True)

    def close(self) -> None:
        if self._sender is not None:
            self._sender.close()


def _read_into(src: Any, buf: bytearray | memoryview) -> int:
    """Fill ``buf`` from ``src`` (``readinto``); the bytes read (short only at the end)."""
    view = memoryview(buf)
    n = 0
    while n < len(view):
        k = src.readinto(view[n:])
        if not k:
            break
        n += k
    return n


def _send_file(upload: MultipartUpload, local_path: Path, entry: FileEntry, *, part_size: int,
               slots: Slots, url: str, stop: threading.Event | None, skip: int = 0) -> None:
    """Read ``local_path`` in order, hashing every byte, and send it from byte ``skip`` on as
    the next parts of ``upload`` (the bytes before ``skip`` were sent already, as whole
    ``part_size`` parts); then wait for every part and complete the upload, but only when
    the bytes read hash to ``entry``.

    Raises: CorruptCheckpointError (the file no longer matches ``entry``: nothing completed),
    LocalStorageError, and the errors of the parts.
    """
    digest = new_hasher(entry.algo)
    size = 0
    with _open_local(local_path) as src:
        try:
            if skip:  # sent already: only hashed, so that the whole file is verified
                buf = slots.take(part_size)
                try:
                    while size < skip:
                        _check_stop(stop, url)
                        try:
                            n = _read_into(src, memoryview(buf)[:min(part_size, skip - size)])
                        except OSError as e:
                            raise LocalStorageError(f"cannot read local checkpoint file "
                                                    f"{local_path}: {e.strerror or e}") from e
                        if not n:
                            break
                        digest.update(memoryview(buf)[:n])
                        size += n
                finally:
                    slots.give(buf)
            while size >= skip:  # (a file shorter than ``skip`` sends nothing: refused below)
                _check_stop(stop, url)
                upload.raise_failed()
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
                upload.send(data, lent, checksum(data))  # its CRC in the pass that read it
                del data, buf, lent
            parts = upload.parts()
        except BaseException:
            upload.cancel()
            raise
        finally:
            upload.join()
    # The bytes sent are the bytes hashed: complete only if they are the committed ones.
    if size != entry.size or digest.hexdigest() != entry.digest:
        raise CorruptCheckpointError(
            f"{local_path}: content no longer matches its manifest (read {size} bytes, "
            f"expected {entry.size}); the file changed after its checkpoint was committed, "
            "so it is not uploaded",
            path=str(local_path),
        )
    upload.complete(parts, entry.size)


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
    hashing every byte it reads; each part is then sent on a small pool, so hashing, reading
    and sending overlap. A part holds a slot of ``slots`` from before it is read until it is
    sent: memory is bounded by the slots, whatever the file's size. Each part is retried on
    its own. The upload is completed only when the bytes read hash to ``entry``; otherwise
    (or on any error, or ``stop``) it is aborted, so no object ever appears. If s3fs's
    private API fails, the file goes up through :func:`upload_file` instead.

    Raises: as :func:`upload_file`.
    """
    progress = progress or NullProgress()
    if private_api_usable(fs):
        try:
            _upload_parts(fs, local_path, remote_path, entry, url=url, config=config,
                          retrier=retrier, slots=slots, progress=progress, stop=stop)
            return
        except S3ApiChanged:  # warned about; aborted, its progress taken back
            pass
    upload_file(fs, local_path, remote_path, entry, url=url, config=config, retrier=retrier,
                progress=progress, stop=stop)


def _upload_parts(fs: Any, local_path: Path, remote_path: str, entry: FileEntry, *, url: str,
                  config: TransferConfig, retrier: Retrier, slots: Slots, progress: Progress,
                  stop: threading.Event | None) -> None:
    part_size = max(config.part_size, -(-entry.size // 10_000))  # S3: at most 10,000 parts
    reported = [0]  # bytes given to progress, taken back if the upload fails
    lock = threading.Lock()

    def sent(n: int) -> None:
        progress.update(n)
        with lock:
            reported[0] += n

    upload = MultipartUpload(fs, remote_path, url=url, retrier=retrier, slots=slots,
                             window=max(1, config.parts_in_flight),
                             thread_name="ckptsync-part", stop=stop, on_part=sent)
    try:
        upload.create()
    except BaseException:
        upload.close()
        raise
    try:
        _send_file(upload, local_path, entry, part_size=part_size, slots=slots, url=url,
                   stop=stop)
    except BaseException:
        with lock:
            progress.update(-reported[0])
        upload.abort()
        raise
    finally:
        upload.close()
        fs.invalidate_cache(remote_path)


class MultipartStream:
    """Uploads bytes to S3 as they are written: a parallel multipart upload fed by a writer,
    which it never makes wait (DESIGN.md: a save never waits on the network).

    The checkpointer tees a file being serialized (and hashed, and written locally) into
    :meth:`write`, which copies it into a part buffer lent by ``slots``; every full
    ``part_size`` part is sent on a small pool at once, so serialization, hashing and upload
    overlap. The multipart upload is created on that pool with the first full part (a
    smaller file is left to the normal upload). ``slots`` bound the parts held in memory.

    When the window is full (the link is slower than the disk, stalled, or the create is
    still being retried), the stream stops taking bytes: it *detaches* at the end of the
    parts it sent, and the writer goes on at the speed of its disk. :meth:`finish`, once the
    file is committed, then resumes the same upload from the committed file at the first byte
    not sent (parts already sent are kept: no byte goes twice). It reads and hashes the whole
    file (the bytes already sent included), so the upload is completed only when every byte
    read hashes to the manifest's entry, as a fresh upload of the file is.

    :meth:`write` never raises and never waits: a failure marks the stream failed, and
    :meth:`finish` then returns False so that the caller uploads the committed file the normal
    way. Nothing is visible remotely until :meth:`finish` completes the upload; :meth:`abort`
    drops it.
    """

    def __init__(self, fs: Any, remote_path: str, *, url: str, config: TransferConfig,
                 retrier: Retrier, slots: Slots) -> None:
        self.fs = fs
        self.remote_path = remote_path
        self.url = url
        self.retrier = retrier
        self.slots = slots
        self.part_size = config.part_size
        self.size = 0  # bytes written to the file
        self.sent = 0  # bytes handed to parts (whole parts)
        self.detached = False  # stopped taking bytes at ``sent``; finish resumes from the file
        self.error: BaseException | None = None
        what = fallen_back(fs)
        if what is not None:  # warned about: the committed file goes up the normal way
            self.error = S3ApiChanged(what)
        # The part being filled (a buffer lent by ``slots``; its slot is taken only to send
        # it, so that streams waiting for their commit never hold the window) and its fill.
        self._part: bytearray | None = None
        self._fill = 0
        self._crc = 0  # of the part's bytes so far
        self._done = False
        self._upload = MultipartUpload(fs, remote_path, url=url, retrier=retrier, slots=slots,
                                       window=max(1, config.parts_in_flight),
                                       thread_name="ckptsync-stream")

    def write(self, data: memoryview) -> None:
        self.size += len(data)
        if self.error is not None or self._done or self.detached:
            return
        try:
            while len(data):
                if self._part is None:
                    self._part = self.slots.take(self.part_size)
                    self._fill = 0
                    self._crc = 0
                k = min(len(data), self.part_size - self._fill)
                self._part[self._fill:self._fill + k] = data[:k]  # the one copy of each byte
                # The part's CRC over the bytes just copied, while they are in the cache.
                self._crc = checksum(memoryview(self._part)[self._fill:self._fill + k],
                                     self._crc)
                self._fill += k
                data = data[k:]
                if self._fill == self.part_size:
                    # Never wait for the window: the link is behind the disk, so the rest of
                    # the file goes up from the committed file, after the local commit.
                    if not self.slots.acquire(blocking=False):
                        self._detach()
                        return
                    part, self._part = self._part, None
                    self._send(part, part, self._crc)
                    self.sent += self.part_size
        except BaseException as e:  # the local save must go on: fall back to a normal upload
            log.info("streaming upload of %s stopped, will upload after commit: %s", self.url, e)
            self.error = e
            self._drop_part()

    def _detach(self) -> None:
        log.debug("streaming upload of %s: the link is behind, %d bytes sent; the rest goes "
                  "up after the local commit", self.url, self.sent)
        self.detached = True
        self._drop_part()

    def _drop_part(self) -> None:
        if self._part is not None:
            self.slots.give(self._part)
            self._part = None

    def _send(self, data: bytes | bytearray, buf: bytearray | None, crc: int) -> None:
        """Send one part (of CRC ``crc``); the caller holds its slot (and ``buf``), handed to
        the part here."""
        try:
            if not self._upload.started:
                self._upload.start()  # created on the pool: never waited for here
            self._upload.raise_failed()
        except BaseException:
            self.slots.sent(buf)
            raise
        self._upload.send(data, buf, crc)

    def finish(self, entry: FileEntry, local_path: Path, progress: Progress | None = None,
               stop: threading.Event | None = None) -> bool:
        """Send the rest (from memory, or from ``local_path``, the committed file, where the
        stream detached) and complete the upload; True if ``remote_path`` now holds exactly
        the ``entry.size`` bytes of ``entry``, False if the caller must upload the file
        itself (nothing sent was completed)."""
        if self._done:
            return False
        reported = [0]  # bytes given to progress, taken back if this fails
        lock = threading.Lock()

        def sent(n: int) -> None:  # a resumed upload can be long: show that bytes move
            if progress is not None:
                progress.update(n)
            with lock:
                reported[0] += n

        try:
            if (self.error is not None or not self._upload.started
                    or self.size != entry.size):
                return False
            self._upload.on_part = sent
            self._upload.raise_failed()
            if self.detached:
                _send_file(self._upload, local_path, entry, part_size=self.part_size,
                           slots=self.slots, url=self.url, stop=stop, skip=self.sent)
            else:
                if self._part is not None:  # the short last part
                    part, self._part = self._part, None
                    _acquire(self.slots, stop, self.url)
                    self._send(*self.slots.body(part, self._fill), self._crc)
                self._upload.complete(self._upload.parts(), entry.size)
            with lock:
                rest, reported[0] = entry.size - reported[0], entry.size
            if progress is not None:
                progress.update(rest)  # the parts sent before this call
            return True
        except BaseException as e:
            log.info("streaming upload of %s failed, uploading the file instead: %s", self.url, e)
            self.error = e
            return False
        finally:
            self.abort()  # every part done (a completed upload has nothing to abort)
            if self.error is not None and progress is not None and reported[0]:
                progress.update(-reported[0])  # the caller uploads the file: counted again

    def abort(self) -> None:
        """Drop the upload (idempotent); nothing becomes visible."""
        self._done = True
        self._drop_part()
        self._upload.abort()
        self._upload.close()
        self.fs.invalidate_cache(self.remote_path)
