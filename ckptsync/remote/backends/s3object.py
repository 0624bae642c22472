"""The S3 calls on one object (:class:`S3Object`): the bulk ones through the shared blocking
client (:mod:`~ckptsync.remote.backends.s3client`), the small ones on s3fs; a ranged read goes
from the socket straight into the caller's reused buffer (:func:`read_body_into`), not into a
fresh ``bytes`` per range.

The private API used here, each inside :data:`~ckptsync.remote.backends.s3client.S3_FENCE`:

- ``S3FileSystem._call_s3`` (:meth:`S3Object.call`): the small calls, and parts when no
  blocking client could be built;
- ``S3FileSystem._get_s3_method_kwargs`` (:meth:`S3Object.upload_part`,
  :meth:`S3Object.read_range`): s3fs's request-wide extras (SSE-C keys, RequestPayer);
- ``S3FileSystem.split_path``, and ``s3fs.errors.translate_boto_error``: the blocking client's
  errors read as s3fs's, so both paths read the same to
  :func:`ckptsync.remote.translate_error`;
- botocore's ``StreamingBody._raw_stream`` and urllib3's ``HTTPResponse._fp``
  (:func:`read_body_into`): without them (or for an encoded body) a range is read with the
  public ``StreamingBody.read`` and copied into the buffer, no warning (only slower).
"""

from __future__ import annotations

import http.client
import logging
from collections.abc import Callable
from typing import Any

from ckptsync.remote.backends.s3client import CLIENTS, S3_FENCE
from ckptsync.transfer.fence import PrivateApiChanged

__all__ = ["S3Object", "read_body_into"]

log = logging.getLogger(__name__)


def read_body_into(body: Any, view: memoryview) -> int:
    """Fill ``view`` from the botocore ``StreamingBody`` of a ranged GET (no longer than
    ``view``); the bytes read, fewer only where the object ends first.

    Straight from the socket into ``view`` (http.client's ``readinto``, one copy, no
    allocation) through botocore's ``StreamingBody._raw_stream`` and urllib3's
    ``HTTPResponse._fp``: urllib3's own ``readinto`` is a ``read`` plus a copy. Where these
    are not there (a library changed) or the body is encoded, ``body.read()`` and a copy.

    Raises ``http.client.IncompleteRead`` when the connection ends before the body does
    (retryable, as urllib3 would raise).
    """
    raw: Any = getattr(body, "_raw_stream", None)
    fp = getattr(raw, "_fp", None)
    headers = getattr(raw, "headers", None)
    if (not isinstance(fp, http.client.HTTPResponse) or fp.chunked or headers is None
            or headers.get("content-encoding") or not callable(getattr(raw, "read", None))):
        data = body.read(len(view) + 1)
        view[:len(data)] = data  # (a longer body does not fit: ValueError, never silent)
        return len(data)
    n = 0
    while n < len(view):
        k = fp.readinto(view[n:])
        if not k:
            break
        n += k
    if fp.length:  # the connection ended first: a body cut short, not a short object
        raise http.client.IncompleteRead(b"", fp.length)
    raw.read()  # urllib3 sees the body read and gives the connection back to its pool
    return n


class S3Object:
    """The S3 calls for one object: the bulk ones (``upload_part``, ranged ``get_object``)
    run in the caller's thread through the filesystem's shared blocking client (see the
    module doc and :class:`~ckptsync.remote.backends.s3client.Clients`), the small ones
    (:meth:`call`) on s3fs. If the blocking client cannot be built, everything goes through
    s3fs. An :class:`~ckptsync.transfer.ObjectCalls`.

    Raises:
        PrivateApiChanged: from any method (and the constructor), when the private API changed.
    """

    def __init__(self, fs: Any, remote_path: str, pool_size: int) -> None:
        self.fs = fs
        self.path = remote_path
        with S3_FENCE.guard(fs, "S3FileSystem.split_path"):
            self.bucket, self.key, _ = fs.split_path(remote_path)
        self._client: Any = None
        try:
            self._client = CLIENTS.get(fs, self.bucket, pool_size)
        except PrivateApiChanged:
            raise
        except Exception:
            log.debug("no blocking S3 client for %s; its transfer goes through s3fs",
                      remote_path, exc_info=True)

    def call(self, method: str, **kwargs: Any) -> Any:
        """``method`` on the object (Bucket and Key filled in), through s3fs."""
        from fsspec.asyn import sync

        with S3_FENCE.guard(self.fs, "S3FileSystem._call_s3"):
            return sync(self.fs.loop, self.fs._call_s3, method, Bucket=self.bucket,
                        Key=self.key, **kwargs)

    def _kwargs(self, method: Callable[..., Any], **kwargs: Any) -> dict[str, Any]:
        # s3fs's request-wide extras (SSE-C keys, RequestPayer) apply to every request.
        with S3_FENCE.guard(self.fs, "S3FileSystem._get_s3_method_kwargs"):
            kw: dict[str, Any] = self.fs._get_s3_method_kwargs(method, Bucket=self.bucket,
                                                               Key=self.key, **kwargs)
        return kw

    def _translate(self) -> Callable[[Exception], BaseException]:
        with S3_FENCE.guard(self.fs, "s3fs.errors.translate_boto_error"):
            from s3fs.errors import translate_boto_error
        return translate_boto_error

    def upload_part(self, **kwargs: Any) -> Any:
        if self._client is None:
            return self.call("upload_part", **kwargs)
        from botocore.exceptions import ClientError

        translate = self._translate()
        kw = self._kwargs(self._client.upload_part, **kwargs)
        try:
            return self._client.upload_part(**kw)
        except ClientError as e:
            raise translate(e) from e

    def read_range(self, start: int, end: int, buf: bytearray) -> memoryview | bytes:
        """Bytes ``[start, end)`` of the object (fewer where it ends first), read into
        ``buf`` (a view of it is returned), or fresh ``bytes`` once the private API failed
        (warned about: through ``fs.cat_file``)."""
        if self._client is None or S3_FENCE.failure(self.fs) is not None:
            return bytes(self.fs.cat_file(self.path, start=start, end=end))
        from botocore.exceptions import ClientError

        try:
            translate = self._translate()
            kw = self._kwargs(self._client.get_object, Range=f"bytes={start}-{end - 1}")
        except PrivateApiChanged:
            return bytes(self.fs.cat_file(self.path, start=start, end=end))
        try:
            body = self._client.get_object(**kw)["Body"]
        except ClientError as e:
            raise translate(e) from e
        try:
            view = memoryview(buf)[:end - start]
            return view[:read_body_into(body, view)]
        finally:
            body.close()

    def get_range(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the object (``end`` > ``start``), as fresh ``bytes``."""
        return bytes(self.read_range(start, end, bytearray(end - start)))

    @property
    def direct(self) -> bool:
        """Whether the bulk calls go through the blocking client (not s3fs's one thread)."""
        return self._client is not None

    def close(self) -> None:
        """Let go of the shared client (it stays open for the filesystem's other transfers)."""
        self._client = None
