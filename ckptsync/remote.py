"""The remote checkpoint store over any fsspec URL, and its commit protocol.

Layout under the remote root (DESIGN.md, "Remote side")::

    <root>/<name>/<files...>
    <root>/<name>/ckptsync.json     the manifest: its presence is the commit
    <root>/LATEST                   {"name": ..., "step": ...}: a hint, never trusted alone
    <root>/ckptsync-root.json       the marker, written at the first push: this root is ours

Commit protocol (:meth:`RemoteStore.push`): upload every file (parallel, streamed, retried),
check each remote size, write the manifest with a create-only write, then update ``LATEST``.
A reader treats the manifest's presence as the commit, so a push that dies at any point
leaves either nothing committed or a complete checkpoint. Deletion removes the manifest
first, so a half-deleted checkpoint is merely uncommitted and ``gc`` collects it. Every delete
touches only what ckptsync wrote (:mod:`ckptsync.ownership`).

Backend exceptions are translated in one place, :func:`translate_error`, into
:class:`~ckptsync.errors.CkptSyncError` subclasses that keep the backend exception as
``__cause__`` and never mention credentials (nor does the cause: see :mod:`ckptsync.redact`).

Example::

    store = RemoteStore("s3://bucket/runs/exp1")
    store.push(LocalStore("ckpts").list()[-1])
    newest = store.newest_valid()
    store.pull(None, LocalStore("/tmp/restore"))   # newest valid, every digest verified
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from secrets import token_hex
from typing import Any, Literal

import fsspec
from fsspec.core import split_protocol
from fsspec.implementations.local import LocalFileSystem

from ckptsync.config import TransferConfig
from ckptsync.errors import (
    CkptSyncError,
    ConfigError,
    CorruptCheckpointError,
    LocalStorageError,
    ManifestError,
    NoCheckpointError,
    RemoteError,
)
from ckptsync.local import STAGING_PREFIX, FileOps, LocalCheckpoint, LocalStore
from ckptsync.manifest import (
    FORMAT,
    LATEST_NAME,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    FileEntry,
    Manifest,
    manifest_too_large,
    name_sort_key,
    parse_name,
    unusable_reason,
)
from ckptsync.ownership import ROOT_MARKER, check_remote_url
from ckptsync.redact import redact_url, remember, scrub, scrub_exception, secrets_of
from ckptsync.retention import CheckpointInfo, RetentionPolicy, select_for_deletion
from ckptsync.transfer import (
    MultipartStream,
    NullProgress,
    Progress,
    Retrier,
    Slots,
    download_file,
    download_file_ranged,
    hash_remote_file,
    is_s3fs,
    run_parallel,
    stopping,
    upload_file,
    upload_file_multipart,
)

__all__ = ["EXTRAS", "RemoteEntry", "RemoteStore", "redact_url", "translate_error"]

log = logging.getLogger("ckptsync.remote")

#: URL scheme -> the ckptsync extra that installs its fsspec backend.
EXTRAS: dict[str, str] = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "gdrive": "gdrive"}
# Backends whose fsspec implementation exposes a real create-only write (pipe_file mode="create"):
# s3fs sends If-None-Match: * and gcsfs sends ifGenerationMatch=0.
_NATIVE_CREATE_ONLY = {"s3", "s3a", "gs", "gcs"}
_OBJECT_STORES = {"s3", "s3a", "gs", "gcs"}
_RETRYABLE_ERRNOS = {
    errno.EBUSY, errno.EIO, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
    errno.EAGAIN, errno.EPIPE, getattr(errno, "EREMOTEIO", 121), errno.ENETUNREACH,
}
_CREDENTIAL_ERRORS = {
    "NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
    "DefaultCredentialsError", "RefreshError", "TransportError", "InvalidClientTokenId",
}
# Matched against the class name of every exception in the chain (its causes and contexts, and
# the error botocore wraps), so that a read that fails mid-body is retried however the
# libraries wrap it: botocore ResponseStreamingError / IncompleteReadError /
# FlexibleChecksumError, urllib3 ProtocolError / IncompleteRead, http.client IncompleteRead,
# aiohttp ClientPayloadError / ContentLengthError / ServerDisconnectedError.
_TRANSIENT_NAMES = ("Timeout", "Connection", "ServerDisconnected", "ClientPayloadError",
                    "ServiceUnavailable", "TooManyRequests", "Throttl", "SlowDown",
                    "ResponseStreamingError", "IncompleteRead", "FlexibleChecksumError",
                    "ProtocolError", "ContentLengthError", "TransferEncodingError",
                    "ChunkedEncodingError", "RemoteDisconnected")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# The temporary name an upload writes before renaming into place (RemoteStore._upload_task).
_PART_FILE = re.compile(r"^\..+\.part-[0-9a-f]{8}$")
# A temporary file untouched this long belongs to an upload that died (an upload under way
# writes to it at least once per read timeout), so the next push of its checkpoint removes it.
_PART_QUIET_S = 600.0

Status = Literal["valid", "partial", "corrupt", "uncommitted"]


# --------------------------------------------------------------------------- error boundary


def _http_status(exc: BaseException) -> int | None:
    for attr in ("code", "status", "status_code"):
        v = getattr(exc, attr, None)
        if isinstance(v, int) and 100 <= v < 600:
            return v
    resp = getattr(exc, "resp", None)  # googleapiclient.errors.HttpError
    v = getattr(resp, "status", None)
    try:
        return int(v) if v is not None else None
    except (TypeError, ValueError):
        return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then what it wraps: causes, contexts, botocore's ``error`` keyword, exceptions
    among its arguments (urllib3's ``ProtocolError``), breadth first, each once."""
    todo: list[BaseException] = [exc]
    seen: set[int] = set()
    while todo and len(seen) < 32:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        kwargs = getattr(e, "kwargs", None)
        inner = kwargs.get("error") if isinstance(kwargs, dict) else None
        todo += [x for x in (e.__cause__, e.__context__, inner, *e.args)
                 if isinstance(x, BaseException)]


def _transient(exc: BaseException) -> bool:
    """A timeout, a dropped connection or a body cut short anywhere in ``exc``'s chain."""
    return any(
        isinstance(e, (TimeoutError, ConnectionError))
        or any(t in type(e).__name__ for t in _TRANSIENT_NAMES)
        for e in _chain(exc)
    )


def _not_found(exc: BaseException) -> bool:
    """Whether ``exc``'s chain holds a "not found" (FileNotFoundError or HTTP 404)."""
    return any(isinstance(e, FileNotFoundError) or _http_status(e) == 404 for e in _chain(exc))


def _empty_range(exc: BaseException) -> bool:
    """Whether ``exc`` is HTTP 416 (range not satisfiable), the answer of S3 and GCS to a
    ranged read from byte 0 of an empty object; s3fs raises it as an ``OSError`` whose cause
    is botocore's error."""
    e: BaseException | None = exc
    while e is not None:
        response = getattr(e, "response", None)
        meta = response.get("ResponseMetadata", {}) if isinstance(response, Mapping) else {}
        if 416 in (_http_status(e), meta.get("HTTPStatusCode")):
            return True
        e = e.__cause__
    return False


