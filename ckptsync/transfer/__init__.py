"""Parallel, streaming, retried file transfers between a local directory and an fsspec
filesystem. :mod:`ckptsync.remote` passes the filesystem and the one function that translates
backend exceptions; this package does not otherwise know which backend it talks to, except
for S3's fast paths, kept in two modules, and the CRC32C that GCS uploads declare (``gcs``).

- ``retry``: :class:`RetryPolicy` (the one back-off), :class:`Retrier` (one call retried in
  place, translation), :func:`stopping`, :func:`backoff`.
- ``queue``: :class:`TransferQueue`, the one bounded, cancellable queue every background
  upload goes through (latest wins per key; failed transfers retried by the policy).
- ``parallel``: :func:`run_parallel` (bounded pool, stop on first failure), :class:`Slots`.
- ``files``: plain transfers through the public fsspec API (upload, download, ranged
  download, remote hash).
- ``s3``: every use of s3fs/botocore private API, each behind a guard that falls back to the
  public API with one warning; the blocking S3 client; ranged reads.
- ``gcs``: the CRC32C a GCS upload declares on its finalizing request, through gcsfs's
  private API behind a guard that falls back (uploads without it) with one warning.
- ``multipart``: S3 multipart uploads (one state machine) of a file or of a stream.
- ``sealed``: encrypted uploads as S3 multipart uploads with parallel parts (a part sink).

Progress reporters live in :mod:`ckptsync.progress` (re-exported here).
"""

from __future__ import annotations

from ckptsync.progress import NullProgress, Progress
from ckptsync.transfer.files import (
    download_file,
    download_file_ranged,
    hash_remote_file,
    upload_file,
)
from ckptsync.transfer.multipart import (
    MultipartStream,
    MultipartUpload,
    complete_multipart,
    upload_file_multipart,
)
from ckptsync.transfer.parallel import Slots, run_parallel
from ckptsync.transfer.queue import Transfer, TransferFuture, TransferQueue
from ckptsync.transfer.retry import (
    Retrier,
    RetryPolicy,
    TransferAborted,
    Translate,
    backoff,
    stopping,
)
from ckptsync.transfer.s3 import _BlockingS3 as _BlockingS3  # tests open it directly
from ckptsync.transfer.s3 import is_s3fs

__all__ = [
    "MultipartStream",
    "MultipartUpload",
    "NullProgress",
    "Progress",
    "Retrier",
    "RetryPolicy",
    "Slots",
    "Transfer",
    "TransferAborted",
    "TransferFuture",
    "TransferQueue",
    "Translate",
    "backoff",
    "complete_multipart",
    "download_file",
    "download_file_ranged",
    "hash_remote_file",
    "is_s3fs",
    "run_parallel",
    "stopping",
    "upload_file",
    "upload_file_multipart",
]
