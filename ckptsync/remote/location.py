"""Where a store reads and writes: :class:`Location`, the remote root every part of a
:class:`~ckptsync.remote.RemoteStore` shares.

A location is the opened filesystem, the root path in it, the URL as it may be shown (no user
info, no query), the backend (:mod:`ckptsync.remote.backends`), the local file operations
used where the remote is a directory, and the one call every request goes through
(:meth:`Location.call`: retried by the one policy, translated at the error boundary,
:mod:`ckptsync.remote.boundary`). It also holds the raw reads every part needs: what is at
the root, what is under a prefix, and a small object's bytes (never more than the manifest
bound plus one).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

from fsspec.core import split_protocol

from ckptsync.atomic import FileOps
from ckptsync.config import TransferConfig
from ckptsync.errors import CkptSyncError, RemoteError
from ckptsync.manifest import MAX_MANIFEST_BYTES
from ckptsync.mounts import mounted_remote
from ckptsync.ownership import check_remote_url
from ckptsync.redact import install_scrubber, redact_url, remember, scrub, secrets_of
from ckptsync.remote.backends import backend_class, choose_backend
from ckptsync.remote.boundary import empty_range, open_fs, translate_error
from ckptsync.transfer import Retrier

__all__ = ["SAFE_NAME", "Location", "mtime", "to_epoch"]

log = logging.getLogger("ckptsync.remote")

#: A top-level entry the store lists at all (checkpoint names, and foreign names that a scan
#: reports but never touches). Wider than manifest.parse_name on purpose: ``ls`` shows what
#: else is there, and ``gc`` refuses a root holding only such entries.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def to_epoch(v: Any) -> float | None:
    """A backend's timestamp (seconds, a datetime, an ISO string) as seconds since the epoch."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, datetime):
        return (v if v.tzinfo else v.replace(tzinfo=timezone.utc)).timestamp()
    if isinstance(v, str):
        try:
            return to_epoch(datetime.fromisoformat(v.replace("Z", "+00:00")))
        except ValueError:
            return None
    return None


def mtime(info: Mapping[str, Any]) -> float | None:
    """When an object was last written, from its backend info (None: not reported)."""
    for key in ("mtime", "LastModified", "updated", "modifiedTime", "created", "timeCreated"):
        t = to_epoch(info.get(key))
        if t is not None:
            return t
    return None


