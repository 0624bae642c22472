"""Backends as classes: each family of storage is one class that says what its storage can do
and owns its specifics, including any private API of its library (fenced, with a public
fallback and one warning). The model is torchsnapshot's storage plugins.

- :class:`Backend` (``base``): any fsspec filesystem (``memory://`` and the rest), through
  fsspec's public API; the hooks every other class overrides.
- :class:`LocalDir` (``local``): a local or mounted directory (``file://``, ``local://``, a
  plain path such as a Colab-mounted Google Drive).
- :class:`ObjectStore` (``objectstore``): what S3 and GCS share (buckets, a conditional
  create-only write, server-side copies).
- :class:`S3` (``s3``, with ``s3client`` and ``s3object``): S3 through s3fs, its parallel
  multipart uploads and ranged reads through a blocking botocore client.
- :class:`GCS` (``gcs``): GCS through gcsfs, with the CRC32C its uploads declare.
- :class:`Drive` (``gdrive``): Google Drive through gdrive-fsspec.

:data:`SCHEMES` is the one table from a URL scheme (or an fsspec protocol) to its backend
class; :func:`choose_backend` is the only place in ckptsync that looks at a scheme, a
filesystem's protocol or its class to decide behaviour.

Example::

    backend = choose_backend(fs, "s3", config)
    if backend.parallel_parts: ...
"""

from __future__ import annotations

from typing import Any

from fsspec.implementations.local import LocalFileSystem

from ckptsync.config import TransferConfig
from ckptsync.remote.backends.base import Backend, CommitKind, MultipartUploadInfo
from ckptsync.remote.backends.gcs import GCS
from ckptsync.remote.backends.gdrive import Drive
from ckptsync.remote.backends.local import LocalDir
from ckptsync.remote.backends.objectstore import ObjectStore
from ckptsync.remote.backends.s3 import S3

__all__ = ["EXTRAS", "GCS", "S3", "SCHEMES", "Backend", "CommitKind", "Drive", "LocalDir",
           "MultipartUploadInfo", "ObjectStore", "backend_class", "choose_backend"]

#: fsspec protocol (or URL scheme) -> the backend class of its family.
SCHEMES: dict[str, type[Backend]] = {
    "s3": S3, "s3a": S3, "gs": GCS, "gcs": GCS, "gdrive": Drive,
    "file": LocalDir, "local": LocalDir, "memory": Backend,
}

#: URL scheme -> the ckptsync extra that installs its fsspec backend.
EXTRAS: dict[str, str] = {s: cls.extra for s, cls in SCHEMES.items() if cls.extra}


def backend_class(scheme: str) -> type[Backend]:
    """The backend class a URL of ``scheme`` names (:class:`Backend` for any other)."""
    return SCHEMES.get(scheme, Backend)


def _protocols(fs: Any) -> tuple[str, ...]:
    proto = getattr(fs, "protocol", ())
    return (proto,) if isinstance(proto, str) else tuple(proto)


def choose_backend(fs: Any, scheme: str, config: TransferConfig) -> Backend:
    """The backend of filesystem ``fs`` reached through a URL of ``scheme``.

    The filesystem says what it is: a :class:`LocalFileSystem` (under any protocol name) is a
    local directory; otherwise its ``protocol`` names the family. Only a filesystem that names
    no known protocol (a caching wrapper of a chained URL, say) falls back on the scheme, and
    its backend is then not its ``own`` (no server-side copies through it). A wrapper that
    forwards its target's ``protocol`` and capabilities (a fault seam) thus gets its target's
    backend.
    """
    if isinstance(fs, LocalFileSystem):
        return LocalDir(fs, config)
    known = [SCHEMES[p] for p in _protocols(fs) if p in SCHEMES]
    if known:
        return known[0](fs, config)
    return backend_class(scheme)(fs, config, own=False)