def translate_error(
    exc: BaseException,
    url: str,
    action: str = "access",
    *,
    secrets: Iterable[str] = (),
) -> CkptSyncError:
    """The one boundary between backend exceptions and ckptsync's error tree.

    Args:
        exc: what fsspec or its backend raised.
        url: the remote path involved (user info and query are stripped).
        action: a verb phrase for the message, e.g. ``"upload to"``.
        secrets: strings (from ``storage_options``) to blank out of the message.

    Returns:
        A :class:`ConfigError` for a missing optional package or an unknown scheme, otherwise
        a :class:`RemoteError` whose ``retryable`` says whether trying again may help (a
        timeout, a reset, a body cut short, a 5xx, throttling: anywhere in the exception's
        chain). A :class:`CkptSyncError` is returned unchanged.

        The message never holds a secret (``secrets``, the URL's password, credential
        environment variables, credential header values): they are blanked out of ``exc``'s
        chain too, in place (:func:`ckptsync.redact.scrub_exception`). The result's
        ``__cause__`` is set to ``exc`` (or to its scrubbed stand-in where ``exc``'s text
        could not be changed in place): raise it ``from err.__cause__``.
    """
    if isinstance(exc, CkptSyncError):
        return exc
    secrets = [*secrets, *secrets_of(url=url)]
    where = redact_url(url)
    scheme = split_protocol(url)[0] or "file"
    name = type(exc).__name__
    status = _http_status(exc)
    cause = scrub_exception(exc, secrets)
    detail = f"{name}: {scrub(str(exc) or name, secrets)[:300]}"
    err = _classify(exc, name, status, scheme, where, action, detail)
    err.__cause__ = cause
    return err


def _classify(exc: BaseException, name: str, status: int | None, scheme: str, where: str,
              action: str, detail: str) -> CkptSyncError:
    if isinstance(exc, ImportError):
        extra = EXTRAS.get(scheme)
        hint = (
            f"install it with: pip install 'ckptsync[{extra}]'"
            if extra
            else "install the fsspec backend package for this scheme"
        )
        return ConfigError(
            f"{scheme}:// needs an optional package that is not installed ({detail}); {hint}"
        )
    if isinstance(exc, ValueError) and "Protocol not known" in str(exc):
        return ConfigError(
            f"unknown URL scheme {scheme!r} in {where}; use s3://, gs://, gdrive://, file:// "
            "or memory:// (or another installed fsspec protocol)"
        )

    retryable = False
    if name in _CREDENTIAL_ERRORS:
        what, hint = "no usable credentials", (
            "configure the backend's credentials (AWS env/profile/role, Google ADC, "
            "Drive service account)"
        )
    elif isinstance(exc, PermissionError) or status in (401, 403):
        what, hint = "access denied", "check the credentials and their permissions on this path"
    elif isinstance(exc, FileNotFoundError) or status == 404:
        what, hint = "not found", "check that the bucket and the path exist"
    elif isinstance(exc, FileExistsError):
        what, hint = "already exists", "a checkpoint name is never reused; this is a conflict"
    elif _transient(exc):
        what, hint, retryable = "temporary failure", "retry later", True
    elif status is not None and (status >= 500 or status in (408, 429)):
        what, hint, retryable = f"server error {status}", "retry later", True
    elif isinstance(exc, OSError) and exc.errno in _RETRYABLE_ERRNOS:
        what, hint, retryable = "I/O error", "retry later", True
    elif isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        what, hint = "no space left", "free space on the remote or raise its quota"
    elif isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        what, hint = "access denied", "check the permissions on this path"
    else:
        what, hint = "failed", "check the URL, the credentials and the backend's status"
    return RemoteError(f"cannot {action} {where}: {what} ({detail}); {hint}", url=where,
                       retryable=retryable)


def _with_timeouts(scheme: str, options: Mapping[str, Any],
                   config: TransferConfig) -> dict[str, Any]:
    """``options`` plus ckptsync's connect and read timeouts for the clients it builds, where
    the user did not set them: without them a black-holed endpoint hangs a call for many
    minutes (every retry layer waiting out its own long default).

    S3 (s3fs over aiobotocore): botocore's ``connect_timeout`` and ``read_timeout`` (a read
    timeout bounds each socket read, not a request), and one botocore attempt per call:
    :class:`~ckptsync.transfer.Retrier` does the retrying, with back-off, and can be stopped.
    GCS (gcsfs over aiohttp): ``requests_timeout`` as an aiohttp ``ClientTimeout`` with
    ``sock_connect``/``sock_read`` (never a total, which would cut a large upload short).
    Drive goes through googleapiclient's httplib2 transport, which already times out each
    socket operation (60 s by default).
    """
    out = dict(options)
    if scheme in ("s3", "s3a"):
        kwargs = dict(out.get("config_kwargs") or {})
        kwargs.setdefault("connect_timeout", config.connect_timeout)
        kwargs.setdefault("read_timeout", config.read_timeout)
        kwargs.setdefault("retries", {"total_max_attempts": 1})
        out["config_kwargs"] = kwargs
    elif scheme in ("gs", "gcs") and out.get("requests_timeout") is None:
        try:
            from aiohttp import ClientTimeout
        except ImportError:  # gcsfs is not installed: opening the URL says so
            return out
        out["requests_timeout"] = ClientTimeout(total=None, sock_connect=config.connect_timeout,
                                                sock_read=config.read_timeout)
    return out


def _open_fs(url: str, storage_options: Mapping[str, Any], secrets: list[str]) -> tuple[Any, str]:
    try:
        fs, root = fsspec.core.url_to_fs(url, **storage_options)
        return fs, str(root)
    except Exception as e:
        err = translate_error(e, url, "open", secrets=secrets)
        raise err from err.__cause__


def _to_epoch(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, datetime):
        return (v if v.tzinfo else v.replace(tzinfo=timezone.utc)).timestamp()
    if isinstance(v, str):
        try:
            return _to_epoch(datetime.fromisoformat(v.replace("Z", "+00:00")))
        except ValueError:
            return None
    return None


def _mtime(info: Mapping[str, Any]) -> float | None:
    for key in ("mtime", "LastModified", "updated", "modifiedTime", "created", "timeCreated"):
        t = _to_epoch(info.get(key))
        if t is not None:
            return t
    return None


class _ManifestExists(CkptSyncError):
    """Private: the create-only manifest write found a manifest already there."""


# --------------------------------------------------------------------------- the store


@dataclass(frozen=True)
class RemoteEntry:
    """One top-level prefix of the remote, as :meth:`RemoteStore.scan` sees it.

    ``status``: ``valid`` (manifest parses, every file has its listed size), ``partial``
    (manifest present, a file missing or of the wrong size), ``corrupt`` (manifest does not
    parse, is unsafe, or cannot be used: :func:`~ckptsync.manifest.unusable_reason`; then
    ``manifest`` is kept), ``uncommitted`` (no manifest: an upload in progress or a leftover).
    """

    name: str
    status: Status
    manifest: Manifest | None
    size: int
    mtime: float | None
    problem: str | None = None


