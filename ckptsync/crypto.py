"""Client-side encryption: keys, key ids and key rings; the stored format of an encrypted
file is :mod:`ckptsync.cipher` (its names are importable from here too).

Keys are 32 random bytes, given as hex or base64 (``CKPTSYNC_KEY``, a file named by
``CKPTSYNC_KEY_FILE`` or ``--key-file``). A key is known by its id (:func:`key_id`): 16 hex chars
of a BLAKE3 of a fixed label and the key, safe to show; the key itself is never logged or
written anywhere. A :class:`KeyRing` holds several keys for rotation: the first encrypts new
checkpoints, any of them decrypts by id. :func:`content_mac` is a keyed BLAKE3 of a file's
plaintext digest, bound to its checkpoint and path: the daemon recognises a version it already
uploaded by it, and without the key it confirms nothing about the content.

Example::

    ring = KeyRing.load(["/etc/ckptsync/key"])        # or KeyRing.from_env()
    w = ring.encryptor(dst, name="step-...", relpath="model.pt")
    w.write(b"...")
    w.close()            # w.size, w.hexdigest(): what the remote manifest lists
"""

from __future__ import annotations

import base64
import binascii
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3

from ckptsync.cipher import (
    ALG,
    CHUNK_SIZE,
    HEADER_SIZE,
    TAG,
    Decryptor,
    Encryptor,
    SealedReader,
    key_id,
    stored_size,
)
from ckptsync.errors import ConfigError, EncryptionKeyError

__all__ = [
    "ALG",
    "CHUNK_SIZE",
    "ENV_KEY",
    "ENV_KEY_FILE",
    "HEADER_SIZE",
    "TAG",
    "Decryptor",
    "Encryptor",
    "KeyRing",
    "SealedReader",
    "content_mac",
    "key_id",
    "missing_key",
    "parse_key",
    "stored_size",
]

ENV_KEY = "CKPTSYNC_KEY"
ENV_KEY_FILE = "CKPTSYNC_KEY_FILE"
_MAC_CONTEXT = "ckptsync content mac v1"
_HINT = (f"give the key with --key-file FILE, {ENV_KEY_FILE}=FILE or {ENV_KEY}=<64 hex chars>; "
         "make one with: python -c 'import secrets; print(secrets.token_hex(32))'")


def parse_key(text: str | bytes, *, where: str) -> bytes:
    """32 key bytes from hex (64 chars) or base64 text, or 32 raw bytes.

    Raises:
        ConfigError: naming ``where`` (never the key's content).
    """
    if isinstance(text, bytes):
        if len(text) == 32:
            try:  # 32 bytes of text could be a (short) encoded key: only raw if not ASCII
                text.decode("ascii")
            except UnicodeDecodeError:
                return text
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            raise ConfigError(f"{where}: not a key (expected 32 bytes as 64 hex chars or "
                              f"base64); {_HINT}") from None
    s = text.strip()
    raw: bytes | None = None
    if len(s) == 64:
        try:
            raw = bytes.fromhex(s)
        except ValueError:
            raw = None
    if raw is None:
        try:
            raw = base64.b64decode(s.replace("-", "+").replace("_", "/"), validate=True)
        except (binascii.Error, ValueError):
            raw = None
    if raw is None or len(raw) != 32:
        raise ConfigError(f"{where}: not a 32-byte key (expected 64 hex chars or base64 of 32 "
                          f"bytes); {_HINT}")
    return raw


def content_mac(key: bytes, name: str, relpath: str, algo: str, digest: str) -> str:
    """A keyed BLAKE3 (under a key derived from ``key``) of a file's plaintext digest, bound
    to its checkpoint ``name`` and ``relpath``: equal only for the same content at the same
    place. Without the key it is no oracle: it confirms no guess of the content, and two
    files (or two checkpoints) with the same content have unrelated values."""
    mac_key = blake3.blake3(key, derive_key_context=_MAC_CONTEXT).digest()
    n, p, d = name.encode(), relpath.encode(), f"{algo}:{digest}".encode()
    msg = b"".join(struct.pack(">I", len(x)) + x for x in (n, p, d))
    return blake3.blake3(msg, key=mac_key).hexdigest()


