"""Amazon S3 and S3-compatible servers, through s3fs (``s3://``, ``s3a://``): :class:`S3`.

An object store with a native create-only write (``If-None-Match: *``), server-side copies,
and multipart uploads: large files go up with parallel parts, and ranges are read in
parallel, through a blocking botocore client shared per filesystem
(:mod:`~ckptsync.remote.backends.s3client`, :mod:`~ckptsync.remote.backends.s3object`).
Every upload body carries its CRC32C (:mod:`ckptsync.transfer.checksums`), so that the server
refuses bytes damaged in transit.

Every use of s3fs's and botocore's private API is in these three modules, each inside the
fence :data:`~ckptsync.remote.backends.s3client.S3_FENCE`: when one is missing, or its call
raises ``AttributeError`` or ``TypeError`` (s3fs or botocore changed), ONE warning per
filesystem names what failed and the s3fs and botocore versions, and from then on that
filesystem's transfers use the public fsspec API (:meth:`S3.private_api_failure` says what
failed): a multipart upload becomes a plain streamed upload, a ranged read ``fs.cat_file``.
Here: ``S3File.s3_additional_kwargs``, ``mpu`` and ``blocksize`` (:meth:`S3.body_check`: the
checksum of a small file's one PUT; without them, that PUT goes without it).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any, ClassVar

from ckptsync.config import TransferConfig
from ckptsync.remote.backends.base import MultipartUploadInfo
from ckptsync.remote.backends.objectstore import ObjectStore
from ckptsync.remote.backends.s3client import S3_FENCE, configured_endpoint
from ckptsync.remote.backends.s3object import S3Object
from ckptsync.transfer import BodyCheck, ObjectCalls, PrivateApiChanged, RangeReader
from ckptsync.transfer.checksums import checksum, checksum_field, encode
from ckptsync.transfer.ranged import public_ranges

__all__ = ["S3", "is_s3fs", "plain_http"]

log = logging.getLogger(__name__)


def is_s3fs(fs: Any) -> bool:
    """Is ``fs`` an s3fs filesystem whose calls :class:`S3Object` can mirror?"""
    return all(hasattr(fs, a) for a in ("_call_s3", "loop", "split_path",
                                        "_get_s3_method_kwargs"))


def plain_http(options: Mapping[str, Any]) -> bool:
    """Do these s3fs options talk to the server without TLS (``use_ssl=False``, or an
    ``http://`` endpoint: the options' own, or the one botocore configures from the
    environment or the profile, such as ``AWS_ENDPOINT_URL``)? When the endpoint cannot be
    told, True: bodies stay signed, the safe side."""
    client = options.get("client_kwargs") or {}
    if options.get("use_ssl") is False or client.get("use_ssl") is False:
        return True
    endpoint = configured_endpoint(options)
    return endpoint is None or not endpoint.lower().startswith("https://")


def _single_put_extras(f: Any) -> dict[str, Any] | None:
    """The arguments an s3fs file sends with the one PUT it makes at close (the file is under
    its block size, no multipart upload begun); None when it makes no such PUT (a multipart
    upload) or s3fs changed (its private ``S3File.s3_additional_kwargs``, ``mpu`` and
    ``blocksize``)."""
    extras = getattr(f, "s3_additional_kwargs", None)
    try:
        single = getattr(f, "mpu", ...) is None and f.tell() < int(f.blocksize)
    except (AttributeError, TypeError, ValueError):
        return None
    return extras if single and isinstance(extras, dict) else None


class _SinglePutChecksum:
    """The CRC of a small file's one PUT, added to the arguments s3fs sends with it
    (a :class:`~ckptsync.transfer.BodyCheck`)."""

    def __init__(self, f: Any, extras: dict[str, Any]) -> None:
        self._file = f
        self._extras = extras
        self._crc = 0

    def update(self, chunk: Any) -> None:
        self._crc = checksum(chunk, self._crc)

    def seal(self) -> None:
        if _single_put_extras(self._file) is self._extras:  # still one PUT
            self._extras[checksum_field()] = encode(self._crc)

    def landed(self, size: int) -> bool:
        return False  # S3 completes a PUT in one request: its error stands

    def check(self) -> None:
        """Nothing after the close: the server checked the body."""


class S3(ObjectStore):
    """S3 through s3fs: create-only manifests, server-side copies, parallel multipart uploads
    and ranged reads through s3fs's and botocore's private API (fenced)."""

    name: ClassVar[str] = "s3"
    extra: ClassVar[str | None] = "s3"

    @classmethod
    def open_options(cls, options: Mapping[str, Any], config: TransferConfig) -> dict[str, Any]:
        """``options`` plus botocore's ``connect_timeout`` and ``read_timeout`` (a read timeout
        bounds each socket read, not a request) where the user did not set them: without
        them a black-holed endpoint hangs a call for many minutes. Also one botocore attempt
        per call (:class:`~ckptsync.transfer.Retrier` does the retrying, with back-off, and
        can be stopped), and botocore's own request checksums only where an operation
        requires one (ckptsync sends its own with every upload)."""
        out = dict(options)
        kwargs = dict(out.get("config_kwargs") or {})
        kwargs.setdefault("connect_timeout", config.connect_timeout)
        kwargs.setdefault("read_timeout", config.read_timeout)
        kwargs.setdefault("retries", {"total_max_attempts": 1})
        # ckptsync sends its own checksum with every upload's body (computed in the pass
        # that reads it: transfer/checksums.py); botocore's default computes a CRC32 of
        # every body again. Where an operation requires one, botocore still adds it.
        kwargs.setdefault("request_checksum_calculation", "when_required")
        if not plain_http(out):
            # Over TLS an upload whose body carries ckptsync's CRC needs no sha256 payload
            # signature (botocore's own rule, which looks only for the checksum botocore
            # computed itself: with ours it would sign every body, ~0.9 CPU-s per GB). Over
            # plain http the signature stays: nothing else guards the body.
            s3 = dict(kwargs.get("s3") or {})
            s3.setdefault("payload_signing_enabled", False)
            kwargs["s3"] = s3
        out["config_kwargs"] = kwargs
        return out

    @property
    def parallel_parts(self) -> bool:
        # The multipart path drives s3fs's own calls: only where they are there to drive.
        return is_s3fs(self.fs)

    def private_api_failure(self) -> str | None:
        return S3_FENCE.failure(self.fs)

    def body_check(self, f: Any, size: int) -> BodyCheck | None:
        """The CRC of a small file's one PUT (a large file's multipart upload through s3fs's
        file sends its parts as s3fs does)."""
        if size >= self.config.block_size or not is_s3fs(getattr(f, "fs", None)) \
                or self.private_api_failure() is not None:
            return None
        extras = _single_put_extras(f)
        return _SinglePutChecksum(f, extras) if extras is not None else None

    def open_ranges(self, path: str, threads: int) -> AbstractContextManager[RangeReader]:
        """Through the shared blocking client into the caller's buffer; through
        ``fs.cat_file`` where s3fs's private API failed (or is not there)."""
        return self._ranges(path, threads)

    @contextlib.contextmanager
    def _ranges(self, path: str, threads: int) -> Iterator[RangeReader]:
        getter: S3Object | None = None
        if self.parallel_parts and self.private_api_failure() is None:
            with contextlib.suppress(PrivateApiChanged):  # warned: the public API below
                getter = S3Object(self.fs, path, threads)
        if getter is None:
            with public_ranges(self.fs, path) as read:
                yield read
            return
        try:
            yield getter.read_range
        finally:
            getter.close()

    def object_calls(self, path: str, connections: int) -> ObjectCalls:
        return S3Object(self.fs, path, connections)

    def multipart_uploads(self, bucket: str) -> list[MultipartUploadInfo]:
        lister = getattr(self.fs, "list_multipart_uploads", None)
        if lister is None or getattr(self.fs, "abort_mpu", None) is None:
            return []
        return list(lister(bucket) or [])

    def abort_multipart(self, bucket: str, key: str, upload_id: str) -> None:
        self.fs.abort_mpu(bucket, key, upload_id)
