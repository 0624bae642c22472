"""The digests of checkpoint files and of manifests: which algorithms a reader verifies,
hashers for them, and a manifest's digest of its own canonical content.

``blake3`` is what ckptsync writes for every file and for the manifest itself; ``sha256`` is
what ``ckptsync/1`` wrote, and what readers keep verifying forever. Every place that verifies
a file hashes it with its entry's algorithm (:func:`new_hasher`). A ``ckptsync/2`` manifest
carries ``manifest_digest``: the digest of :func:`canonical_bytes` of the whole manifest
object but that field (:func:`check_self_digest`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any, Protocol

import blake3

from ckptsync.errors import ManifestError, UnsupportedFormatError

__all__ = ["DIGEST_ALGOS", "DIGEST_FIELD", "WRITE_ALGO", "Hasher", "canonical_bytes",
           "check_self_digest", "new_hasher"]

#: The digest ckptsync writes for every file and for the manifest itself.
WRITE_ALGO = "blake3"
#: Digests a reader verifies, in order of preference when an entry carries several.
DIGEST_ALGOS = ("blake3", "sha256")
#: The manifest field holding the manifest's digest of itself.
DIGEST_FIELD = "manifest_digest"


class Hasher(Protocol):
    """What :func:`new_hasher` returns: ``hashlib``'s and ``blake3``'s common interface."""

    def update(self, data: Any, /) -> object: ...

    def hexdigest(self) -> str: ...


def new_hasher(algo: str = WRITE_ALGO) -> Hasher:
    """A fresh hasher for ``algo`` (one of :data:`DIGEST_ALGOS`).

    Every place that verifies a file hashes it with its entry's algorithm, so a
    ``ckptsync/1`` checkpoint verifies with sha256 and a ``ckptsync/2`` one with BLAKE3.

    Raises:
        UnsupportedFormatError: an algorithm this version does not know.
    """
    if algo == "blake3":
        return blake3.blake3()
    if algo == "sha256":
        return hashlib.sha256()
    raise UnsupportedFormatError(
        f"digest algorithm {algo!r} is not supported by this ckptsync (it knows "
        f"{', '.join(DIGEST_ALGOS)}); upgrade ckptsync"
    )


def canonical_bytes(obj: Mapping[str, Any]) -> bytes:
    """The bytes ``manifest_digest`` covers: ``obj`` without that field, canonically encoded."""
    body = {k: v for k, v in obj.items() if k != DIGEST_FIELD}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode(
        "ascii"
    )


def check_self_digest(obj: dict[str, Any], where: str) -> None:
    """Raise unless ``obj[manifest_digest]`` is the digest of ``obj``'s canonical bytes."""
    got = obj.get(DIGEST_FIELD)
    if not isinstance(got, dict) or not got:
        raise ManifestError(
            f"{where}: manifest has no valid {DIGEST_FIELD!r} (a {obj.get('format')!r} manifest "
            "always carries one); the manifest was altered or damaged and will not be used"
        )
    algo = next((a for a in DIGEST_ALGOS if a in got), None)
    if algo is None:
        raise UnsupportedFormatError(
            f"{where}: {DIGEST_FIELD!r} uses no algorithm this ckptsync knows "
            f"({sorted(got)}); upgrade ckptsync to read this checkpoint"
        )
    h = new_hasher(algo)
    h.update(canonical_bytes(obj))
    if got[algo] != h.hexdigest():
        raise ManifestError(
            f"{where}: manifest content does not match its {DIGEST_FIELD!r}: the manifest was "
            "altered after it was written (or damaged) and will not be used"
        )
