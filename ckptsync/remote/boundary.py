"""The error boundary: backend exceptions become ckptsync's errors here, and only here.

:func:`translate_error` maps what fsspec or a backend raised to a
:class:`~ckptsync.errors.CkptSyncError` subclass (:class:`ConfigError` for a missing optional
package or an unknown scheme, otherwise :class:`RemoteError` with ``retryable`` set from the
exception's whole chain), keeps the backend exception as ``__cause__`` and scrubs secrets from
both (:mod:`ckptsync.redact`). :func:`open_fs` opens a URL's filesystem through it.

Example::

    try:
        fs.ls(path)
    except Exception as e:
        err = translate_error(e, url, "list")
        raise err from err.__cause__
"""

from __future__ import annotations

import errno
import importlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import fsspec
from fsspec.core import split_protocol

from ckptsync.errors import CkptSyncError, ConfigError, RemoteError
from ckptsync.redact import redact_url, scrub, scrub_exception, secrets_of
from ckptsync.remote.backends import EXTRAS

__all__ = ["EXTRAS", "empty_range", "not_found", "open_fs", "translate_error"]

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


#: What to do about missing or refused credentials, by URL scheme (the default: any backend).
_CREDENTIAL_HINTS = {
    "gdrive": "log in to Google with Drive access: on Colab run `from google.colab import "
              "auth; auth.authenticate_user()` before ckptsync opens the remote (and before "
              "start_watcher, which inherits it); elsewhere `gcloud auth application-default "
              "login --scopes=https://www.googleapis.com/auth/drive,"
              "https://www.googleapis.com/auth/cloud-platform`, or -o token=PATH of an "
              "authorized-user JSON file (a service account's key works too: see "
              "docs/backends.md)",
}

#: S3 error codes for a body whose checksum did not match what the server received: the bytes
#: were damaged in transit, and sending them again may well succeed.
_DAMAGED_CODES = ("BadDigest", "XAmzContentSHA256Mismatch")
#: GCS's 400 for an upload whose declared CRC32C (or MD5) is not that of the bytes received
#: (gcsfs raises it as ``ValueError("Bad Request: ...")``, its reason being "invalid").
_DAMAGED_GCS = ("doesn't match calculated CRC32C", "doesn't match calculated MD5")


def _damaged_in_transit(exc: BaseException) -> bool:
    """The server refused a body whose checksum did not match (anywhere in the chain)."""
    for e in _chain(exc):
        if any(m in str(e) for m in _DAMAGED_GCS):
            return True
        response = getattr(e, "response", None)
        error = response.get("Error", {}) if isinstance(response, Mapping) else {}
        if isinstance(error, Mapping) and error.get("Code") in _DAMAGED_CODES:
            return True
    return False


def not_found(exc: BaseException) -> bool:
    """Whether ``exc``'s chain holds a "not found" (FileNotFoundError or HTTP 404)."""
    return any(isinstance(e, FileNotFoundError) or _http_status(e) == 404 for e in _chain(exc))


def empty_range(exc: BaseException) -> bool:
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

    retryable = denied = False
    if name in _CREDENTIAL_ERRORS:
        what, hint = "no usable credentials", _CREDENTIAL_HINTS.get(scheme, (
            "configure the backend's credentials (AWS env/profile/role, Google ADC, "
            "Drive service account)"
        ))
        denied = True
    elif isinstance(exc, PermissionError) or status in (401, 403):
        what, hint, denied = ("access denied",
                              "check the credentials and their permissions on this path", True)
    elif isinstance(exc, FileNotFoundError) or status == 404:
        what, hint = "not found", "check that the bucket and the path exist"
    elif isinstance(exc, FileExistsError):
        what, hint = "already exists", "a checkpoint name is never reused; this is a conflict"
    elif _transient(exc):
        what, hint, retryable = "temporary failure", "retry later", True
    elif _damaged_in_transit(exc):
        what, hint, retryable = ("refused by the server: the bytes it received do not match "
                                 "their checksum (damaged in transit)", "retry", True)
    elif status is not None and (status >= 500 or status in (408, 429)):
        what, hint, retryable = f"server error {status}", "retry later", True
    elif isinstance(exc, OSError) and exc.errno in _RETRYABLE_ERRNOS:
        what, hint, retryable = "I/O error", "retry later", True
    elif isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        what, hint = "no space left", "free space on the remote or raise its quota"
    elif isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        what, hint, denied = "access denied", "check the permissions on this path", True
    else:
        what, hint = "failed", "check the URL, the credentials and the backend's status"
    return RemoteError(f"cannot {action} {where}: {what} ({detail}); {hint}", url=where,
                       retryable=retryable, denied=denied)


def open_fs(url: str, storage_options: Mapping[str, Any], secrets: list[str],
            filesystem: str | None = None) -> tuple[Any, str]:
    """The filesystem ``url`` names and the root path in it; what fails is translated.

    ``filesystem``: the class (``module:Class``) to open a plain (unchained) URL with instead
    of the one fsspec registers for its protocol (:attr:`Backend.filesystem`).
    """
    try:
        if filesystem is None or "::" in url:
            fs, root = fsspec.core.url_to_fs(url, **storage_options)
        else:
            module, _, name = filesystem.partition(":")
            cls = getattr(importlib.import_module(module), name)
            fs, root = cls(**storage_options), cls._strip_protocol(url)
        return fs, str(root)
    except Exception as e:
        err = translate_error(e, url, "open", secrets=secrets)
        raise err from err.__cause__

