"""One file of a checkpoint, as its manifest lists it: :class:`FileEntry` (path, size,
digest), how a stored file is encrypted (:class:`Encryption`), and the rule every listed path
keeps (:func:`check_relpath`: relative, POSIX, no ``..``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ckptsync.digests import DIGEST_ALGOS
from ckptsync.errors import ManifestError, UnsupportedFormatError
from ckptsync.names import MANIFEST_NAME

__all__ = ["ENC_FIELD", "Encryption", "FileEntry", "check_relpath"]

#: The file entry field of an encrypted file (:class:`Encryption`): only in a remote manifest.
ENC_FIELD = "enc"
_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")


def check_relpath(path: Any, *, where: str) -> str:
    """Validate a path listed in a manifest: relative, POSIX, no ``..``, no empty parts.

    Raises :class:`ManifestError` naming ``where`` (the manifest's location) otherwise.
    """
    if not isinstance(path, str) or not path:
        raise ManifestError(f"{where}: file path must be a non-empty string, got {path!r}")
    bad = (
        path.startswith("/")
        or "\\" in path
        or "\x00" in path
        or re.match(r"^[A-Za-z]:", path) is not None
    )
    parts = path.split("/")
    if bad or any(p in ("", ".", "..") for p in parts):
        raise ManifestError(
            f"{where}: unsafe file path {path!r} (paths must be relative POSIX paths without "
            "'..'); the manifest was tampered with or written by a broken tool: do not use it"
        )
    if parts[0] == MANIFEST_NAME:
        raise ManifestError(f"{where}: a listed file may not be named {MANIFEST_NAME}")
    return path


@dataclass(frozen=True)
class Encryption:
    """How a stored file is encrypted (:mod:`ckptsync.crypto`), from its entry's ``enc``
    field: ``{"alg": ..., "key_id": ..., "size": <plaintext bytes>, "mac": ...}``. The
    entry's own ``size`` and digest describe the stored (encrypted) bytes, so ``ls``,
    ``verify`` and ``gc`` need no key. ``mac`` (optional): the keyed MAC of the plaintext
    digest (:func:`ckptsync.crypto.content_mac`), which the daemon compares a new version with."""

    alg: str
    key_id: str
    size: int
    mac: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"alg": self.alg, "key_id": self.key_id, "size": self.size}
        if self.mac is not None:
            d["mac"] = self.mac
        return d


@dataclass(frozen=True)
class FileEntry:
    """One file of a checkpoint: relative POSIX path, size in bytes, and its digest.

    ``algo`` names the digest (``blake3``, what ckptsync writes, or ``sha256``, what
    ``ckptsync/1`` wrote); ``digest`` is its lowercase hex. In JSON the digest sits under the
    algorithm's name: ``{"path": "model.pt", "size": 1024, "blake3": "ab.."}``.
    """

    path: str
    size: int
    algo: str
    digest: str
    unknown: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.unknown)
        d.update({"path": self.path, "size": self.size, self.algo: self.digest})
        return d

    @property
    def encryption(self) -> Encryption | None:
        """How the stored file is encrypted, or None (plaintext). Validated when parsed."""
        enc = self.unknown.get(ENC_FIELD)
        if not isinstance(enc, dict):
            return None
        return Encryption(enc["alg"], enc["key_id"], enc["size"], enc.get("mac"))

    @classmethod
    def from_dict(cls, d: Any, *, where: str) -> FileEntry:
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: each entry of 'files' must be an object, got {d!r}")
        path = check_relpath(d.get("path"), where=where)
        size = d.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ManifestError(f"{where}: file {path!r} has invalid size {size!r}")
        algo = next((a for a in DIGEST_ALGOS if a in d), None)
        if algo is None:
            others = sorted(k for k in d if k not in ("path", "size"))
            raise UnsupportedFormatError(
                f"{where}: file {path!r} carries no digest this ckptsync can verify (it knows "
                f"{', '.join(DIGEST_ALGOS)}; the entry has {others or 'no other fields'}); the "
                "file cannot be trusted: upgrade ckptsync to read this checkpoint"
            )
        digest = d[algo]
        if not isinstance(digest, str) or not _HEX64_RE.match(digest):
            raise ManifestError(f"{where}: file {path!r} has invalid {algo} digest {digest!r}")
        unknown = {k: v for k, v in d.items() if k not in ("path", "size", algo)}
        enc = unknown.get(ENC_FIELD)
        if enc is not None and not (
                isinstance(enc, dict) and isinstance(enc.get("alg"), str)
                and isinstance(enc.get("key_id"), str)
                and isinstance(enc.get("size"), int) and not isinstance(enc["size"], bool)
                and 0 <= enc["size"] <= size
                and (enc.get("mac") is None or (isinstance(enc["mac"], str)
                                                and _HEX64_RE.match(enc["mac"]) is not None))):
            raise ManifestError(f"{where}: file {path!r} has an invalid {ENC_FIELD!r} field "
                                f"{enc!r}; the manifest was altered and will not be used")
        return cls(path, size, algo, digest, unknown)
