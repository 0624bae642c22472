"""Keeping credentials out of messages, logs and tracebacks.

DESIGN.md: credentials never appear in manifests, logs or error messages. Three tools do it:

- :func:`redact_url` drops the user info (``user:password@``) and the query string of a URL
  before it is shown anywhere;
- :func:`scrub` blanks out of any text the secrets ckptsync knows of (storage option values,
  a URL's password, credential environment variables such as ``AWS_SECRET_ACCESS_KEY``) and
  the values of credential headers and parameters (``Authorization``,
  ``x-amz-security-token``, SSE-C keys, ...), whoever wrote the text (botocore's and s3fs's
  DEBUG logs included); :func:`scrub_exception` does it to an exception chain in place, so a
  backend exception kept as ``__cause__`` prints without them;
- :class:`SecretFilter`, a :class:`logging.Filter` the CLI and the daemon put on their
  handlers, scrubs every record (message, arguments, traceback);
- :func:`install_scrubber` scrubs, as it is made, every record of ckptsync's own loggers and
  of the libraries it drives (botocore, s3fs, gcsfs, urllib3, ...) in any process that opens a
  remote (a training script's own logging included, whatever handlers it configures later).

Example::

    remember(secrets_of({"secret": "..."}, "s3://user:pw@bucket/run"))
    handler.addFilter(SecretFilter())
    print(redact_url("s3://user:pw@bucket/run?x=1"))      # s3://bucket/run
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import unquote

__all__ = [
    "SCRUBBED_LOGGERS",
    "SecretFilter",
    "install_scrubber",
    "redact_url",
    "remember",
    "scrub",
    "scrub_exception",
    "secrets_of",
]

MASK = "***"
_MIN_LEN = 6  # shorter values are too likely to occur in ordinary text to be blanked out
# Storage option keys whose values are settings, not credentials: shown as they are.
_PLAIN_KEYS = frozenset({
    "endpoint_url", "region_name", "region", "project", "profile", "anon", "use_ssl",
    "version_aware", "default_block_size", "default_fill_cache", "default_cache_type",
    "cache_regions", "requester_pays", "asynchronous", "skip_instance_cache",
    "use_listings_cache", "listings_expiry_time", "max_concurrency", "root_file_id",
    "consistency", "signature_version", "addressing_style", "auto_mkdir", "access",
    "retries", "connect_timeout", "read_timeout", "max_pool_connections", "spaces",
    "acl", "fixed_upload_size", "cache_timeout", "check_connection", "timeout",
})
# Environment variables that hold credentials, by name.
_ENV_SECRET = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|PRIVATE|CREDENTIAL_?S?$|_KEY$|"
                         r"CONNECTION_STRING", re.IGNORECASE)
# Credential headers, parameters and fields: their value is blanked wherever it is written
# as NAME: VALUE, NAME=VALUE, 'NAME': 'VALUE' or "NAME": b'VALUE' (botocore's and s3fs's logs,
# canonical requests, query strings, JSON).
_FIELDS = (
    "authorization", "proxy-authorization", "x-amz-security-token",
    "x-amz-server-side-encryption-customer-key",
    "x-amz-copy-source-server-side-encryption-customer-key",
    "x-amz-server-side-encryption-customer-key-md5", "x-goog-encryption-key",
    "x-goog-copy-source-encryption-key", "x-amz-signature", "x-amz-credential", "signature",
    "credential", "ssecustomerkey", "copysourcessecustomerkey", "ssecustomerkeymd5",
    "sse_customer_key", "aws_secret_access_key", "aws_session_token", "aws_security_token",
    "secret_access_key", "session_token", "security_token", "secret", "token", "password",
    "passwd", "access_token", "refresh_token", "id_token", "private_key", "client_secret",
    "api_key", "apikey", "sig",
)
_FIELD_RE = re.compile(
    r"(?<![A-Za-z0-9])((?:" + "|".join(re.escape(f) for f in _FIELDS) + r")['\"]?\s*[:=]\s*)"
    r"(b?'(?:[^'\\]|\\.)*'|b?\"(?:[^\"\\]|\\.)*\"|[^\s'\",&;}\])]+)",
    re.IGNORECASE,
)
_USERINFO_RE = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s'\"]*@")

_known: set[str] = set()
_known_lock = threading.Lock()


def redact_url(url: str) -> str:
    """``url`` without user info or query string (where credentials could hide)."""
    url = re.sub(r"^([a-zA-Z0-9+.-]+://)[^/@]*@", r"\1", url)
    return url.split("?", 1)[0]


def _url_secrets(url: str) -> list[str]:
    m = re.match(r"^[a-zA-Z0-9+.-]+://([^/@]*)@", url)
    if not m:
        return []
    _, sep, password = m.group(1).partition(":")
    out = [m.group(1) + "@"]  # user:password@ as written, whatever its length
    if sep and password:
        out += [password, unquote(password)]
    return out


def _values(obj: Any, sensitive: bool, out: list[str]) -> None:
    if isinstance(obj, (bytes, bytearray)):
        obj = bytes(obj).decode("latin-1")
    if isinstance(obj, str):
        if len(obj) >= _MIN_LEN or (sensitive and len(obj) >= 4 and obj != "anon"):
            out.append(obj)
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            key = str(k).lower()
            if key in _PLAIN_KEYS:
                continue
            _values(v, sensitive or any(w in key for w in ("secret", "token", "key",
                                                          "passw", "cred")), out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _values(v, sensitive, out)


def secrets_of(storage_options: Mapping[str, Any] | None = None,
               url: str | None = None) -> list[str]:
    """The strings to blank out of anything shown for a remote.

    Every string value of ``storage_options`` (nested ones too) except known plain settings
    (``endpoint_url``, ``region_name``, ``project``, ...), and the password of ``url``.
    """
    out: list[str] = []
    _values(dict(storage_options or {}), False, out)
    if url:
        out += _url_secrets(url)
    return sorted(set(out), key=len, reverse=True)


def remember(secrets: Iterable[str]) -> None:
    """Add ``secrets`` to the process-wide set :func:`scrub` always blanks (a remote's
    storage options and URL password, registered when its store is created)."""
    with _known_lock:
        _known.update(s for s in secrets if s)


def _env_secrets() -> list[str]:
    return [v for k, v in os.environ.items()
            if len(v) >= _MIN_LEN and _ENV_SECRET.search(k) and not k.endswith("_KEY_ID")]


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every known secret, credential field value and URL user info blanked.

    Args:
        text: anything about to be shown (a message, a log line, a traceback).
        secrets: more strings to blank, on top of the remembered ones and the credential
            environment variables.
    """
    with _known_lock:
        known = set(_known)
    known.update(s for s in secrets if s)
    known.update(_env_secrets())
    for s in sorted(known, key=len, reverse=True):
        if s in text:
            text = text.replace(s, MASK)
    text = _USERINFO_RE.sub(r"\1" + MASK + "@", text)
    return _FIELD_RE.sub(lambda m: m.group(1) + MASK, text)


