"""Backends as named strategies: what each family of storage can do, chosen in one place.

A :class:`Backend` answers every question the store asks about where it writes (can it write
a file only if it is absent, does it need directories, does an upload go to a temporary name
first, how many workers, ...). There is one per family:

- :data:`S3` and :data:`GCS`: object stores with a native create-only write;
- :data:`LOCAL_DIR`: a local or mounted directory (``file://``, ``local://``, a plain path such
  as a Colab-mounted Google Drive): real paths, so commits use fsync, rename and link;
- :data:`GDRIVE`: Google Drive through gdrive-fsspec;
- :data:`FSSPEC`: any other fsspec filesystem (``memory://`` and the rest).

:func:`choose_backend` is the only place in ckptsync that looks at a URL scheme, a
filesystem's protocol or class to decide behaviour; the store reads ``store.backend.<flag>``.

Example::

    backend = choose_backend(fs, "s3", config)
    if backend.parallel_parts: ...
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from fsspec.implementations.local import LocalFileSystem

from ckptsync.config import TransferConfig
from ckptsync.transfer import is_s3fs
from ckptsync.transfer.s3 import configured_endpoint

__all__ = ["FSSPEC", "GCS", "GDRIVE", "LOCAL_DIR", "S3", "Backend", "choose_backend"]


@dataclass(frozen=True)
class Backend:
    """What one family of storage can do (see the module docstring for the families).

    Attributes:
        name: the family, for logs and tests (``s3``, ``gcs``, ``local``, ``gdrive``,
            ``fsspec``).
        buckets: an object store: a missing bucket is an error (a missing prefix is just
            empty), and an empty "directory" (SeaweedFS keeps one) holds nothing.
        native_create_only: ``pipe_file(mode="create")`` is a conditional write on the server
            (S3 ``If-None-Match: *``, GCS ``ifGenerationMatch=0``); elsewhere fsspec checks,
            then writes.
        overwrites: writing an existing name replaces it (Drive keeps two files of one name
            side by side instead, so a file is deleted before it is written again).
        needs_dirs: parent directories must be created before files go in them.
        upload_via_temp: a file being written is visible, so an upload goes to a temporary
            name and is renamed into place (objects in S3, GCS and Drive appear whole).
        local_paths: the remote is a local directory: an upload is made durable (fsync) and
            renamed with ``os.replace``, the manifest is hard-linked into place (a true
            create-only write), and names are fsynced before the manifest.
        workers: files transferred at once (Drive: one; its shared httplib2 connection is not
            thread-safe).
        parallel_parts: large files go up as parallel multipart uploads through the s3fs calls
            :mod:`ckptsync.transfer` mirrors (:func:`~ckptsync.transfer.is_s3fs`).
        multipart_uploads: unfinished S3 multipart uploads can exist, and ``gc`` and
            ``abandon`` collect them.
        server_copy: unchanged files are copied server-side from the previous checkpoint.
        timeouts: which client's connect/read timeouts :meth:`open_options` sets.
        filesystem: the fsspec class (``module:Class``) a URL of this family is opened with
            instead of the one fsspec registers for its protocol (Drive:
            :class:`~ckptsync.remote.gdrive.DriveFileSystem`, which takes a Colab user's
            credentials); None: fsspec's.
    """

    name: str
    buckets: bool = False
    native_create_only: bool = False
    overwrites: bool = True
    needs_dirs: bool = False
    upload_via_temp: bool = True
    local_paths: bool = False
    workers: int = 0  # 0 in the family constants: the config's max_workers (choose_backend)
    parallel_parts: bool = False
    multipart_uploads: bool = False
    server_copy: bool = False
    timeouts: Literal["botocore", "aiohttp"] | None = None
    filesystem: str | None = None

    def open_options(self, options: Mapping[str, Any], config: TransferConfig) -> dict[str, Any]:
        """``options`` plus ckptsync's connect and read timeouts for the clients it builds,
        where the user did not set them: without them a black-holed endpoint hangs a call
        for many minutes (every retry layer waiting out its own long default).

        S3 (s3fs over aiobotocore): botocore's ``connect_timeout`` and ``read_timeout`` (a
        read timeout bounds each socket read, not a request), and one botocore attempt per
        call: :class:`~ckptsync.transfer.Retrier` does the retrying, with back-off, and can be
        stopped; and botocore's own request checksums only where an operation requires one
        (ckptsync sends its own with every upload). GCS (gcsfs over aiohttp):
        ``requests_timeout`` as an aiohttp ``ClientTimeout`` with ``sock_connect``/``sock_read``
        (never a total, which would cut a large upload short). Drive goes through
        googleapiclient's httplib2 transport, which already times out each socket operation
        (60 s by default).
        """
        out = dict(options)
        if self.timeouts == "botocore":
            kwargs = dict(out.get("config_kwargs") or {})
            kwargs.setdefault("connect_timeout", config.connect_timeout)
            kwargs.setdefault("read_timeout", config.read_timeout)
            kwargs.setdefault("retries", {"total_max_attempts": 1})
            # ckptsync sends its own checksum with every upload's body (computed in the pass
            # that reads it: transfer/checksums.py); botocore's default computes a CRC32 of
            # every body again. Where an operation requires one, botocore still adds it.
            kwargs.setdefault("request_checksum_calculation", "when_required")
            if not _plain_http(out):
                # Over TLS an upload whose body carries ckptsync's CRC needs no sha256
                # payload signature (botocore's own rule, which looks only for the checksum
                # botocore computed itself: with ours it would sign every body, ~0.9 CPU-s
                # per GB). Over plain http the signature stays: nothing else guards the body.
                s3 = dict(kwargs.get("s3") or {})
                s3.setdefault("payload_signing_enabled", False)
                kwargs["s3"] = s3
            out["config_kwargs"] = kwargs
        elif self.timeouts == "aiohttp" and out.get("requests_timeout") is None:
            try:
                from aiohttp import ClientTimeout
            except ImportError:  # gcsfs is not installed: opening the URL says so
                return out
            out["requests_timeout"] = ClientTimeout(total=None,
                                                    sock_connect=config.connect_timeout,
                                                    sock_read=config.read_timeout)
        return out


def _plain_http(options: Mapping[str, Any]) -> bool:
    """Do these s3fs options talk to the server without TLS (``use_ssl=False``, or an
    ``http://`` endpoint: the options' own, or the one botocore configures from the
    environment or the profile, such as ``AWS_ENDPOINT_URL``)? When the endpoint cannot be
    told, True: bodies stay signed, the safe side."""
    client = options.get("client_kwargs") or {}
    if options.get("use_ssl") is False or client.get("use_ssl") is False:
        return True
    endpoint = configured_endpoint(options)
    return endpoint is None or not endpoint.lower().startswith("https://")


S3 = Backend("s3", buckets=True, native_create_only=True, upload_via_temp=False,
             parallel_parts=True, multipart_uploads=True, server_copy=True,
             timeouts="botocore")
GCS = Backend("gcs", buckets=True, native_create_only=True, upload_via_temp=False,
              server_copy=True, timeouts="aiohttp")
LOCAL_DIR = Backend("local", needs_dirs=True, local_paths=True)
GDRIVE = Backend("gdrive", overwrites=False, needs_dirs=True, upload_via_temp=False, workers=1,
                 filesystem="ckptsync.remote.gdrive:DriveFileSystem")
FSSPEC = Backend("fsspec")

# fsspec protocol (or URL scheme) -> family.
_FAMILIES: dict[str, Backend] = {
    "s3": S3, "s3a": S3, "gs": GCS, "gcs": GCS, "gdrive": GDRIVE,
    "file": LOCAL_DIR, "local": LOCAL_DIR, "memory": FSSPEC,
}


def _protocols(fs: Any) -> tuple[str, ...]:
    proto = getattr(fs, "protocol", ())
    return (proto,) if isinstance(proto, str) else tuple(proto)


def choose_backend(fs: Any, scheme: str, config: TransferConfig) -> Backend:
    """The backend of filesystem ``fs`` reached through a URL of ``scheme``.

    The filesystem says what it is: a :class:`LocalFileSystem` (under any protocol name) is a
    local directory; otherwise its ``protocol`` names the family. Only a filesystem that names
    no known protocol (a caching wrapper of a chained URL, say) falls back on the scheme.
    A wrapper that forwards its target's ``protocol`` and capabilities (a fault seam) thus
    gets its target's backend.

    ``fs`` None: the family the scheme names, before its filesystem is opened (for
    :meth:`Backend.open_options`); capabilities that only the filesystem can show are off.
    """
    if isinstance(fs, LocalFileSystem):
        family, own = LOCAL_DIR, True
    else:
        known = [_FAMILIES[p] for p in _protocols(fs) if p in _FAMILIES]
        family, own = (known[0], True) if known else (_FAMILIES.get(scheme, FSSPEC), False)
    return replace(
        family,
        workers=family.workers or config.max_workers,
        # The multipart path drives s3fs's own calls: only where they are there to drive.
        parallel_parts=family.parallel_parts and is_s3fs(fs),
        # A server-side copy through a filesystem that only the URL says is S3 or GCS (a
        # caching wrapper) might be a download and an upload: not worth it.
        server_copy=family.server_copy and own,
    )