class RemoteStore:
    """Committed checkpoints under one fsspec URL.

    Args:
        url: ``s3://bucket/prefix``, ``gs://...``, ``gdrive://...``, ``file:///path``,
            ``memory://...`` or a plain local path.
        storage_options: passed to fsspec unchanged (credentials, endpoint, ...).
        fs: an fsspec filesystem to use instead of the one the URL names (a fault seam for
            tests, or a pre-built client); ``url`` still names the root.
        config: transfer settings (default: :meth:`TransferConfig.resolve`).
        ops: the file system calls made where the remote is a local path (``file://``, a
            mounted drive): its fsyncs make every file durable before the manifest (a fault
            seam for tests).

    Raises:
        ConfigError: unknown scheme, or the backend's optional package is missing.
        RemoteError: the backend cannot be set up.
    """

    def __init__(
        self,
        url: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        fs: Any = None,
        config: TransferConfig | None = None,
        ops: FileOps | None = None,
    ) -> None:
        check_remote_url(url)
        self._ops = ops or FileOps()
        self.url = url.rstrip("/") or url
        self.config = config or TransferConfig.resolve()
        options = dict(storage_options or {})
        self._secrets = secrets_of(options, url)
        remember(self._secrets)  # for the log filter (botocore's and s3fs's records too)
        self.scheme = (split_protocol(url)[0] or "file").split("::")[-1]
        if fs is None:
            fs, root = _open_fs(url, _with_timeouts(self.scheme, options, self.config),
                                self._secrets)
        else:
            root = fs._strip_protocol(url)
        self.fs = fs
        self.root = str(root).rstrip("/")
        self._local = isinstance(fs, LocalFileSystem)
        # Object stores have no directories; local paths and Drive need parents created.
        self._needs_dirs = self._local or self.scheme in ("file", "local", "gdrive")
        # Drive keeps two files of one name side by side instead of overwriting.
        self._no_overwrite = self.scheme == "gdrive"
        # Objects in S3, GCS and Drive appear whole when their upload completes; elsewhere a
        # file being written is visible, so upload to a temporary name and rename it.
        self._upload_via_temp = self.scheme not in _OBJECT_STORES and not self._no_overwrite
        # gdrive-fsspec shares one httplib2 connection, which is not thread-safe: one at a time.
        self._workers = 1 if self.scheme == "gdrive" else self.config.max_workers
        self._retry = Retrier(self.config, self._translate)
        # s3fs: large files go up as parallel multipart uploads (transfer.upload_file_multipart).
        self._parallel_parts = self.scheme in ("s3", "s3a") and is_s3fs(fs)
        # Server-side copy of files unchanged since the previous checkpoint (no bytes sent).
        self._server_copy = type(fs).__name__ in ("S3FileSystem", "GCSFileSystem")
        self._stats_lock = threading.Lock()
        self._marked = False  # this store has seen (or written) the root marker
        self._stream_slots = Slots(self.config.parts_in_flight)
        self.stats: dict[str, int] = {"bytes_uploaded": 0, "bytes_copied": 0}
        """Totals over this store's pushes: bytes sent, and bytes copied server-side instead."""

    def __repr__(self) -> str:
        return f"RemoteStore({redact_url(self.url)!r})"

    # ------------------------------------------------------------------ helpers

    def _translate(self, exc: BaseException, url: str, action: str) -> CkptSyncError:
        return translate_error(exc, url, action, secrets=self._secrets)

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def url_of(self, *parts: str) -> str:
        """The user-facing URL of ``parts`` under the root (for messages)."""
        return "/".join([redact_url(self.url), *parts])

    def _call(self, fn: Callable[[], Any], url: str, action: str) -> Any:
        return self._retry.call(fn, url=url, action=action)

    def _rel(self, full: str, base: str) -> str:
        full = full.rstrip("/")
        base = base.rstrip("/")
        return full[len(base) + 1 :] if full.startswith(base + "/") else full

    def _missing_root(self) -> None:
        """Raise if the bucket itself is missing (a listing of a missing prefix is just empty)."""
        if self.scheme not in _OBJECT_STORES:
            return
        bucket = self.root.split("/", 1)[0]
        exists = self._call(lambda: self.fs.exists(bucket), self.url, "list")
        if not exists:
            raise RemoteError(
                f"no such bucket {scrub(bucket, self._secrets)!r} for {redact_url(self.url)}; "
                "create it or fix the URL",
                url=redact_url(self.url),
                retryable=False,
            )

    def _ls_root(self) -> list[dict[str, Any]]:
        def ls() -> list[dict[str, Any]]:
            try:
                self.fs.invalidate_cache(self.root)
                return list(self.fs.ls(self.root, detail=True))
            except FileNotFoundError:
                return []

        entries: list[dict[str, Any]] = self._call(ls, self.url, "list")
        if not entries:
            self._missing_root()
        return entries

    def _names(self) -> list[str]:
        """Top-level checkpoint directory names (committed or not), one listing call."""
        out = []
        for e in self._ls_root():
            name = self._rel(e["name"], self.root)
            if e.get("type") == "directory" and _SAFE_NAME.match(name) and "/" not in name:
                out.append(name)
        return out

    def _read_bytes(self, path: str, url: str) -> bytes | None:
        """A small object's bytes (None when missing), never more than the manifest bound + 1:
        a longer result means the object is over the bound, and it was not read whole."""
        def cat() -> bytes | None:
            try:
                return bytes(self.fs.cat_file(path, start=0, end=MAX_MANIFEST_BYTES + 1))
            except FileNotFoundError:
                return None
            except Exception as e:
                if _empty_range(e):
                    return b""
                raise

        result: bytes | None = self._call(cat, url, "read")
        return result

    def _size_or_none(self, path: str, url: str) -> int | None:
        """The size of ``path`` for an error message; None if it cannot be had."""
        try:
            size: int = self._call(lambda: int(self.fs.size(path)), url, "stat")
        except CkptSyncError as e:
            log.debug("cannot stat %s: %s", url, e)
            return None
        return size

    def _parse_manifest(self, name: str, data: bytes) -> Manifest:
        where = self.url_of(name, MANIFEST_NAME)
        if len(data) > MAX_MANIFEST_BYTES:  # only the first bound + 1 bytes were read
            raise manifest_too_large(where, self._size_or_none(self._path(name, MANIFEST_NAME),
                                                               where))
        m = Manifest.from_json(data, where=where)
        if m.name != name:
            raise ManifestError(f"{where}: manifest names {m.name!r} but lives under {name!r}")
        return m

    def read_manifest(self, name: str) -> Manifest | None:
        """The manifest of ``name``, or None when it is not committed.

        Raises:
            ManifestError: the manifest does not parse, is unsafe, or names another checkpoint.
            RemoteError: the backend failed.
        """
        if not _SAFE_NAME.match(name):
            raise ConfigError(f"invalid checkpoint name {name!r}")
        data = self._read_bytes(self._path(name, MANIFEST_NAME), self.url_of(name, MANIFEST_NAME))
        return None if data is None else self._parse_manifest(name, data)

    def _find(self, name: str | None = None) -> dict[str, dict[str, Any]]:
        """Relative path -> backend info of every object under ``<root>/<name>/`` (the whole
        root without ``name``): one listing, uncached."""
        prefix = self.root if name is None else self._path(name)

        def find() -> dict[str, Any]:
            try:
                self.fs.invalidate_cache(prefix)
                return dict(self.fs.find(prefix, detail=True))
            except FileNotFoundError:
                return {}

        url = self.url if name is None else self.url_of(name)
        found: dict[str, Any] = self._call(find, url, "list")
        return {self._rel(p, prefix): i for p, i in found.items()}

    def _sizes(self, name: str) -> dict[str, int]:
        """Relative path -> size of every object under ``<root>/<name>/`` (one listing)."""
        return {rel: int(i.get("size") or 0) for rel, i in self._find(name).items()}

    def _check_sizes(self, m: Manifest, sizes: Mapping[str, int] | None = None) -> None:
        """Raise :class:`CorruptCheckpointError` unless ``m`` is usable and every file it lists
        is there with its size: what "valid" means before any byte is read."""
        reason = unusable_reason(m)
        if reason is not None:
            url = self.url_of(m.name)
            raise CorruptCheckpointError(f"{url}: {reason}", path=url)
        sizes = self._sizes(m.name) if sizes is None else sizes
        for f in m.files:
            url = self.url_of(m.name, f.path)
            if f.path not in sizes:
                raise CorruptCheckpointError(
                    f"{url}: file listed in the manifest is missing", path=url
                )
            if sizes[f.path] != f.size:
                raise CorruptCheckpointError(
                    f"{url}: size {sizes[f.path]} != {f.size} in the manifest (truncated or "
                    "altered)",
                    path=url,
                )

    # ------------------------------------------------------------------ LATEST hint

    def read_latest(self) -> str | None:
        """The checkpoint name ``LATEST`` points to, or None (missing, unreadable, unsafe)."""
        try:
            data = self._read_bytes(self._path(LATEST_NAME), self.url_of(LATEST_NAME))
        except RemoteError as e:
            log.debug("cannot read the LATEST hint: %s", e)
            return None
        if data is None or len(data) > MAX_MANIFEST_BYTES:
            return None
        try:
            name = json.loads(data).get("name")
        except (ValueError, AttributeError, UnicodeDecodeError):
            return None
        return name if isinstance(name, str) and _SAFE_NAME.match(name) else None

    def _update_latest(self, m: Manifest) -> None:
        current = self.read_latest()
        if current is not None and name_sort_key(current) >= name_sort_key(m.name):
            return
        data = (json.dumps({"name": m.name, "step": m.step, "created": m.created}) + "\n").encode()
        path = self._path(LATEST_NAME)

        def write() -> None:
            if self._local:
                self._local_replace(path, data)
                return
            if self._no_overwrite and self.fs.exists(path):
                self.fs.rm_file(path)
            self.fs.pipe_file(path, data)

        try:
            self._call(write, self.url_of(LATEST_NAME), "write")
        except CkptSyncError as e:
            # LATEST is only a hint: the commit already happened.
            log.warning("checkpoint %s is committed, but the LATEST hint was not updated: %s",
                        m.name, e)

    # ------------------------------------------------------------------ manifest commit

    def _fsync_file(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            self._ops.fsync(fd)  # the data of every descriptor of the file, this one included
        finally:
            os.close(fd)

    def _durable_rename(self, tmp: str, final: str) -> None:
        """A local upload into place: its bytes on disk first, then the rename (the names
        are made durable by :meth:`_fsync_dirs` before the manifest)."""
        self._fsync_file(tmp)
        os.replace(tmp, final)

    def _fsync_dirs(self, m: Manifest) -> None:
        """Make the names of ``m``'s files (and of its directory) durable: before the
        manifest, or a power cut could leave a manifest listing files that are not there."""
        dirs = {self._path(m.name)} | {
            self._path(m.name, *f.path.split("/")[:-1]) for f in m.files if "/" in f.path}
        for d in sorted(dirs, reverse=True):
            self._ops.fsync_dir(Path(d))
        self._ops.fsync_dir(Path(self.root))

    def _local_replace(self, path: str, data: bytes) -> None:
        tmp = f"{path}.tmp-{token_hex(4)}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _local_create_only(self, path: str, data: bytes) -> None:
        # Write a temporary file, then hard-link it into place: link() fails if the target
        # exists, so this is a true create-only write and readers never see a partial file.
        tmp = f"{os.path.dirname(path)}/.{MANIFEST_NAME}.tmp-{token_hex(4)}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise
        except OSError:
            # Some mounts (FUSE, e.g. a mounted Google Drive) have no hard links: fall back to
            # check-then-rename, which is not atomic against a second writer of the same name.
            if os.path.exists(path):
                raise FileExistsError(path) from None
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self._ops.fsync_dir(Path(os.path.dirname(path)))  # the commit itself is durable

    def _create_only(self, path: str, url: str, data: bytes, action: str) -> None:
        """Write ``path`` only if it does not exist yet.

        Raises :class:`_ManifestExists` if something is already there.
        """

        def write() -> None:
            try:
                if self._local:
                    self._local_create_only(path, data)
                else:
                    # S3: If-None-Match: * ; GCS: ifGenerationMatch=0 (native create-only).
                    # Other backends (memory, Drive, ...) have no create-only write: fsspec's
                    # pipe_file(mode="create") checks, then writes. Unique names make a second
                    # writer of the same name a rare, benign race (both write the same bytes).
                    self.fs.pipe_file(path, data, mode="create")
            except FileExistsError:  # S3 on moto/AWS, GCS, local, memory
                raise _ManifestExists(path) from None
            except OSError as e:
                # SeaweedFS answers 412 without the If-None-Match condition, which s3fs maps
                # to OSError(EINVAL); tell it from a real EINVAL by looking.
                if e.errno == errno.EINVAL and self.scheme in _NATIVE_CREATE_ONLY:
                    self.fs.invalidate_cache(path)
                    if self.fs.exists(path):
                        raise _ManifestExists(path) from e
                raise

        self._call(write, url, action)

    def _create_manifest(self, name: str, data: bytes) -> None:
        """Write ``<name>/ckptsync.json`` only if it does not exist: the commit point.

        Raises :class:`_ManifestExists` if a manifest is already there.
        """
        self._create_only(self._path(name, MANIFEST_NAME), self.url_of(name, MANIFEST_NAME), data,
                          "commit manifest to")

    # ------------------------------------------------------------------ ownership

    def has_marker(self) -> bool:
        """Whether the root carries ckptsync's marker (:data:`~ckptsync.ownership.ROOT_MARKER`)."""
        if not self._marked:
            data = self._read_bytes(self._path(ROOT_MARKER), self.url_of(ROOT_MARKER))
            self._marked = data is not None
        return self._marked

    def _ensure_marker(self) -> None:
        """Mark the root as ckptsync's before the first file of the first push lands there, so
        that ``gc`` may later collect that push's leftovers (and nothing else)."""
        if self.has_marker():
            return
        if self._needs_dirs:
            self._call(partial(self.fs.makedirs, self.root, exist_ok=True), self.url, "create")
        from ckptsync import __version__

        data = (json.dumps({"format": FORMAT, "writer": f"ckptsync {__version__}",
                            "created": datetime.now(timezone.utc).isoformat()}) + "\n").encode()
        with contextlib.suppress(_ManifestExists):  # another writer marked it first
            self._create_only(self._path(ROOT_MARKER), self.url_of(ROOT_MARKER), data, "mark")
        self._marked = True

    def check_owned(self, entries: Iterable[RemoteEntry] | None = None) -> bool:
        """Whether ckptsync may delete under this root: it carries the marker, or (a root
        written before the marker existed) at least one committed ckptsync checkpoint.

        Returns False for a root that holds nothing at all (nothing to delete either).

        Raises:
            ConfigError: the root holds something, but nothing ckptsync wrote.
        """
        if self.has_marker():
            return True
        entries = self.scan() if entries is None else entries
        if any(e.status in ("valid", "partial") and parse_name(e.name) for e in entries):
            return True
        if not self._ls_root():
            return False
        raise ConfigError(
            f"{redact_url(self.url)} is not a ckptsync remote: it has no {ROOT_MARKER} marker "
            "and no ckptsync checkpoint, so nothing under it was deleted. Check the URL; "
            "ckptsync only ever deletes what it wrote"
        )

    # ------------------------------------------------------------------ public API

    def _read_manifests(self, names: list[str]) -> dict[str, Manifest | CkptSyncError | None]:
        if not names:
            return {}
        paths = [self._path(n, MANIFEST_NAME) for n in names]

        def cat() -> list[Any]:
            # Ranged reads (concurrent where the backend is async): a manifest over the bound
            # shows as bound + 1 bytes and is refused, never read whole.
            n = len(paths)
            return list(self.fs.cat_ranges(paths, [0] * n, [MAX_MANIFEST_BYTES + 1] * n,
                                           on_error="return"))

        raw: list[Any] = self._call(cat, self.url, "read manifests from")
        out: dict[str, Manifest | CkptSyncError | None] = {}
        for name, data in zip(names, raw, strict=True):
            if isinstance(data, Exception) and _empty_range(data):
                data = b""
            if data is None or isinstance(data, FileNotFoundError):
                out[name] = None
            elif isinstance(data, BaseException):
                err = self._translate(data, self.url_of(name, MANIFEST_NAME), "read")
                if isinstance(err, RemoteError) and err.retryable:
                    raise err from err.__cause__
                out[name] = err
            else:
                try:
                    out[name] = self._parse_manifest(name, bytes(data))
                except ManifestError as e:
                    out[name] = e
        return out

    def scan(self) -> list[RemoteEntry]:
        """Every top-level prefix with its status, oldest first (one listing of the whole
        remote plus every manifest). Used by ``ls``, retention and ``gc``."""
        top = [e for e in self._ls_root() if e.get("type") == "directory"]
        names = [self._rel(e["name"], self.root) for e in top]
        names = [n for n in names if _SAFE_NAME.match(n)]
        dir_mtime = {self._rel(e["name"], self.root): _mtime(e) for e in top}
        found = self._find() if names else {}
        files: dict[str, dict[str, int]] = {n: {} for n in names}
        mtimes: dict[str, list[float]] = {n: [] for n in names}
        for rel, info in found.items():
            head, _, rest = rel.partition("/")
            if head in files and rest:
                files[head][rest] = int(info.get("size") or 0)
                t = _mtime(info)
                if t is not None:
                    mtimes[head].append(t)
        manifests = self._read_manifests(names)
        out = []
        for n in names:
            size = sum(files[n].values())
            t = max(mtimes[n]) if mtimes[n] else dir_mtime.get(n)
            m = manifests.get(n)
            if m is None and not files[n] and self.scheme in _OBJECT_STORES:
                # An empty "directory" on an object store (SeaweedFS keeps one after its
                # objects are deleted) holds nothing: there is nothing to list or collect.
                continue
            if m is None:
                out.append(RemoteEntry(n, "uncommitted", None, size, t))
            elif isinstance(m, CkptSyncError):
                out.append(RemoteEntry(n, "corrupt", None, size, t, str(m)))
            else:
                try:
                    self._check_sizes(m, files[n])
                    out.append(RemoteEntry(n, "valid", m, m.total_size, t))
                except CorruptCheckpointError as e:
                    status: Status = "corrupt" if unusable_reason(m) else "partial"
                    out.append(RemoteEntry(n, status, m, size, t, str(e)))

        def key(e: RemoteEntry) -> Any:
            return e.manifest.sort_key() if e.manifest else name_sort_key(e.name)

        out.sort(key=key)
        return out

    def iter_committed(self) -> Iterator[RemoteEntry]:
        """Committed checkpoints (a manifest is there), newest first, each with its status
        (``valid``, ``partial`` or ``corrupt``, as :meth:`scan` says; ``mtime`` not read),
        reading manifests lazily.

        One listing of the root, then for each candidate one manifest read and one listing
        of its prefix, stopping as soon as the caller does. Names sort by (step, creation
        time), so the listing alone gives the order; ``LATEST`` adds its checkpoint to the
        candidates even when an eventually consistent listing does not show it yet (it is
        still checked like any other).
        """
        names = set(self._names())
        hint = self.read_latest()
        if hint is not None:
            names.add(hint)
        for name in sorted(names, key=name_sort_key, reverse=True):
            try:
                m = self.read_manifest(name)
            except ManifestError as e:
                yield RemoteEntry(name, "corrupt", None, 0, None, str(e))
                continue
            if m is None:
                continue  # uncommitted: an upload in progress or a leftover
            sizes = self._sizes(name)
            try:
                self._check_sizes(m, sizes)
            except CorruptCheckpointError as e:
                status: Status = "corrupt" if unusable_reason(m) else "partial"
                yield RemoteEntry(name, status, m, sum(sizes.values()), None, str(e))
                continue
            yield RemoteEntry(name, "valid", m, m.total_size, None)

    def iter_valid(self) -> Iterator[Manifest]:
        """Valid checkpoints, newest first, reading manifests lazily (:meth:`iter_committed`);
        the others are logged and skipped."""
        for e in self.iter_committed():
            if e.status == "valid" and e.manifest is not None:
                yield e.manifest
            else:
                log.warning("remote checkpoint %s is not valid, skipping it: %s", e.name,
                            e.problem)

    def newest_valid(self) -> Manifest | None:
        """The newest valid checkpoint, or None. Cheap: O(1) manifest reads in the usual case."""
        return next(self.iter_valid(), None)

    def push(
        self,
        ckpt: LocalCheckpoint,
        *,
        progress: Progress | None = None,
        stop: threading.Event | None = None,
        streams: Mapping[str, MultipartStream] | None = None,
    ) -> Manifest:
        """Upload a committed local checkpoint and commit it remotely.

        ``streams`` (relative path -> :meth:`stream_file` sink fed while the file was written)
        are completed instead of uploading those files again; any that cannot be completed
        is dropped and its file uploaded normally.

        Files are uploaded (in parallel, retried), their remote sizes checked, then the
        manifest is written with a create-only write, then ``LATEST`` is updated. Pushing a
        name that is already committed is a no-op. Setting ``stop`` abandons the upload
        (never committed).

        Returns:
            The remote manifest.

        Raises:
            RemoteError: the backend failed (after retries), or the remote holds a different
                checkpoint under the same name.
            LocalStorageError, CorruptCheckpointError: a local file is unreadable or changed
                since its commit.
        """
        streams = dict(streams or {})
        try:
            with stopping(stop):  # a stop also cuts short every retry's back-off
                return self._push(ckpt, progress, stop, streams)
        finally:
            for s in streams.values():  # idempotent: completed ones are already closed
                s.abort()

    def stream_file(self, name: str, relpath: str) -> MultipartStream | None:
        """A sink uploading ``<name>/<relpath>`` while it is being written locally (S3 only;
        None elsewhere). Pass it to :meth:`push` once the local checkpoint is committed; the
        file stays invisible (an incomplete multipart upload) until then."""
        if not self._parallel_parts or not _SAFE_NAME.match(name):
            return None
        return MultipartStream(self.fs, self._path(name, relpath),
                               url=self.url_of(name, relpath), config=self.config,
                               retrier=self._retry, slots=self._stream_slots)

    def _push(self, ckpt: LocalCheckpoint, progress: Progress | None,
              stop: threading.Event | None, streams: dict[str, MultipartStream]) -> Manifest:
        m = ckpt.manifest
        name = m.name
        existing = self.read_manifest(name)
        if existing is not None:
            return self._same_or_conflict(existing, m)
        progress = progress or NullProgress()
        self._ensure_marker()
        if self._no_overwrite:
            leftovers = [rel for rel in self._sizes(name) if rel != MANIFEST_NAME]
        else:
            # Elsewhere an upload overwrites; only the temporary files of an attempt that
            # died (file://, mounts) stay behind under their random names.
            leftovers = self._stale_parts(name)
        for rel in leftovers:  # a failed attempt's files (Drive would duplicate them)
            # A second writer of this very name may have committed since we looked: never
            # delete a file of a committed checkpoint. Looking again before each delete
            # narrows that race to one request; should it still be lost, this push goes on
            # to upload the same bytes again before it meets the other's manifest.
            existing = self.read_manifest(name)
            if existing is not None:
                return self._same_or_conflict(existing, m)
            def rm(path: str = self._path(name, rel)) -> None:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(path)

            self._call(rm, self.url_of(name, rel), "delete")
        if self._needs_dirs:
            dirs = {self._path(name)} | {
                self._path(name, *f.path.split("/")[:-1]) for f in m.files if "/" in f.path
            }
            for d in sorted(dirs):
                self._call(partial(self.fs.makedirs, d, exist_ok=True), self.url_of(name), "create")

        sources = self._unchanged_sources(m)
        slots = Slots(self.config.parts_in_flight)  # multipart parts held
        progress.start(m.total_size, f"push {name}")
        try:
            tasks = [
                partial(self._upload_task, ckpt, f.path, progress=progress, slots=slots,
                        source=sources.get((f.algo, f.digest, f.size)),
                        stream=streams.get(f.path))
                for f in m.files
            ]
            run_parallel(tasks, max_workers=self._workers, stop=stop)
        finally:
            progress.close()
        # Every file is there with its size before the manifest makes the checkpoint exist.
        sizes = self._sizes(name)
        try:
            self._check_sizes(m, sizes)
        except CorruptCheckpointError as e:
            raise RemoteError(f"upload of {name} did not land intact: {e}", url=self.url_of(name),
                              retryable=True) from e
        if stop is not None and stop.is_set():
            raise RemoteError(f"push of {name} was stopped before its commit",
                              url=self.url_of(name), retryable=False)
        if self._local:  # every file durable, under its final name, before the manifest
            self._call(partial(self._fsync_dirs, m), self.url_of(name), "sync")
        try:
            self._create_manifest(name, m.to_json())
        except _ManifestExists:
            # A concurrent writer won. Its manifest may not be readable yet (S3 refuses a
            # conditional write while another one to the key is in progress): look again.
            other = self.read_manifest(name)
            for delay in (0.05, 0.2, 0.5, 1.0, 2.0):
                if other is not None:
                    break
                time.sleep(delay)
                self.fs.invalidate_cache(self._path(name))
                other = self.read_manifest(name)
            if other is None:
                raise RemoteError(f"{self.url_of(name, MANIFEST_NAME)}: create-only write refused "
                                  "but no manifest is there", retryable=True) from None
            return self._same_or_conflict(other, m)
        log.info("committed %s to %s", name, redact_url(self.url))
        self._update_latest(m)
        return m

    def _stale_parts(self, name: str) -> list[str]:
        """Temporary files under ``name`` that nobody has written to for
        :data:`_PART_QUIET_S`: left by an attempt that died, not one under way (a second
        pusher of the same checkpoint)."""
        if not self._upload_via_temp:
            return []
        cutoff = time.time() - _PART_QUIET_S
        return sorted(rel for rel, info in self._find(name).items()
                      if _PART_FILE.match(rel.rsplit("/", 1)[-1])
                      and (t := _mtime(info)) is not None and t < cutoff)

    def _same_or_conflict(self, remote: Manifest, local: Manifest) -> Manifest:
        if remote.files != local.files:
            raise RemoteError(
                f"{self.url_of(local.name)} already holds a different checkpoint of the same "
                "name; names are never reused, so the remote was written by another tool: "
                "inspect it and delete it if it is not wanted",
                url=self.url_of(local.name),
                retryable=False,
            )
        return remote

    def _unchanged_sources(self, m: Manifest) -> dict[tuple[str, str, int], str]:
        """(algo, digest, size) -> remote path of that content in the previous committed checkpoint.

        Only on backends with a server-side copy. The previous checkpoint is the one ``LATEST``
        names, read through its manifest (committed, so its files had their listed sizes).
        Costs two small reads; any trouble just means uploading everything.
        """
        if not self._server_copy:
            return {}
        try:
            hint = self.read_latest()
            prev = self.read_manifest(hint) if hint is not None and hint != m.name else None
        except CkptSyncError as e:
            log.debug("no previous checkpoint to copy unchanged files from: %s", e)
            return {}
        if prev is None:
            return {}
        return {(f.algo, f.digest, f.size): self._path(prev.name, f.path)
                for f in prev.files if f.size}

    def _copy_unchanged(self, source: str, final: str, entry: FileEntry, url: str) -> bool:
        """Server-side copy ``source`` to ``final``; False (upload instead) if it fails."""
        def copy() -> None:
            self.fs.copy(source, final)
            self.fs.invalidate_cache(final)
            size = int(self.fs.info(final).get("size") or 0)
            if size != entry.size:
                raise CorruptCheckpointError(f"{url}: copy has {size} bytes, not {entry.size}",
                                             path=url)

        try:
            self._call(copy, url, "copy to")
        except CkptSyncError as e:
            log.info("server-side copy of %s failed, uploading it instead: %s", url, e)
            return False
        with self._stats_lock:
            self.stats["bytes_copied"] += entry.size
        return True

    def _upload_task(
        self, ckpt: LocalCheckpoint, relpath: str, stop: threading.Event, *, progress: Progress,
        slots: Slots | None = None, source: str | None = None,
        stream: MultipartStream | None = None,
    ) -> None:
        entry = next(f for f in ckpt.manifest.files if f.path == relpath)
        final = self._path(ckpt.name, relpath)
        url = self.url_of(ckpt.name, relpath)
        # Sent while it was serialized: the stream got exactly the bytes hashed into entry.
        if stream is not None and stream.finish(entry, progress):
            with self._stats_lock:
                self.stats["bytes_uploaded"] += entry.size
            return
        # The previous checkpoint holds these very bytes (same digest): copy, do not send.
        # The copy's size is checked, and every download verifies its digest as usual.
        if source is not None and self._copy_unchanged(source, final, entry, url):
            progress.update(entry.size)
            return
        with self._stats_lock:
            self.stats["bytes_uploaded"] += entry.size
        if self._parallel_parts and slots is not None and entry.size > self.config.part_size:
            upload_file_multipart(self.fs, ckpt.file(relpath), final, entry, url=url,
                                  config=self.config, retrier=self._retry, slots=slots,
                                  progress=progress, stop=stop)
            return
        target, finish = final, None
        if self._upload_via_temp:
            head, _, base = final.rpartition("/")
            target = f"{head}/.{base}.part-{token_hex(4)}"
            finish = partial(self._durable_rename if self._local else self.fs.mv, target, final)
        try:
            upload_file(
                self.fs,
                ckpt.file(relpath),
                target,
                entry,
                url=self.url_of(ckpt.name, relpath),
                config=self.config,
                retrier=self._retry,
                progress=progress,
                stop=stop,
                finish=finish,
            )
        except BaseException as e:
            if target != final:  # a failed attempt removes its own temporary file
                with contextlib.suppress(Exception):
                    self.fs.rm_file(target)
            if isinstance(e, RemoteError) and not e.retryable and _not_found(e):
                # This push already read the root's marker, so the bucket is there: a "not
                # found" here is an upload session that finished while its reply was lost
                # (gcsfs sends the last request of a resumable upload again). Ambiguous: a new
                # upload resolves it.
                raise RemoteError(f"cannot upload to {url}: the server no longer knew the upload "
                                  "when its last request was sent again (the reply to it was "
                                  "lost); retry the push", url=url, retryable=True) from e
            raise

    def pull(
        self,
        name: str | None,
        local: LocalStore,
        *,
        newer_than: Manifest | None = None,
        progress: Progress | None = None,
        stop: threading.Event | None = None,
        skipped: list[tuple[str, str]] | None = None,
    ) -> LocalCheckpoint:
        """Download a checkpoint into ``local`` (digests verified while streaming) and commit it.

        The local copy keeps the remote manifest as it is: each file is hashed while written
        with its entry's algorithm, so a ``ckptsync/1`` checkpoint stays a sha256-verified
        ``ckptsync/1`` checkpoint locally, and a ``ckptsync/2`` one keeps its BLAKE3 digests.

        A file whose bytes do not match its manifest is downloaded again, up to
        ``config.digest_attempts`` times in all, before its checkpoint counts as corrupt.

        Args:
            name: the checkpoint; None means the newest valid one, falling back to the next
                newest when a download turns out corrupt.
            local: the local store to commit into (through its staging directory: nothing
                partial is ever visible, nothing is written outside it).
            newer_than: with ``name=None``, only consider checkpoints newer than this one.
            skipped: with ``name=None``, given a list, ``(name, why)`` is appended to it for
                each committed checkpoint newer than the one pulled that was passed over
                (newest first): it is not empty exactly when pull fell back.

        Raises:
            NoCheckpointError: nothing (valid, newer) to pull.
            CorruptCheckpointError: ``name`` was given and does not verify (names the path).
            RemoteError, LocalStorageError: transfer or local write failures.
        """
        if name is not None:
            m = self.read_manifest(name)
            if m is None:
                raise NoCheckpointError(f"no committed checkpoint {self.url_of(name)}")
            self._check_sizes(m)
            return self._pull_one(m, local, progress, stop)
        passed: list[tuple[str, str]] = [] if skipped is None else skipped
        for e in self.iter_committed():
            if newer_than is not None and (
                    e.manifest.sort_key() <= newer_than.sort_key() if e.manifest is not None
                    else name_sort_key(e.name) <= name_sort_key(newer_than.name)):
                break
            if e.status != "valid" or e.manifest is None:
                log.warning("remote checkpoint %s is not valid, skipping it: %s", e.name,
                            e.problem)
                passed.append((e.name, e.problem or e.status))
                continue
            try:
                return self._pull_one(e.manifest, local, progress, stop)
            except CorruptCheckpointError as err:
                log.warning("%s; falling back to the previous remote checkpoint", err)
                passed.append((e.name, str(err)))
        raise NoCheckpointError(
            f"no valid checkpoint{' newer than ' + newer_than.name if newer_than else ''} "
            f"in {redact_url(self.url)}"
        )

    def _pull_one(
        self,
        m: Manifest,
        local: LocalStore,
        progress: Progress | None,
        stop: threading.Event | None,
    ) -> LocalCheckpoint:
        for own in (local.directory / m.name, local.directory / f"{STAGING_PREFIX}{m.name}"):
            if own.is_symlink():  # planted: reading, deleting or committing would follow it
                raise LocalStorageError(
                    f"cannot pull {m.name}: {own} is a symlink, and ckptsync never writes "
                    "through one; remove it or pull into another directory")
        try:
            have = local.get(m.name)
        except NoCheckpointError:
            have = None
        except ManifestError as e:  # a local copy with a torn manifest: replace it too
            log.warning("local copy has a bad manifest, downloading it again: %s", e)
            local.delete(m.name)
            have = None
        if have is not None:
            try:
                local.verify(have, full=True)
                if have.manifest.files == m.files:
                    return have
            except CorruptCheckpointError as e:
                log.warning("local copy is corrupt, downloading it again: %s", e)
            local.delete(m.name)
        leftover = local.directory / f"{STAGING_PREFIX}{m.name}"
        if leftover.exists():  # our own crashed pull of this unique name
            shutil.rmtree(leftover, ignore_errors=True)
        progress = progress or NullProgress()
        staging = local.staging(m.name)
        try:
            progress.start(m.total_size, f"pull {m.name}")
            slots = threading.BoundedSemaphore(self._workers)  # range blocks held at once
            tasks = [partial(self._download_task, staging, m, f.path, progress=progress,
                             slots=slots)
                     for f in m.files]
            run_parallel(tasks, max_workers=self._workers, stop=stop)
            ckpt = staging.commit(m)
        except BaseException:
            staging.abort()
            raise
        finally:
            progress.close()
        log.info("pulled %s from %s into %s", m.name, redact_url(self.url), local.directory)
        return ckpt

    def _download_task(
        self, staging: Any, m: Manifest, relpath: str, stop: threading.Event, *,
        progress: Progress, slots: threading.Semaphore,
    ) -> None:
        entry = next(f for f in m.files if f.path == relpath)
        url = self.url_of(m.name, relpath)
        path = self._path(m.name, relpath)
        attempts = self.config.digest_attempts
        for attempt in range(1, attempts + 1):
            writer = staging.open(relpath, entry.algo)
            try:
                if entry.size >= self.config.ranged_min_size and self._workers > 1:
                    download_file_ranged(self.fs, path, writer, entry, url=url,
                                         config=self.config, retrier=self._retry, slots=slots,
                                         progress=progress, stop=stop)
                else:
                    download_file(self.fs, path, writer, entry, url=url, config=self.config,
                                  retrier=self._retry, progress=progress, stop=stop)
                got = staging.close_file(relpath)
                if got.digest != entry.digest:
                    what = f"{url}: {entry.algo} digest does not match the manifest"
                    raise CorruptCheckpointError(
                        f"{what} (the remote file was altered: {attempts} downloads did not "
                        "match)" if attempt == attempts else what, path=url)
                return
            except CorruptCheckpointError as e:
                # A short body or a flipped byte in transit reads like a corrupt file: only
                # the same mismatch, download after download, is damage at rest.
                progress.update(-writer.size)
                staging.discard(relpath)
                if attempt == attempts:
                    raise
                log.warning("%s; downloading it again (attempt %d of %d)", e, attempt + 1,
                            attempts)

    def verify(
        self,
        name: str,
        *,
        full: bool = True,
        progress: Progress | None = None,
        stop: threading.Event | None = None,
    ) -> Manifest:
        """Check that ``name`` is committed, every file has its size and, if ``full``, its digest
        (streamed, files in parallel; each with its entry's algorithm).

        Raises:
            NoCheckpointError: ``name`` is not committed.
            CorruptCheckpointError: naming the first remote file that does not match.
        """
        m = self.read_manifest(name)
        if m is None:
            raise NoCheckpointError(f"no committed checkpoint {self.url_of(name)}")
        self._check_sizes(m)
        if not full:
            return m
        progress = progress or NullProgress()

        def task(entry: FileEntry, ev: threading.Event) -> None:
            url = self.url_of(name, entry.path)
            _, digest = hash_remote_file(self.fs, self._path(name, entry.path), url=url,
                                         config=self.config, retrier=self._retry,
                                         progress=progress, stop=ev, algo=entry.algo)
            if digest != entry.digest:
                raise CorruptCheckpointError(
                    f"{url}: {entry.algo} digest does not match the manifest (the remote file "
                    "was altered)",
                    path=url,
                )

        progress.start(m.total_size, f"verify {name}")
        try:
            run_parallel([partial(task, f) for f in m.files],
                         max_workers=self._workers, stop=stop)
        finally:
            progress.close()
        return m

    def delete(self, name: str) -> None:
        """Delete a checkpoint: the manifest first (it stops existing), then its files.

        Raises:
            ConfigError: ``name`` is not a ckptsync checkpoint name (nothing is deleted).
        """
        if not _SAFE_NAME.match(name) or parse_name(name) is None:
            raise ConfigError(f"refusing to delete {self.url_of(name)!r}: {name!r} is not a "
                              "ckptsync checkpoint name, and ckptsync deletes only what it wrote")
        manifest = self._path(name, MANIFEST_NAME)

        def rm_manifest() -> None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(manifest)

        def rm_rest() -> None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self._path(name), recursive=True)

        self._call(rm_manifest, self.url_of(name, MANIFEST_NAME), "delete")
        self._call(rm_rest, self.url_of(name), "delete")
        self.fs.invalidate_cache(self.root)
        log.info("deleted %s from %s", name, redact_url(self.url))

    def abandon(self, name: str) -> list[str]:
        """Remove what an abandoned push of ``name`` left: its files and, on S3, its unfinished
        multipart uploads. For the pusher that gave ``name`` up (stopped, failed for good,
        superseded), so that nothing waits for ``gc``'s grace period.

        Only a ckptsync checkpoint name, under a root ckptsync marked, and only while it is
        uncommitted: with a manifest there (committed, or an ambiguous push that did commit)
        nothing is touched.

        Returns:
            What was removed: ``name`` (its files) and ``multipart:<key>`` entries; [] when
            there was nothing to remove or ``name`` is committed.

        Raises:
            ConfigError: ``name`` is not a ckptsync checkpoint name (nothing is deleted).
            RemoteError: the backend failed (what is left is still ``gc``'s).
        """
        if not _SAFE_NAME.match(name) or parse_name(name) is None:
            raise ConfigError(f"refusing to abandon {self.url_of(name)!r}: {name!r} is not a "
                              "ckptsync checkpoint name, and ckptsync deletes only what it wrote")
        if not self.has_marker():
            return []  # nothing of ours was ever pushed here
        try:
            committed = self.read_manifest(name) is not None
        except ManifestError:
            committed = True  # a manifest is there, if a bad one: not ours to remove here
        if committed:
            log.info("%s is committed: nothing to abandon", self.url_of(name))
            return []
        removed = self._gc_multipart(float("inf"), False, name)
        if self._sizes(name) or (self._needs_dirs and self._call(
                partial(self.fs.exists, self._path(name)), self.url_of(name), "stat")):

            def rm() -> None:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm(self._path(name), recursive=True)

            self._call(rm, self.url_of(name), "delete")
            removed.append(name)
        self.fs.invalidate_cache(self.root)
        if removed:
            log.info("removed the abandoned upload of %s from %s", name, redact_url(self.url))
        return removed

    def apply_retention(
        self, policy: RetentionPolicy, protect: Iterable[str] = (), *, dry_run: bool = False
    ) -> list[str]:
        """Delete the valid checkpoints ``policy`` does not keep; return their names.

        Only valid checkpoints with ckptsync names count (the newest valid one is always
        kept); partial or corrupt ones are left for a human (``ckptsync ls`` shows them), and
        anything ckptsync did not write is never touched.
        """
        infos = [
            CheckpointInfo(e.name, e.manifest.step, e.manifest.sort_key(), e.manifest.metrics)
            for e in self.scan()
            if e.status == "valid" and e.manifest is not None and parse_name(e.name) is not None
        ]
        doomed = select_for_deletion(infos, policy, protect)
        if not dry_run:
            for name in doomed:
                self.delete(name)
        return doomed

    def gc(
        self, grace_s: float | None = None, *, dry_run: bool = False, now: float | None = None
    ) -> list[str]:
        """Remove uncommitted prefixes (no manifest) older than ``grace_s`` seconds and, on S3,
        multipart uploads under the root initiated longer ago than that.

        Only what ckptsync wrote: prefixes whose names parse as checkpoint names, and multipart
        uploads of keys inside such prefixes, under a root that ckptsync owns
        (:meth:`check_owned`). A prefix whose age the backend does not report is kept.
        Returns what was (or, with ``dry_run``, would be) removed: checkpoint names and
        ``multipart:<key>`` entries.

        Raises:
            ConfigError: the root holds entries, none of them written by ckptsync (nothing
                is deleted).
        """
        grace = self.config.grace_s if grace_s is None else grace_s
        now = datetime.now(timezone.utc).timestamp() if now is None else now
        removed: list[str] = []
        entries = self.scan()
        if not self.check_owned(entries):
            return removed  # an empty root: nothing there at all
        for e in entries:
            if e.status != "uncommitted" or parse_name(e.name) is None:
                continue
            if e.mtime is None or now - e.mtime < grace:
                continue
            removed.append(e.name)
            if not dry_run:
                path = self._path(e.name)
                self._call(partial(self.fs.rm, path, recursive=True), self.url_of(e.name), "delete")
        removed.extend(self._gc_multipart(now - grace, dry_run))
        removed.extend(self._gc_parts(now - grace, dry_run, skip=set(removed)))
        return removed

    def _gc_parts(self, cutoff: float, dry_run: bool, skip: set[str]) -> list[str]:
        """Temporary files of failed uploads (``.<file>.part-<hex>``, file:// and mounts)
        written before ``cutoff`` inside ckptsync checkpoint prefixes, committed ones too (a
        failed attempt before the one that committed); ``part:<name>/<path>`` entries."""
        if not self._upload_via_temp:
            return []
        out = []
        for rel, info in sorted(self._find().items()):
            head, _, rest = rel.partition("/")
            if not rest or head in skip or parse_name(head) is None:
                continue
            t = _mtime(info)
            if not _PART_FILE.match(rest.rsplit("/", 1)[-1]) or t is None or t > cutoff:
                continue
            out.append(f"part:{rel}")
            if not dry_run:
                def rm(p: str = self._path(rel)) -> None:
                    with contextlib.suppress(FileNotFoundError):
                        self.fs.rm_file(p)

                self._call(rm, self.url_of(rel), "delete")
        return out

    def _gc_multipart(self, cutoff: float, dry_run: bool, name: str | None = None) -> list[str]:
        lister = getattr(self.fs, "list_multipart_uploads", None)
        abort = getattr(self.fs, "abort_mpu", None)
        if lister is None or abort is None or self.scheme not in ("s3", "s3a"):
            return []
        bucket, _, prefix = self.root.partition("/")
        uploads = self._call(partial(lister, bucket), self.url, "list multipart uploads in")
        out = []
        for u in uploads or []:
            key = u.get("Key", "")
            started = _to_epoch(u.get("Initiated"))
            if prefix and not key.startswith(prefix + "/"):
                continue
            head = key[len(prefix) + 1:] if prefix else key
            if parse_name(head.split("/", 1)[0]) is None:
                continue  # not inside a ckptsync checkpoint: somebody else's upload
            if name is not None and head.split("/", 1)[0] != name:
                continue
            if started is None or started > cutoff:
                continue
            out.append(f"multipart:{key}")
            if not dry_run:
                self._call(partial(abort, bucket, key, u["UploadId"]), f"s3://{bucket}/{key}",
                           "abort multipart upload of")
        return out

    # Defined last: inside the class body the name "list" would shadow the builtin.
    def list(self) -> list[Manifest]:
        """Committed checkpoints (manifest present and parseable), oldest first.

        Reads every manifest (concurrently where the backend allows); bad manifests are
        logged and skipped. Validity (file sizes) is not checked: see :meth:`scan`.
        """
        names = self._names()
        manifests = self._read_manifests(names)
        out = [m for m in manifests.values() if isinstance(m, Manifest)]
        for n, m in manifests.items():
            if isinstance(m, CkptSyncError):
                log.warning("skipping remote checkpoint %s: %s", n, m)
        out.sort(key=lambda m: m.sort_key())
        return out