class _Redacted(Exception):
    """Stands in, in a chain, for an exception whose text cannot be scrubbed in place."""


def _scrub_one(exc: BaseException, secrets: list[str]) -> BaseException:
    try:
        text = str(exc)
    except Exception:
        text = ""
    notes = getattr(exc, "__notes__", None)
    if isinstance(notes, list):
        exc.__notes__ = [scrub(str(n), secrets) for n in notes]
    if scrub(text, secrets) == text:
        return exc
    try:
        exc.args = tuple(scrub(a, secrets) if isinstance(a, str) else a for a in exc.args)
        if isinstance(exc, OSError):
            for attr in ("strerror", "filename", "filename2"):
                value = getattr(exc, attr, None)
                if isinstance(value, str):
                    setattr(exc, attr, scrub(value, secrets))
        if hasattr(exc, "kwargs") and isinstance(exc.kwargs, dict):  # botocore errors
            exc.kwargs = {k: scrub(v, secrets) if isinstance(v, str) else v
                          for k, v in exc.kwargs.items()}
        text = str(exc)
    except Exception:
        pass
    if scrub(text, secrets) == text:
        return exc
    stand_in = _Redacted(f"{type(exc).__module__}.{type(exc).__qualname__}: "
                         f"{scrub(text, secrets)}")
    stand_in.__cause__ = exc.__cause__
    stand_in.__context__ = exc.__context__
    stand_in.__suppress_context__ = exc.__suppress_context__
    return stand_in.with_traceback(exc.__traceback__)


