"""The s3fs/botocore boundary: every use of their private API in ckptsync, each behind a guard.

s3fs runs every request on its one event-loop thread, and botocore and aiohttp do the
per-byte work there: the payload sha256 that SigV4 signs over plain http, copies of each body
(and TLS over https). However many parts or ranges are in flight, that is one core for every
byte moved. The bulk calls (``upload_part``, ranged ``get_object``) therefore go through a
blocking botocore client built like s3fs's (:func:`_blocking_client`), from the transfer
threads, which share that work between cores as boto3's transfer manager does; the few small
calls (create, complete, abort, head) stay on s3fs (:class:`_BlockingS3`).

That client is one per filesystem and bucket (:class:`_Clients`), kept with its connection
pool for the filesystem's life: every file, push and pull reuses its connections (on a cloud
link a new connection costs a TCP and a TLS handshake, round trips per file). The rule for
credentials: it signs every request with s3fs's current credentials, the very object s3fs's
client refreshes (temporary ones from a role, SSO, a credential process or
``AWS_CREDENTIAL_EXPIRATION`` are renewed before they expire), never a copy frozen when it was
built. A ranged read goes from the socket straight into the caller's reused buffer
(:func:`_read_body_into`), not into a fresh ``bytes`` per range.

The private API used, and where:

- ``S3FileSystem._call_s3`` (:meth:`_BlockingS3.call`): the small calls, and parts when no
  blocking client could be built;
- ``S3FileSystem._get_s3_method_kwargs`` (:meth:`_BlockingS3.upload_part`,
  :meth:`_BlockingS3.get_range`): s3fs's request-wide extras (SSE-C keys, RequestPayer);
- ``S3FileSystem.get_s3``, the aiobotocore client's ``_get_credentials`` and botocore's
  ``Config._user_provided_options`` (:func:`_blocking_client`);
- botocore's ``StreamingBody._raw_stream`` and urllib3's ``HTTPResponse._fp``
  (:func:`_read_body_into`): without them (or for an encoded body) a range is read with the
  public ``StreamingBody.read`` and copied into the buffer, no warning (only slower);
- ``s3fs.errors.translate_boto_error``: the blocking client's errors read as s3fs's;
- ``S3File.s3_additional_kwargs``, ``mpu``, ``blocksize`` (:func:`single_put_extras`): the
  checksum of a small file's one PUT (without them, that PUT goes without it).

The guard: when one of these is missing, or its call raises ``AttributeError`` or
``TypeError`` (s3fs or botocore changed), :class:`S3ApiChanged` is raised and ONE warning per
filesystem names what failed and the s3fs and botocore versions. From then on that
filesystem's transfers use the public fsspec API (:func:`private_api_usable` is False): a
multipart upload becomes a plain streamed upload (:mod:`ckptsync.transfer.multipart`), a
ranged read ``fs.cat_file`` (:func:`range_reader`). Other errors are the backend's own, and
come out as s3fs raises them, so both paths read the same to
:func:`ckptsync.remote.translate_error`.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.metadata
import logging
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from ckptsync.errors import CkptSyncError

__all__ = ["S3ApiChanged", "configured_endpoint", "is_s3fs", "private_api_usable",
           "range_reader", "single_put_extras"]

log = logging.getLogger(__name__)

RangeReader = Callable[[int, int, bytearray], "memoryview | bytes"]
"""``read(start, end, buf)``: bytes ``[start, end)`` of one remote file (fewer where it ends
first), read into ``buf`` (at least ``end - start`` long) where the backend allows (a view of
``buf`` is returned), else as fresh ``bytes``."""

# What a changed library raises: a name gone (AttributeError, ImportError), a call whose
# signature changed (TypeError).
_CHANGED = (AttributeError, TypeError, ImportError)


class S3ApiChanged(CkptSyncError):
    """s3fs or botocore no longer has (or no longer takes) a private API ckptsync uses.

    Never reaches the user: the transfer that meets it goes on through the public fsspec API.
    """

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} is missing or no longer works (s3fs or botocore changed)")
        self.what = what


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class _FallenBack:
    """The filesystems (by identity, not fsspec's token equality) whose private API failed,
    and what failed; an entry goes with its filesystem."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._what: dict[int, str] = {}

    def add(self, fs: Any, what: str) -> bool:
        """Record ``fs``; True the first time (the caller warns), False after."""
        key = id(fs)
        with self._lock:
            if key in self._what:
                return False
            self._what[key] = what
        # Not weak-referenceable (TypeError): kept for the life of the process.
        with contextlib.suppress(TypeError):
            weakref.finalize(fs, self._forget, key)
        return True

    def _forget(self, key: int) -> None:
        with self._lock:
            self._what.pop(key, None)

    def get(self, fs: Any) -> str | None:
        with self._lock:
            return self._what.get(id(fs))


_fallen_back = _FallenBack()


def fallen_back(fs: Any) -> str | None:
    """What private API failed on ``fs`` (its transfers now use the public API), or None."""
    return _fallen_back.get(fs)


@contextlib.contextmanager
def _guard(fs: Any, what: str) -> Iterator[None]:
    """Within the block, ``AttributeError``/``TypeError``/``ImportError`` mean that ``what``
    changed: warn once for ``fs``, and raise :class:`S3ApiChanged`."""
    try:
        yield
    except _CHANGED as e:
        if _fallen_back.add(fs, what):
            log.warning(
                "%s is missing or no longer works with s3fs %s and botocore %s (%s: %s); "
                "transfers through this filesystem use the public fsspec API from now on "
                "(large files go slower)", what, _version("s3fs"), _version("botocore"),
                type(e).__name__, e)
        raise S3ApiChanged(what) from e


def is_s3fs(fs: Any) -> bool:
    """Is ``fs`` an s3fs filesystem whose calls :class:`_BlockingS3` can mirror?"""
    return all(hasattr(fs, a) for a in ("_call_s3", "loop", "split_path",
                                        "_get_s3_method_kwargs"))


def single_put_extras(f: Any) -> dict[str, Any] | None:
    """The arguments an s3fs file sends with the one PUT it makes at close (the file is under
    its block size, no multipart upload begun): add the body's checksum there. None when
    ``f`` makes no such PUT (another backend, a multipart upload) or s3fs changed (its
    private ``S3File.s3_additional_kwargs``, ``mpu`` and ``blocksize``)."""
    if not is_s3fs(getattr(f, "fs", None)) or fallen_back(f.fs) is not None:
        return None
    extras = getattr(f, "s3_additional_kwargs", None)
    try:
        single = getattr(f, "mpu", ...) is None and f.tell() < int(f.blocksize)
    except (AttributeError, TypeError, ValueError):
        return None
    return extras if single and isinstance(extras, dict) else None


def private_api_usable(fs: Any) -> bool:
    """Is ``fs`` an s3fs filesystem whose private API has not failed (see the module doc)?"""
    return is_s3fs(fs) and fallen_back(fs) is None


_botocore_lock = threading.Lock()
_botocore_session: Any = None


def _session() -> Any:
    """The process's one botocore session (its loaded service models are reused); call with
    ``_botocore_lock`` held: botocore sessions are not thread-safe."""
    import botocore.session

    global _botocore_session
    if _botocore_session is None:
        _botocore_session = botocore.session.get_session()
    return _botocore_session


def configured_endpoint(options: Mapping[str, Any]) -> str | None:
    """The endpoint URL an S3 client made from these s3fs ``options`` talks to.

    The options' own ``endpoint_url`` (or ``client_kwargs["endpoint_url"]``), else the one
    botocore itself configures: ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``, or the
    ``endpoint_url`` of the profile's config file (read by building a client, which sends
    nothing; AWS's own endpoint when none is set). None without botocore, or when that
    client cannot be built (a broken config file: s3fs reports it when it opens).
    """
    client_kwargs = options.get("client_kwargs") or {}
    explicit = options.get("endpoint_url") or client_kwargs.get("endpoint_url")
    if explicit:
        return str(explicit)
    try:
        import botocore.session
        from botocore.config import Config
    except ImportError:
        return None
    config_kwargs = options.get("config_kwargs") or {}
    ignore = config_kwargs.get("ignore_configured_endpoint_urls")
    try:
        with _botocore_lock:
            profile = options.get("profile")
            session = botocore.session.Session(profile=profile) if profile else _session()
            # Dummy keys: no credential chain is walked (no instance-metadata call).
            client = session.create_client(
                "s3", region_name=client_kwargs.get("region_name") or "us-east-1",
                aws_access_key_id="-", aws_secret_access_key="-",
                config=Config(ignore_configured_endpoint_urls=ignore))
    except Exception:
        log.debug("cannot tell the S3 endpoint botocore would use", exc_info=True)
        return None
    try:
        return str(client.meta.endpoint_url)
    finally:
        client.close()


#: Connections each shared blocking client may keep open (opened only as needed): room for
#: every request one store runs at once (a push's parts in flight, its streams' parts, a
#: pull's ranges), so that none is opened and then dropped for want of room in the pool.
POOL_CONNECTIONS = 32


def _credentials_class() -> type:
    """botocore ``Credentials`` that are always s3fs's current ones (built on first use:
    botocore is imported only by S3 users)."""
    from botocore.credentials import Credentials
    from fsspec.asyn import sync

    class Following(Credentials):
        """The aiobotocore client's refreshable credentials, read on s3fs's event loop for
        every request the blocking client signs (botocore asks ``get_frozen_credentials``
        each time): refreshed there as botocore refreshes them (a role, SSO, a credential
        process, ``AWS_CREDENTIAL_EXPIRATION``) before they expire."""

        def __init__(self, fs: Any, creds: Any) -> None:
            self._fs, self._creds = fs, creds
            frozen = self.get_frozen_credentials()
            super().__init__(frozen.access_key, frozen.secret_key, frozen.token,
                             method="ckptsync-s3fs")

        def get_frozen_credentials(self) -> Any:
            return sync(self._fs.loop, self._creds.get_frozen_credentials)

    return Following


def _blocking_client(fs: Any, bucket: str, pool_size: int) -> Any:
    """A blocking botocore S3 client equivalent to ``fs``'s own (s3fs's async one).

    Same endpoint, region, botocore config and credentials. Credentials that can expire (the
    aiobotocore client's refreshable ones) are followed, not copied: the client signs each
    request with s3fs's current ones, so a client kept for the life of the filesystem never
    signs with expired credentials (:func:`_credentials_class`). Static ones (keys in the
    options or the environment) are the same for the life of s3fs's client, as for s3fs.

    Raises:
        S3ApiChanged: the private API it reads changed (warned about).
        Exception: whatever else fails; the caller then keeps to s3fs.
    """
    import botocore.session
    from botocore.config import Config
    from botocore.credentials import CredentialProvider, CredentialResolver
    from fsspec.asyn import sync

    async def resolve() -> tuple[Any, Any, Any]:
        await fs.set_session()
        with _guard(fs, "S3FileSystem.get_s3"):
            s3 = await fs.get_s3(bucket)
        with _guard(fs, "the aiobotocore client's _get_credentials"):
            creds = s3._get_credentials()
        frozen = await creds.get_frozen_credentials() if creds is not None else None
        return s3, creds, frozen

    s3, creds, frozen = sync(fs.loop, resolve)
    with _guard(fs, "botocore's Config._user_provided_options"):
        options = {k: v for k, v in s3.meta.config._user_provided_options.items()
                   if k in Config.OPTION_DEFAULTS}
    options["max_pool_connections"] = max(pool_size, options.get("max_pool_connections") or 0)
    kwargs: dict[str, Any] = {"region_name": s3.meta.region_name,
                              "config": Config(**options)}
    if fs.endpoint_url or fs.client_kwargs.get("endpoint_url"):
        kwargs["endpoint_url"] = s3.meta.endpoint_url
    if "verify" in fs.client_kwargs:
        kwargs["verify"] = fs.client_kwargs["verify"]
    if creds is not None and callable(getattr(creds, "refresh_needed", None)):
        following = _credentials_class()(fs, creds)

        class Provider(CredentialProvider):
            METHOD = "ckptsync-s3fs"

            def load(self) -> Any:
                return following

        # A session of its own, whose credential chain is s3fs's refreshing credentials.
        session = botocore.session.Session()
        session.register_component("credential_provider", CredentialResolver([Provider()]))
        with _botocore_lock:
            return session.create_client("s3", **kwargs)
    if frozen is not None:
        kwargs.update(aws_access_key_id=frozen.access_key,
                      aws_secret_access_key=frozen.secret_key, aws_session_token=frozen.token)
    with _botocore_lock:  # botocore sessions are not thread-safe
        return _session().create_client("s3", **kwargs)


class _Clients:
    """The blocking clients, one per (filesystem, bucket), each shared by every transfer
    through that filesystem (every file, part, range, push and pull) with its connection
    pool, and closed when the filesystem goes. A caller needing more connections than a
    client's pool holds gets a larger client in its place (the old one is left to the
    transfers still using it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clients: dict[tuple[int, str], tuple[Any, int]] = {}
        self._watched: set[int] = set()

    def get(self, fs: Any, bucket: str, pool_size: int) -> Any:
        key = (id(fs), bucket)
        with self._lock:
            held = self._clients.get(key)
        if held is not None and held[1] >= pool_size:
            return held[0]
        size = max(pool_size, POOL_CONNECTIONS)
        client = _blocking_client(fs, bucket, size)
        with self._lock:
            held = self._clients.get(key)
            if held is not None and held[1] >= pool_size:  # another thread built one first
                other = held[0]
            else:
                self._clients[key], other = (client, size), None
                watch = id(fs) not in self._watched
                self._watched.add(id(fs))
        if other is not None:
            client.close()
            return other
        if watch:
            # Not weak-referenceable (TypeError): kept for the life of the process.
            with contextlib.suppress(TypeError):
                weakref.finalize(fs, self._forget, id(fs))
        return client

    def _forget(self, fs_id: int) -> None:
        with self._lock:
            gone = [k for k in self._clients if k[0] == fs_id]
            clients = [self._clients.pop(k)[0] for k in gone]
            self._watched.discard(fs_id)
        for c in clients:
            with contextlib.suppress(Exception):
                c.close()


_clients = _Clients()


def _read_body_into(body: Any, view: memoryview) -> int:
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


class _BlockingS3:
    """The S3 calls for one object: the bulk ones (``upload_part``, ranged ``get_object``)
    run in the caller's thread through the filesystem's shared blocking client (see the
    module doc and :class:`_Clients`), the small ones (:meth:`call`) on s3fs. If the
    blocking client cannot be built, everything goes through s3fs.

    Raises:
        S3ApiChanged: from any method (and the constructor), when the private API changed.
    """

    def __init__(self, fs: Any, remote_path: str, pool_size: int) -> None:
        self.fs = fs
        self.path = remote_path
        with _guard(fs, "S3FileSystem.split_path"):
            self.bucket, self.key, _ = fs.split_path(remote_path)
        self._client: Any = None
        try:
            self._client = _clients.get(fs, self.bucket, pool_size)
        except S3ApiChanged:
            raise
        except Exception:
            log.debug("no blocking S3 client for %s; its transfer goes through s3fs",
                      remote_path, exc_info=True)

    def call(self, method: str, **kwargs: Any) -> Any:
        """``method`` on the object (Bucket and Key filled in), through s3fs."""
        from fsspec.asyn import sync

        with _guard(self.fs, "S3FileSystem._call_s3"):
            return sync(self.fs.loop, self.fs._call_s3, method, Bucket=self.bucket,
                        Key=self.key, **kwargs)

    def _kwargs(self, method: Callable[..., Any], **kwargs: Any) -> dict[str, Any]:
        # s3fs's request-wide extras (SSE-C keys, RequestPayer) apply to every request.
        with _guard(self.fs, "S3FileSystem._get_s3_method_kwargs"):
            kw: dict[str, Any] = self.fs._get_s3_method_kwargs(method, Bucket=self.bucket,
                                                               Key=self.key, **kwargs)
        return kw

    def _translate(self) -> Callable[[Exception], BaseException]:
        with _guard(self.fs, "s3fs.errors.translate_boto_error"):
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
        if self._client is None or fallen_back(self.fs) is not None:
            return bytes(self.fs.cat_file(self.path, start=start, end=end))
        from botocore.exceptions import ClientError

        try:
            translate = self._translate()
            kw = self._kwargs(self._client.get_object, Range=f"bytes={start}-{end - 1}")
        except S3ApiChanged:
            return bytes(self.fs.cat_file(self.path, start=start, end=end))
        try:
            body = self._client.get_object(**kw)["Body"]
        except ClientError as e:
            raise translate(e) from e
        try:
            view = memoryview(buf)[:end - start]
            return view[:_read_body_into(body, view)]
        finally:
            body.close()

    def get_range(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the object (``end`` > ``start``), as fresh ``bytes``."""
        return bytes(self.read_range(start, end, bytearray(end - start)))

    def close(self) -> None:
        """Let go of the shared client (it stays open for the filesystem's other transfers)."""
        self._client = None


@contextlib.contextmanager
def range_reader(fs: Any, remote_path: str, pool_size: int) -> Iterator[RangeReader]:
    """A :data:`RangeReader` of ``remote_path`` for up to ``pool_size`` threads at once.

    On s3fs it reads through the shared blocking client (:class:`_BlockingS3`) into the
    caller's buffer; elsewhere, or once the private API failed, through ``fs.cat_file``
    (fresh ``bytes``).
    """
    getter: _BlockingS3 | None = None
    if private_api_usable(fs):
        with contextlib.suppress(S3ApiChanged):  # warned: the public API below
            getter = _BlockingS3(fs, remote_path, pool_size)
    if getter is None:
        yield lambda start, end, _buf: bytes(fs.cat_file(remote_path, start=start, end=end))
        return
    try:
        yield getter.read_range
    finally:
        getter.close()
