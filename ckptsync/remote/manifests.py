"""Reading manifests and the ``LATEST`` hint from the remote: :class:`ManifestReader`.

A manifest is read with a ranged read of the bound plus one byte (a longer one is refused,
never read whole), parsed and verified (:meth:`Manifest.from_json`: its own digest, its step
against its name). A manifest whose bytes do not verify is read again, as a data file is
downloaded again, up to ``config.digest_attempts`` reads: a body cut short on the way, or a
416 for a ranged read of an object the server has not settled, reads like a corrupt manifest,
and only the same result, read after read, is damage at rest.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from ckptsync.errors import (
    CkptSyncError,
    ConfigError,
    ManifestError,
    RemoteError,
    UnsupportedFormatError,
)
from ckptsync.manifest import (
    LATEST_NAME,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    Manifest,
    manifest_too_large,
)
from ckptsync.remote.boundary import empty_range
from ckptsync.remote.location import SAFE_NAME, Location

__all__ = ["ManifestReader", "Read"]

log = logging.getLogger("ckptsync.remote")

Read = Manifest | CkptSyncError | None
"""One manifest as :meth:`ManifestReader.read_many` gives it: parsed, the reason it is bad,
or None where there is none (not committed)."""


class ManifestReader:
    """The manifests and the ``LATEST`` hint under one :class:`Location`."""

    def __init__(self, at: Location) -> None:
        self.at = at

    def parse(self, name: str, data: bytes) -> Manifest:
        """The manifest of ``name`` in ``data`` (at most the bound + 1 bytes read).

        Raises:
            ManifestError: over the bound, not a valid manifest, or naming another checkpoint.
        """
        where = self.at.url_of(name, MANIFEST_NAME)
        if len(data) > MAX_MANIFEST_BYTES:  # only the first bound + 1 bytes were read
            raise manifest_too_large(where, self.at.size_or_none(name, MANIFEST_NAME))
        m = Manifest.from_json(data, where=where)
        if m.name != name:
            raise ManifestError(f"{where}: manifest names {m.name!r} but lives under {name!r}")
        return m

    def read(self, name: str) -> Manifest | None:
        """The manifest of ``name``, or None when it is not committed.

        A manifest whose bytes do not verify (a body cut short, a 416 answered for a ranged
        read) is read again, up to ``config.digest_attempts`` reads in all, before it counts
        as bad: one torn read never passes over a valid checkpoint.

        Raises:
            ManifestError: the manifest does not parse, is unsafe, or names another checkpoint
                (read after read).
            RemoteError: the backend failed.
        """
        if not SAFE_NAME.match(name):
            raise ConfigError(f"invalid checkpoint name {name!r}")
        return self._read(name, self.at.config.digest_attempts)

    def _read(self, name: str, attempts: int) -> Manifest | None:
        attempt = 1
        while True:
            data = self.at.read_small(name, MANIFEST_NAME)
            if data is None:
                return None
            try:
                return self.parse(name, data)
            except UnsupportedFormatError:
                raise
            except ManifestError as e:
                if attempt >= attempts or len(data) > MAX_MANIFEST_BYTES:
                    raise
                attempt += 1
                log.warning("%s; reading it again (read %d of %d)", e, attempt, attempts)
                self.at.forget(name, MANIFEST_NAME)

    def read_many(self, names: list[str]) -> dict[str, Read]:
        """The manifests of ``names``, read at once (concurrently where the backend is
        async); each that does not verify is read again as :meth:`read` does.

        Raises:
            RemoteError: a read failed with a retryable error (after retries).
        """
        if not names:
            return {}
        at = self.at
        paths = [at.path(n, MANIFEST_NAME) for n in names]

        def cat() -> list[Any]:
            # Ranged reads: a manifest over the bound shows as bound + 1 bytes and is
            # refused, never read whole.
            n = len(paths)
            return list(at.fs.cat_ranges(paths, [0] * n, [MAX_MANIFEST_BYTES + 1] * n,
                                         on_error="return"))

        raw: list[Any] = at.call(cat, at.url, "read manifests from")
        out: dict[str, Read] = {}
        for name, data in zip(names, raw, strict=True):
            if isinstance(data, Exception) and empty_range(data):
                data = b""
            if data is None or isinstance(data, FileNotFoundError):
                out[name] = None
            elif isinstance(data, BaseException):
                err = at.translate(data, at.url_of(name, MANIFEST_NAME), "read")
                if isinstance(err, RemoteError) and err.retryable:
                    raise err from err.__cause__
                out[name] = err
            else:
                out[name] = self._parsed(name, bytes(data))
        return out

    def _parsed(self, name: str, data: bytes) -> Read:
        attempts = self.at.config.digest_attempts
        try:
            return self.parse(name, data)
        except UnsupportedFormatError as e:
            return e
        except ManifestError as e:
            if len(data) > MAX_MANIFEST_BYTES or attempts < 2:
                return e
            log.warning("%s; reading it again (read 2 of %d)", e, attempts)
        try:
            return self._read(name, attempts - 1)
        except ManifestError as again:
            return again

    def read_latest(self) -> str | None:
        """The checkpoint name ``LATEST`` points to, or None (missing, unreadable, unsafe)."""
        try:
            data = self.at.read_small(LATEST_NAME)
        except RemoteError as e:
            log.debug("cannot read the LATEST hint: %s", e)
            return None
        if data is None or len(data) > MAX_MANIFEST_BYTES:
            return None
        try:
            name = json.loads(data).get("name")
        except (ValueError, AttributeError, UnicodeDecodeError):
            return None
        return name if isinstance(name, str) and SAFE_NAME.match(name) else None
