"""What a key guarantees about a checkpoint: its manifest's keyed MAC, and the encryption
policy every reader applies (DESIGN.md, "Encryption"; README, "Security").

**Keyed manifests.** A manifest written under a key carries ``manifest_mac``:
``{"key_id": <id of the key>, "blake3": <hex>}``, a keyed BLAKE3 of the manifest's canonical
content (everything but ``manifest_digest``, ``manifest_mac`` and the fields a push adds,
``run`` and ``seq``: see :mod:`ckptsync.manifest`) under a key derived from the user key
(HKDF-SHA256, info ``ckptsync manifest mac v1``). A bucket writer without the key can
neither relabel a checkpoint's step, swap two checkpoints' contents, nor forge the key ids it
names without the MAC failing. The root marker (:mod:`ckptsync.remote.marker`) carries a MAC
per key of its writer's ring (info ``ckptsync root marker mac v1``), so that a reader with any
one of those keys can trust the key ids the marker lists.

**The policy** (:func:`check_checkpoint`): with a key given, or on a root whose marker says
the run is encrypted, every file of a checkpoint must be encrypted, and (with a key) its
manifest must carry a MAC that verifies; a checkpoint that does not is invalid
(:class:`~ckptsync.errors.CorruptCheckpointError`, named and loud), and restore moves on to the
next valid one, which by the same rule is encrypted. ``allow_plaintext=True`` accepts
plaintext checkpoints and manifests without a MAC (migrating a run started without a key, or
written by an older ckptsync), with a warning for each. A checkpoint needing a key id that no
key given has is an :class:`~ckptsync.errors.EncryptionKeyError` (no fall back) when the run's
authenticated marker lists that id (you lack a key of this run), and otherwise invalid
(:class:`~ckptsync.errors.UnknownKeyError`: a forged key id must not block every restore).

Example::

    signed = sign_manifest(m, ring)                        # at push, under the current key
    check_checkpoint(signed, ring, root=None, where=url)   # at pull: passes
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Collection, Mapping
from typing import Any

import blake3

from ckptsync.crypto import ALG, KeyRing, missing_key
from ckptsync.errors import CorruptCheckpointError, UnknownKeyError, UnsupportedFormatError
from ckptsync.manifest import DIGEST_FIELD, MAC_FIELD, PUSH_FIELDS, Manifest, with_requires

__all__ = ["check_checkpoint", "mac_of", "manifest_mac_key_id", "sign_manifest", "strip_mac"]

log = logging.getLogger("ckptsync")

_MANIFEST_INFO = b"ckptsync manifest mac v1"
MARKER_INFO = b"ckptsync root marker mac v1"
_HINT = ("pass allow_plaintext=True (Checkpointer) or --allow-plaintext (ckptsync pull) to "
         "accept it while migrating a run that was not encrypted, or written by an older "
         "ckptsync")


def mac_key(key: bytes, info: bytes) -> bytes:
    """The MAC key derived from user key ``key`` for purpose ``info`` (HKDF-SHA256)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(key)


def mac_of(key: bytes, info: bytes, obj: Mapping[str, Any], skip: Collection[str]) -> str:
    """Keyed BLAKE3 of ``obj`` without ``skip``, canonically encoded (sorted keys)."""
    body = {k: v for k, v in obj.items() if k not in skip}
    data = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return blake3.blake3(data.encode("ascii"), key=mac_key(key, info)).hexdigest()


def _manifest_mac(m: Manifest, key: bytes) -> str:
    # What a reader parses: JSON turns tuples into lists and int keys into strings.
    obj = json.loads(json.dumps(m.to_dict()))
    return mac_of(key, _MANIFEST_INFO, obj, (DIGEST_FIELD, MAC_FIELD, *PUSH_FIELDS))


def manifest_mac_key_id(m: Manifest) -> str | None:
    """The key id ``m``'s MAC names, or None (no MAC, or a malformed one)."""
    mac = m.unknown.get(MAC_FIELD)
    kid = mac.get("key_id") if isinstance(mac, dict) else None
    return kid if isinstance(kid, str) else None


def sign_manifest(m: Manifest, keys: KeyRing) -> Manifest:
    """``m`` (its ``requires`` set from its content) with a MAC under the current key."""
    # The MAC's presence sets ``requires`` (encryption/1), which the MAC covers: place it first.
    m = with_requires(dataclasses.replace(m, unknown={**m.unknown, MAC_FIELD: {}}))
    mac = {"key_id": keys.current_id, "blake3": _manifest_mac(m, keys.keys[0])}
    return dataclasses.replace(m, unknown={**m.unknown, MAC_FIELD: mac})


