"""S3 multipart uploads whose parts are sent concurrently: the one state machine,
:class:`MultipartUpload`, and :func:`complete_multipart`. Its drivers:
:func:`~ckptsync.transfer.upload_parts.upload_file_multipart` (a committed local file),
:class:`~ckptsync.transfer.stream.MultipartStream` (a file while it is being written) and
:func:`~ckptsync.transfer.sealed.upload_sealed_multipart` (an encrypted file).

This is the S3 protocol (create, parts, complete, abort), not a client: the calls go through
the backend's :class:`ObjectCalls` (:meth:`ckptsync.remote.backends.S3.object_calls`, which
owns s3fs's and botocore's private API). When that API fails it raises
:class:`~ckptsync.transfer.fence.PrivateApiChanged` (warned about once), and the caller uploads
the file through the public fsspec API instead.

Parts are read (or written) and hashed in order by one thread and sent on a small pool, at
most ``parts_in_flight`` parts (shared by every file of a push, :class:`Slots`) held in memory
at once. Each part is retried on its own. Nothing is visible remotely until the upload is
completed, and it is completed only when the bytes sent hash to the manifest's entry;
otherwise (or on any error, or a stop) it is aborted.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

from ckptsync.transfer.checksums import PartChecksums, full_object_args
from ckptsync.transfer.parallel import Slots
from ckptsync.transfer.retry import Retrier, check_stop

__all__ = ["MultipartUpload", "ObjectCalls", "OpenObject", "complete_multipart"]

log = logging.getLogger(__name__)


class ObjectCalls(Protocol):
    """The S3 calls on one object (Bucket and Key filled in), as its backend makes them.

    Raises: the backend's errors as its filesystem raises them, and
    :class:`~ckptsync.transfer.fence.PrivateApiChanged` when a private API it uses changed.
    """

    def call(self, method: str, **kwargs: Any) -> Any:
        """One small call (``create_multipart_upload``, ``head_object``, ...)."""

    def upload_part(self, **kwargs: Any) -> Any:
        """``UploadPart`` (the bulk call: from the caller's thread)."""

    def close(self) -> None:
        """Let go of the client (the backend may keep it for other transfers)."""


OpenObject = Callable[[str, int], ObjectCalls]
"""``open_object(remote_path, connections)``: the :class:`ObjectCalls` of one object, for
up to ``connections`` requests at once."""


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

    Raises: the translated backend errors;
    :class:`~ckptsync.transfer.fence.PrivateApiChanged` when the backend's private API failed
    (already warned about).
    """

    def __init__(self, open_object: OpenObject, remote_path: str, *, url: str,
                 retrier: Retrier, slots: Slots, window: int, thread_name: str,
                 stop: threading.Event | None = None,
                 on_part: Callable[[int], None] | None = None) -> None:
        self.open_object = open_object
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
        self._sender: ObjectCalls | None = None
        self._created: Future[None] | None = None  # the create of :meth:`start`
        self.checksums: PartChecksums | None = PartChecksums()

    def call(self, method: str, **kwargs: Any) -> Any:
        """One S3 call on the object (Bucket and Key filled in)."""
        if self._sender is None:
            self._sender = self.open_object(self.remote_path, self.window)
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
                check_stop(self._stop, self.url)
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
