"""The blocking botocore S3 client that S3's bulk calls go through, built like s3fs's own and
shared per filesystem and bucket; and the S3 endpoint botocore configures.

s3fs runs every request on its one event-loop thread, and botocore and aiohttp do the
per-byte work there: the payload sha256 that SigV4 signs over plain http, copies of each body
(and TLS over https). However many parts or ranges are in flight, that is one core for every
byte moved. The bulk calls (``upload_part``, ranged ``get_object``) therefore go through a
blocking botocore client built like s3fs's (:func:`blocking_client`), from the transfer
threads, which share that work between cores as boto3's transfer manager does
(:class:`~ckptsync.remote.backends.s3object.S3Object`).

That client is one per filesystem and bucket (:class:`Clients`), kept with its connection
pool for the filesystem's life: every file, push and pull reuses its connections (on a cloud
link a new connection costs a TCP and a TLS handshake, round trips per file). The rule for
credentials: it signs every request with s3fs's current credentials, the very object s3fs's
client refreshes (temporary ones from a role, SSO, a credential process or
``AWS_CREDENTIAL_EXPIRATION`` are renewed before they expire), never a copy frozen when it was
built.

The private API used here, each inside :data:`S3_FENCE`: ``S3FileSystem.get_s3``, the
aiobotocore client's ``_get_credentials`` and botocore's ``Config._user_provided_options``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Mapping
from typing import Any

from ckptsync.transfer.fence import Fence

__all__ = ["CLIENTS", "POOL_CONNECTIONS", "S3_FENCE", "Clients", "blocking_client",
           "configured_endpoint"]

log = logging.getLogger(__name__)

#: The fence around s3fs's and botocore's private API (one warning per filesystem).
S3_FENCE = Fence(("s3fs", "botocore"), "transfers through this filesystem use the public "
                 "fsspec API from now on (large files go slower)", log)

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


def blocking_client(fs: Any, bucket: str, pool_size: int) -> Any:
    """A blocking botocore S3 client equivalent to ``fs``'s own (s3fs's async one).

    Same endpoint, region, botocore config and credentials. Credentials that can expire (the
    aiobotocore client's refreshable ones) are followed, not copied: the client signs each
    request with s3fs's current ones, so a client kept for the life of the filesystem never
    signs with expired credentials (:func:`_credentials_class`). Static ones (keys in the
    options or the environment) are the same for the life of s3fs's client, as for s3fs.

    Raises:
        PrivateApiChanged: the private API it reads changed (warned about).
        Exception: whatever else fails; the caller then keeps to s3fs.
    """
    import botocore.session
    from botocore.config import Config
    from botocore.credentials import CredentialProvider, CredentialResolver
    from fsspec.asyn import sync

    async def resolve() -> tuple[Any, Any, Any]:
        await fs.set_session()
        with S3_FENCE.guard(fs, "S3FileSystem.get_s3"):
            s3 = await fs.get_s3(bucket)
        with S3_FENCE.guard(fs, "the aiobotocore client's _get_credentials"):
            creds = s3._get_credentials()
        frozen = await creds.get_frozen_credentials() if creds is not None else None
        return s3, creds, frozen

    s3, creds, frozen = sync(fs.loop, resolve)
    with S3_FENCE.guard(fs, "botocore's Config._user_provided_options"):
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


class Clients:
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
        client = blocking_client(fs, bucket, size)
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


#: The one registry of blocking clients.
CLIENTS = Clients()