def scrub_exception(exc: BaseException, secrets: Iterable[str] = ()) -> BaseException:
    """Blank secrets out of ``exc`` and its whole chain (``__cause__``/``__context__``), in
    place where the exception's text comes from its arguments.

    Returns ``exc``, or, when its own text cannot be changed in place, a stand-in exception
    (same traceback and chain) naming its type and the scrubbed text: keep that as the
    ``__cause__`` instead. Links further down the chain are replaced the same way.
    """
    secrets = list(secrets)
    head = _scrub_one(exc, secrets)
    node, seen = head, {id(exc), id(head)}
    while True:
        linked = False
        for attr in ("__cause__", "__context__"):
            nxt = getattr(node, attr)
            if nxt is None or id(nxt) in seen:
                continue
            clean = _scrub_one(nxt, secrets)
            seen.update((id(nxt), id(clean)))
            if clean is not nxt:
                suppress = node.__suppress_context__
                setattr(node, attr, clean)
                node.__suppress_context__ = suppress
            node, linked = clean, True
            break
        if not linked or len(seen) > 64:
            return head


class SecretFilter(logging.Filter):
    """Scrubs every record passing through a handler: message, arguments, traceback.

    Blanks the remembered secrets (:func:`remember`), credential environment variables,
    ``extra`` secrets given here, credential header and parameter values, and URL user info.
    Never drops a record.
    """

    def __init__(self, extra: Iterable[str] = ()) -> None:
        super().__init__()
        self.extra = list(extra)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: show it as it is, scrubbed
            message = f"{record.msg} {record.args}"
        record.msg = scrub(message, self.extra)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text, self.extra)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info, self.extra)
        return True


#: The loggers whose records :func:`install_scrubber` scrubs: ckptsync's and those of the
#: libraries it drives (and whose DEBUG records show requests, headers and URLs).
SCRUBBED_LOGGERS = ("ckptsync", "botocore", "aiobotocore", "boto3", "s3transfer", "s3fs",
                    "gcsfs", "google", "googleapiclient", "urllib3", "aiohttp", "httplib2",
                    "fsspec", "gdrive_fsspec", "requests")
_scrubber_lock = threading.Lock()
_scrubber_installed = False


def _scrubbed(name: str) -> bool:
    return any(name == n or name.startswith(n + ".") for n in SCRUBBED_LOGGERS)


def install_scrubber() -> None:
    """Scrub every log record of :data:`SCRUBBED_LOGGERS` as it is made (idempotent).

    A :class:`logging.Filter` on a logger does not see its children's records, and a
    training script configures its handlers when it likes, so the scrubbing is done where
    every record is made: a record factory wrapping the current one
    (:func:`logging.setLogRecordFactory`). Records of other loggers are left as they are.
    Called whenever a remote store is created, so a trainer logging at DEBUG never shows a
    session token, a URL password or a storage option's secret.
    """
    global _scrubber_installed
    with _scrubber_lock:
        if _scrubber_installed:
            return
        make = logging.getLogRecordFactory()
        secret_filter = SecretFilter()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = make(*args, **kwargs)
            if _scrubbed(record.name):
                secret_filter.filter(record)
            return record

        logging.setLogRecordFactory(factory)
        _scrubber_installed = True


def install_filter(handlers: Iterable[logging.Handler], extra: Iterable[str] = ()) -> None:
    """Put one :class:`SecretFilter` on each of ``handlers`` that has none yet."""
    for h in handlers:
        if not any(isinstance(f, SecretFilter) for f in h.filters):
            h.addFilter(SecretFilter(extra))