def strip_mac(m: Manifest, *, keep_requires: bool = False) -> Manifest:
    """``m`` without its MAC (a plaintext local copy: the MAC covered the stored bytes)."""
    if MAC_FIELD not in m.unknown:
        return m
    out = dataclasses.replace(m, unknown={k: v for k, v in m.unknown.items() if k != MAC_FIELD})
    return out if keep_requires else with_requires(out)


def check_checkpoint(m: Manifest, keys: KeyRing | None, *, vouched: Collection[str] | None,
                     encrypted_root: bool = False, allow_plaintext: bool = False,
                     where: str) -> None:
    """Raise unless checkpoint ``m`` may be restored under ``keys`` (the module's policy).

    Args:
        vouched: the key ids the run's root marker lists, where its MAC verified under one
            of ``keys`` (None: not authenticated, or no marker).
        encrypted_root: the root marker says this run is encrypted.
        where: the checkpoint's location, for messages.

    Raises:
        CorruptCheckpointError: a plaintext file, a missing or wrong MAC (invalid: restore
            moves on to the next valid checkpoint). :class:`UnknownKeyError` (a subclass): a
            key id no key has and nothing authenticated vouches for.
        EncryptionKeyError: an encrypted checkpoint and no key, or a key id of this run
            (vouched) that no key given has: never a reason to fall back.
        UnsupportedFormatError: an encryption algorithm this version does not know.
    """
    enforce = keys is not None or encrypted_root
    plain = [f.path for f in m.files if f.encryption is None]
    if enforce and plain:
        why = "a key is given" if keys is not None else "the root marker says this run is encrypted"
        if not allow_plaintext:
            raise CorruptCheckpointError(
                f"{where}: file {plain[0]!r} is not encrypted, but {why}: every file of every "
                "checkpoint must be encrypted and authenticate, so this checkpoint is not used "
                f"(planted or downgraded by whoever can write to the bucket); {_HINT}",
                path=where)
        log.warning("allow_plaintext: accepting %s although %s: file %r is not encrypted",
                    where, why, plain[0])
    for f in m.files:
        enc = f.encryption
        if enc is not None and enc.alg != ALG:
            raise UnsupportedFormatError(
                f"{where}: file {f.path!r} is encrypted with {enc.alg!r}, which this ckptsync "
                f"does not know (it knows {ALG}); upgrade ckptsync to read it")
    encrypted = len(plain) < len(m.files)
    if keys is None:
        if encrypted:
            kid = next(f.encryption.key_id for f in m.files if f.encryption is not None)
            raise missing_key(kid, m.name, where, None)
        return
    mac = m.unknown.get(MAC_FIELD)
    if mac is None:
        if not allow_plaintext:
            raise CorruptCheckpointError(
                f"{where}: its manifest carries no keyed MAC, but a key is given: it was not "
                "written under this run's key (a bucket writer could have relabelled or "
                f"swapped it), so it is not used; {_HINT}", path=where)
        log.warning("allow_plaintext: accepting %s without a manifest MAC", where)
    else:
        mac_kid = manifest_mac_key_id(m)
        digest = mac.get("blake3") if isinstance(mac, dict) else None
        if mac_kid is None or not isinstance(digest, str):
            raise CorruptCheckpointError(f"{where}: malformed {MAC_FIELD!r}; the manifest was "
                                         "altered and will not be used", path=where)
        _need(mac_kid, m, keys, vouched, where)
        key = keys.get(mac_kid)
        assert key is not None  # _need raised otherwise
        if _manifest_mac(m, key) != digest:
            raise CorruptCheckpointError(
                f"{where}: the manifest's keyed MAC does not match its content: it was altered "
                "after it was written (a relabelled step, a swapped checkpoint or a forged key "
                "id) and will not be used", path=where)
    for f in m.files:
        if f.encryption is not None:
            _need(f.encryption.key_id, m, keys, vouched, where)


def _need(kid: str, m: Manifest, keys: KeyRing, vouched: Collection[str] | None,
          where: str) -> None:
    """Raise unless ``keys`` has key id ``kid``: a key of this run that is not at hand, or an
    id nothing authenticated knows (see :func:`check_checkpoint`)."""
    if keys.get(kid) is not None:
        return
    if vouched is not None and kid in vouched:
        raise missing_key(kid, m.name, where, keys)
    raise UnknownKeyError(
        f"{where}: checkpoint {m.name} names key id {kid}, which none of the given keys "
        f"({', '.join(keys.ids)}) has and the run's root marker does not list (under a MAC "
        "one of them verifies): its manifest was altered, or written under a key this run "
        "never used; it is not used, and restore moves on to the next valid checkpoint",
        path=where, key_id=kid, name=m.name)