@dataclass(frozen=True, repr=False)
class KeyRing:
    """Keys for encrypting (the first) and decrypting (any, by id). Its repr shows ids only.

    Raises (constructor): ConfigError: no keys, or a key that is not 32 bytes.
    """

    keys: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if not self.keys or any(len(k) != 32 for k in self.keys):
            raise ConfigError(f"a key ring needs one or more 32-byte keys; {_HINT}")

    def __repr__(self) -> str:
        return f"KeyRing(ids={list(self.ids)})"

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(key_id(k) for k in self.keys)

    @property
    def current_id(self) -> str:
        """The id of the key new files are encrypted with."""
        return key_id(self.keys[0])

    def get(self, kid: str) -> bytes | None:
        return next((k for k in self.keys if key_id(k) == kid), None)

    @classmethod
    def of(cls, keys: bytes | str | Iterable[bytes | str] | KeyRing | None) -> KeyRing | None:
        """A ring from what ``Checkpointer(encryption_key=...)`` takes: key bytes (32 raw, or
        hex/base64 text), a list of them (the first encrypts), a ring, or None."""
        if keys is None or isinstance(keys, KeyRing):
            return keys
        items = [keys] if isinstance(keys, (bytes, str)) else list(keys)
        return cls(tuple(parse_key(k, where=f"encryption_key[{i}]")
                         for i, k in enumerate(items)))

    @classmethod
    def load(cls, files: Iterable[str | os.PathLike[str]]) -> KeyRing | None:
        """Keys from key files, in order (None for no files)."""
        keys = []
        for f in files:
            path = Path(f).expanduser()
            try:
                data = path.read_bytes()
            except OSError as e:
                raise ConfigError(f"cannot read key file {path}: {e.strerror or e}") from e
            keys.append(parse_key(data if len(data) == 32 else data.strip(),
                                  where=f"key file {path}"))
        return cls(tuple(keys)) if keys else None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> KeyRing | None:
        """Keys from ``CKPTSYNC_KEY`` (comma-separated for several) then ``CKPTSYNC_KEY_FILE``
        (os.pathsep-separated); None when neither is set."""
        env = os.environ if env is None else env
        keys = [parse_key(k, where=ENV_KEY)
                for k in (env.get(ENV_KEY) or "").split(",") if k.strip()]
        files = [f for f in (env.get(ENV_KEY_FILE) or "").split(os.pathsep) if f.strip()]
        ring = cls.load(files)
        keys += list(ring.keys) if ring else []
        return cls(tuple(keys)) if keys else None

    @classmethod
    def resolve(cls, key_files: Iterable[str] | None = None,
                env: Mapping[str, str] | None = None) -> KeyRing | None:
        """``--key-file`` flags where given, else the environment."""
        files = list(key_files or [])
        return cls.load(files) if files else cls.from_env(env)

    def mac(self, kid: str, name: str, relpath: str, algo: str, digest: str) -> str | None:
        """:func:`content_mac` under the key of id ``kid``; None when no key has that id."""
        key = self.get(kid)
        return None if key is None else content_mac(key, name, relpath, algo, digest)

    def encryptor(self, dst: Any, *, name: str, relpath: str,
                  chunk_size: int = CHUNK_SIZE) -> Encryptor:
        """A writer encrypting into ``dst`` with the current key (see :class:`Encryptor`)."""
        return Encryptor(dst, self.keys[0], name=name, relpath=relpath, chunk_size=chunk_size)

    def decryptor(self, dst: Any, *, kid: str, name: str, relpath: str,
                  where: str) -> Decryptor:
        """A writer taking stored bytes and writing plaintext into ``dst``.

        Raises:
            EncryptionKeyError: no key of this ring has id ``kid``.
        """
        key = self.get(kid)
        if key is None:
            raise missing_key(kid, name, where, self)
        return Decryptor(dst, key, kid=kid, name=name, relpath=relpath, where=where)


def missing_key(kid: str, name: str, where: str, ring: KeyRing | None) -> EncryptionKeyError:
    """The error for a checkpoint encrypted under a key id that is not at hand."""
    have = (f"the keys given have ids {', '.join(ring.ids)}" if ring is not None
            else "no key was given")
    return EncryptionKeyError(
        f"checkpoint {name} ({where}) is encrypted with key id {kid}, and {have}; it was not "
        f"restored (nothing older is used in its place): {_HINT}. The key with id {kid} is "
        "the one this run was saved with (a rotated-out key must stay in the list)",
        key_id=kid, name=name)