class Location:
    """The remote root of one store (see the module docstring).

    Args:
        url: ``s3://bucket/prefix``, ``gs://...``, ``gdrive://...``, ``file:///path``,
            ``memory://...`` or a plain local path.
        storage_options: passed to fsspec unchanged, plus the backend's timeouts where the
            user set none (:meth:`~ckptsync.remote.backends.Backend.open_options`).
        fs: a filesystem to use instead of the one the URL names.
        config: transfer settings (default: :meth:`TransferConfig.resolve`).
        ops: the file operations made where the remote is a local directory (a fault seam).

    Raises:
        ConfigError: an empty or unusable URL, an unknown scheme, a missing optional package.
        RemoteError: the backend cannot be set up.
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None, *,
                 fs: Any = None, config: TransferConfig | None = None,
                 ops: FileOps | None = None) -> None:
        check_remote_url(url)
        self.url = redact_url(url.rstrip("/") or url)
        """The remote URL as it may be shown: without user info or query string."""
        self.config = config or TransferConfig.resolve()
        options = dict(storage_options or {})
        self.secrets = secrets_of(options, url)
        remember(self.secrets)  # for the log scrubber (botocore's and s3fs's records too)
        install_scrubber()
        self.scheme = (split_protocol(url)[0] or "file").split("::")[-1]
        if fs is None:
            family = backend_class(self.scheme)
            opened = family.open_options(options, self.config)
            fs, root = open_fs(url, opened, self.secrets, family.filesystem)
        else:
            root = fs._strip_protocol(url)
        self.fs = fs
        self.root = str(root).rstrip("/")
        self.backend = choose_backend(fs, self.scheme, self.config)
        """What the storage can do, and its specifics (:mod:`ckptsync.remote.backends`)."""
        self.mount = mounted_remote(self.root) if self.backend.commit == "rename" else None
        """The FUSE mount (Colab's Drive) the remote directory is on, where "committed" means
        handed to the mount (:mod:`ckptsync.mounts`); None elsewhere."""
        self.ops = ops or FileOps()
        self.retry = Retrier(self.config, self.translate)

    # ------------------------------------------------------------------ names and calls

    def translate(self, exc: BaseException, url: str, action: str) -> CkptSyncError:
        """``exc`` through the error boundary, this store's secrets blanked out."""
        return translate_error(exc, url, action, secrets=self.secrets)

    def path(self, *parts: str) -> str:
        """The filesystem path of ``parts`` under the root."""
        return "/".join([self.root, *parts])

    def url_of(self, *parts: str) -> str:
        """The user-facing URL of ``parts`` under the root (for messages)."""
        return "/".join([redact_url(self.url), *parts])

    def call(self, fn: Callable[[], Any], url: str, action: str) -> Any:
        """``fn()``, retried by the one policy and translated (``action`` ``url`` in errors)."""
        return self.retry.call(fn, url=url, action=action)

    def rel(self, full: str, base: str) -> str:
        """``full`` relative to ``base`` (unchanged where it is not under it)."""
        full = full.rstrip("/")
        base = base.rstrip("/")
        return full[len(base) + 1 :] if full.startswith(base + "/") else full

    def remove(self, *parts: str) -> None:
        """Delete the object ``parts`` under the root (gone already: fine)."""
        path = self.path(*parts)

        def rm() -> None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(path)

        self.call(rm, self.url_of(*parts), "delete")

    def remove_tree(self, *parts: str) -> None:
        """Delete everything under ``parts`` (gone already: fine)."""
        path = self.path(*parts)

        def rm() -> None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(path, recursive=True)

        self.call(rm, self.url_of(*parts), "delete")

    def forget(self, *parts: str) -> None:
        """Drop the filesystem's cache of ``parts`` (a listing, an object's info)."""
        self.backend.forget(self.path(*parts))

    # ------------------------------------------------------------------ raw reads

    def check_bucket(self) -> None:
        """Raise if the bucket itself is missing (a listing of a missing prefix is just empty).

        Raises:
            RemoteError: naming the bucket and the URL (not retryable).
        """
        bucket = self.backend.bucket_of(self.root)
        if bucket is None:
            return
        if not self.call(lambda: self.fs.exists(bucket), self.url, "list"):
            raise RemoteError(
                f"no such bucket {scrub(bucket, self.secrets)!r} for {redact_url(self.url)}; "
                "create it or fix the URL", url=redact_url(self.url), retryable=False)

    def ls_root(self) -> list[dict[str, Any]]:
        """What is at the root (one uncached listing); a missing bucket raises."""
        def ls() -> list[dict[str, Any]]:
            try:
                self.fs.invalidate_cache(self.root)
                return list(self.fs.ls(self.root, detail=True))
            except FileNotFoundError:
                return []

        entries: list[dict[str, Any]] = self.call(ls, self.url, "list")
        if not entries:
            self.check_bucket()
        return entries

    def names(self) -> list[str]:
        """Top-level checkpoint directory names (committed or not), one listing call."""
        out = []
        for e in self.ls_root():
            name = self.rel(e["name"], self.root)
            if e.get("type") == "directory" and SAFE_NAME.match(name) and "/" not in name:
                out.append(name)
        return out

    def find(self, name: str | None = None) -> dict[str, dict[str, Any]]:
        """Relative path -> backend info of every object under ``<root>/<name>/`` (the whole
        root without ``name``): one listing, uncached."""
        prefix = self.root if name is None else self.path(name)

        def find() -> dict[str, Any]:
            try:
                self.fs.invalidate_cache(prefix)
                return dict(self.fs.find(prefix, detail=True))
            except FileNotFoundError:
                return {}

        url = self.url if name is None else self.url_of(name)
        found: dict[str, Any] = self.call(find, url, "list")
        return {self.rel(p, prefix): i for p, i in found.items()}

    def sizes(self, name: str) -> dict[str, int]:
        """Relative path -> size of every object under ``<root>/<name>/`` (one listing)."""
        return {rel: int(i.get("size") or 0) for rel, i in self.find(name).items()}

    def read_small(self, *parts: str) -> bytes | None:
        """The bytes of the small object ``parts`` (None when missing), never more than the
        manifest bound + 1: a longer result means the object is over the bound, and it was
        not read whole. A 416 for the ranged read (S3's and GCS's answer for an empty
        object) reads as no bytes."""
        path = self.path(*parts)

        def cat() -> bytes | None:
            try:
                return bytes(self.fs.cat_file(path, start=0, end=MAX_MANIFEST_BYTES + 1))
            except FileNotFoundError:
                return None
            except Exception as e:
                if empty_range(e):
                    return b""
                raise

        result: bytes | None = self.call(cat, self.url_of(*parts), "read")
        return result

    def size_or_none(self, *parts: str) -> int | None:
        """The size of ``parts`` for an error message; None if it cannot be had."""
        path = self.path(*parts)
        try:
            size: int = self.call(lambda: int(self.fs.size(path)), self.url_of(*parts), "stat")
        except CkptSyncError as e:
            log.debug("cannot stat %s: %s", self.url_of(*parts), e)
            return None
        return size
