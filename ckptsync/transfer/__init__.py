"""Parallel, streaming, retried file transfers between a local directory and an fsspec
filesystem. :mod:`ckptsync.remote` passes the filesystem, the one function that translates
backend exceptions, and the backend's hooks (its checksum of an upload body, its ranged
reads, its S3 calls): nothing here knows which backend it talks to, nor any library's
private API (each backend class owns its own: :mod:`ckptsync.remote.backends`).

- ``retry``: :class:`RetryPolicy` (the one back-off), :class:`Retrier` (one call retried in
  place, translation), :func:`stopping`, :func:`check_stop`, :func:`backoff`.
- ``queue``: :class:`TransferQueue`, the one bounded, cancellable queue every background
  upload goes through (latest wins per key; failed transfers retried by the policy).
- ``parallel``: :func:`run_parallel` (bounded pool, stop on first failure), :class:`Slots`.
- ``fence``: :class:`Fence` around a library's private API (one warning, then the public
  API), :class:`PrivateApiChanged`.
- ``files``: plain transfers through the public fsspec API (upload, download, remote hash);
  :class:`BodyCheck`, a backend's checksum of an upload body.
- ``ranged``: large downloads in parallel ranges, read the backend's way.
- ``checksums``: the CRC32C (or CRC32) S3 and GCS check on an upload.
- ``multipart``: the S3 multipart upload state machine, over a backend's :class:`ObjectCalls`.
- ``upload_parts``: a committed file as a multipart upload with parallel parts.
- ``stream``: a file uploaded while it is being written (:class:`MultipartStream`).
- ``sealed``: encrypted uploads as multipart uploads with parallel parts (a part sink).

Progress reporters live in :mod:`ckptsync.progress` (re-exported here).
"""

from __future__ import annotations

from ckptsync.progress import NullProgress, Progress
from ckptsync.transfer.fence import Fence, PrivateApiChanged
from ckptsync.transfer.files import (
    BodyCheck,
    BodyChecks,
    download_file,
    hash_remote_file,
    upload_file,
)
from ckptsync.transfer.multipart import (
    MultipartUpload,
    ObjectCalls,
    OpenObject,
    complete_multipart,
)
from ckptsync.transfer.parallel import Slots, run_parallel
from ckptsync.transfer.queue import Transfer, TransferFuture, TransferQueue
from ckptsync.transfer.ranged import OpenRanges, RangeReader, download_file_ranged
from ckptsync.transfer.retry import (
    Retrier,
    RetryPolicy,
    TransferAborted,
    Translate,
    backoff,
    check_stop,
    stopping,
)
from ckptsync.transfer.sealed import upload_sealed_multipart
from ckptsync.transfer.stream import MultipartStream
from ckptsync.transfer.upload_parts import upload_file_multipart

__all__ = [
    "BodyCheck",
    "BodyChecks",
    "Fence",
    "MultipartStream",
    "MultipartUpload",
    "NullProgress",
    "ObjectCalls",
    "OpenObject",
    "OpenRanges",
    "PrivateApiChanged",
    "Progress",
    "RangeReader",
    "Retrier",
    "RetryPolicy",
    "Slots",
    "Transfer",
    "TransferAborted",
    "TransferFuture",
    "TransferQueue",
    "Translate",
    "backoff",
    "check_stop",
    "complete_multipart",
    "download_file",
    "download_file_ranged",
    "hash_remote_file",
    "run_parallel",
    "stopping",
    "upload_file",
    "upload_file_multipart",
    "upload_sealed_multipart",
]
