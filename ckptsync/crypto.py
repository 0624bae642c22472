"""Client-side encryption: keys, key ids, and the chunked AES-256-GCM file format.

Every file that leaves the machine under a key is stored as::

    header   magic "CKSE" | version (1 byte) | chunk size (u32 BE) | key id (8 bytes) | salt (16)
    chunk 0  AES-256-GCM(plaintext[0:C]) + 16-byte tag
    ...
    chunk n  the last chunk (0..C plaintext bytes; an empty file has one empty chunk)

- The file key is HKDF-SHA256(key, salt, label): a fresh random salt per file, so no two files
  (nor two uploads of one file) ever share a key, and the per-chunk nonce can simply be the
  chunk index.
- Each chunk's associated data binds the header, the checkpoint name, the file's relative path,
  the chunk index and a last-chunk flag: a chunk moved to another place, file or checkpoint,
  dropped, reordered, or a file cut at a chunk boundary fails authentication
  (:class:`~ckptsync.errors.CorruptCheckpointError`).
- Both directions stream (one chunk buffered); :func:`stored_size` gives the stored size of a
  plaintext size without encrypting.

A file read back from a local checkpoint written with ``encrypt_local=True`` is decrypted on
demand, chunk by chunk, by :class:`SealedReader` (a seekable file for ``torch.load``: no
plaintext copy on disk). :func:`content_mac` is a keyed BLAKE3 of a file's plaintext digest,
bound to its checkpoint and path: the daemon recognises a version it already uploaded by it,
and without the key it confirms nothing about the content.

Keys are 32 random bytes, given as hex or base64 (``CKPTSYNC_KEY``, a file named by
``CKPTSYNC_KEY_FILE`` or ``--key-file``). A key is known by its id (:func:`key_id`): 16 hex chars
of a BLAKE3 of a fixed label and the key, safe to show; the key itself is never logged or
written anywhere. A :class:`KeyRing` holds several keys for rotation: the first encrypts new
checkpoints, any of them decrypts by id.

``cryptography`` is imported only when a file is encrypted or decrypted (``ckptsync[encrypt]``).

Example::

    ring = KeyRing.load(["/etc/ckptsync/key"])        # or KeyRing.from_env()
    w = ring.encryptor(dst, name="step-...", relpath="model.pt")
    w.write(b"...")
    w.close()            # w.size, w.hexdigest(): what the remote manifest lists
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import secrets
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3

from ckptsync.errors import ConfigError, CorruptCheckpointError, EncryptionKeyError
from ckptsync.manifest import WRITE_ALGO, Hasher, new_hasher

__all__ = [
    "ALG",
    "CHUNK_SIZE",
    "ENV_KEY",
    "ENV_KEY_FILE",
    "Decryptor",
    "Encryptor",
    "KeyRing",
    "SealedReader",
    "content_mac",
    "key_id",
    "parse_key",
    "stored_size",
]

#: The algorithm name recorded in manifests (``"enc": {"alg": ALG, ...}``).
ALG = "aes-256-gcm-chunked/1"
ENV_KEY = "CKPTSYNC_KEY"
ENV_KEY_FILE = "CKPTSYNC_KEY_FILE"
#: Plaintext bytes per chunk.
CHUNK_SIZE = 1024 * 1024
MAGIC = b"CKSE"
VERSION = 1
TAG = 16
SALT = 16
KEY_ID_BYTES = 8
_HEADER = struct.Struct(">4sBI8s16s")
HEADER_SIZE = _HEADER.size
# A header may name another chunk size; a reader accepts this range, never a huge buffer.
_MIN_CHUNK, _MAX_CHUNK = 4096, 64 * 1024 * 1024
_ID_LABEL = b"ckptsync key id v1\x00"
_FILE_KEY_LABEL = b"ckptsync file key v1"
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


def key_id(key: bytes) -> str:
    """The key's public fingerprint: 16 hex chars of BLAKE3(label + key). Never the key."""
    return blake3.blake3(_ID_LABEL + key).digest(KEY_ID_BYTES).hex()


def content_mac(key: bytes, name: str, relpath: str, algo: str, digest: str) -> str:
    """A keyed BLAKE3 (under a key derived from ``key``) of a file's plaintext digest, bound
    to its checkpoint ``name`` and ``relpath``: equal only for the same content at the same
    place. Without the key it is no oracle: it confirms no guess of the content, and two
    files (or two checkpoints) with the same content have unrelated values."""
    mac_key = blake3.blake3(key, derive_key_context=_MAC_CONTEXT).digest()
    n, p, d = name.encode(), relpath.encode(), f"{algo}:{digest}".encode()
    msg = b"".join(struct.pack(">I", len(x)) + x for x in (n, p, d))
    return blake3.blake3(msg, key=mac_key).hexdigest()


def stored_size(plain_size: int, chunk_size: int = CHUNK_SIZE) -> int:
    """The size of the stored (encrypted) file of ``plain_size`` plaintext bytes."""
    chunks = max(1, -(-plain_size // chunk_size))
    return HEADER_SIZE + plain_size + chunks * TAG


def _aead(key: bytes) -> Any:
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError as e:
        raise ConfigError("client-side encryption needs the 'cryptography' package: "
                          "pip install 'ckptsync[encrypt]'") from e
    return AESGCM(key)


def _file_key(key: bytes, salt: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt,
                info=_FILE_KEY_LABEL).derive(key)


def _context(header: bytes, name: str, relpath: str) -> bytes:
    n, p = name.encode(), relpath.encode()
    return header + struct.pack(">I", len(n)) + n + struct.pack(">I", len(p)) + p


def _nonce(index: int) -> bytes:
    return struct.pack(">4xQ", index)


def _ad(context: bytes, index: int, last: bool) -> bytes:
    return context + struct.pack(">QB", index, 1 if last else 0)


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


class _Digest:
    """Size and digest of the stored bytes, counted as they pass."""

    def __init__(self, algo: str = WRITE_ALGO) -> None:
        self.algo = algo
        self._hash: Hasher = new_hasher(algo)
        self.size = 0

    def _count(self, data: Any) -> None:
        self._hash.update(data)
        self.size += len(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class _Chunker(_Digest):
    """A buffer of one block and the rule both directions share: a block is processed only
    once a byte after it has arrived, since until the end it could be the last one (sealed
    with its flag set). Buffers are allocated once and reused (a fresh megabyte per chunk
    costs more CPU in page faults than AES-GCM itself); writers copy what they are given."""

    def __init__(self, block: int) -> None:
        super().__init__()
        self._block = block
        self._buf = bytearray(block)
        self._fill = 0

    def _process(self, chunk: memoryview, last: bool) -> None:
        raise NotImplementedError

    def _feed(self, mv: memoryview) -> None:
        b, pos, n = self._block, 0, len(mv)
        if self._fill:
            pos = min(b - self._fill, n)
            self._buf[self._fill:self._fill + pos] = mv[:pos]
            self._fill += pos
            if pos == n:
                return
            self._process(memoryview(self._buf)[:self._fill], last=False)
            self._fill = 0
        while n - pos > b:
            self._process(mv[pos:pos + b], last=False)
            pos += b
        self._buf[0:n - pos] = mv[pos:]
        self._fill = n - pos

    def _flush_last(self) -> None:
        self._process(memoryview(self._buf)[:self._fill], last=True)
        self._fill = 0


class Encryptor(_Chunker):
    """A write-only file: plaintext in, the stored format out to ``dst`` (a binary file).

    Holds at most one chunk. :meth:`close` writes the last chunk and closes ``dst``;
    :meth:`abandon` drops what is buffered and abandons ``dst`` (``discard()`` where it has
    one: nothing becomes visible) without writing a last chunk. ``size`` and
    :meth:`hexdigest` describe the bytes written to ``dst`` (what the manifest lists).
    """

    def __init__(self, dst: Any, key: bytes, *, name: str, relpath: str,
                 chunk_size: int = CHUNK_SIZE) -> None:
        super().__init__(chunk_size)
        self.dst = dst
        self.chunk_size = chunk_size
        salt = secrets.token_bytes(SALT)
        self.header = _HEADER.pack(MAGIC, VERSION, chunk_size,
                                   bytes.fromhex(key_id(key)), salt)
        self._aead = _aead(_file_key(key, salt))
        self._context = _context(self.header, name, relpath)
        self._index = 0
        self._sealed = bytearray(chunk_size + TAG)
        self._started = False
        self.closed = False

    def _process(self, chunk: memoryview, last: bool) -> None:
        if not self._started:
            self._started = True
            self.dst.write(self.header)
            self._count(self.header)
        out = memoryview(self._sealed)[:len(chunk) + TAG]
        self._aead.encrypt_into(_nonce(self._index), chunk,
                                _ad(self._context, self._index, last), out)
        self._index += 1
        self.dst.write(out)
        self._count(out)

    def write(self, data: Any) -> int:
        mv = memoryview(data).cast("B")
        self._feed(mv)
        return len(mv)

    def close(self) -> None:
        if self.closed:
            return
        self._flush_last()
        self.closed = True
        self.dst.close()

    def abandon(self) -> None:
        """Drop the upload: the destination is discarded (or closed) without a last chunk."""
        self.closed = True
        self._fill = 0
        discard = getattr(self.dst, "discard", None)
        if callable(discard):
            discard()
            self.dst.closed = True
        else:
            self.dst.close()


class Decryptor(_Chunker):
    """A write-only file: stored bytes in (any pieces, in order), plaintext out to ``dst``.

    ``size``/:meth:`hexdigest` count the stored bytes (to check against the remote manifest);
    ``dst`` (a :class:`~ckptsync.local.HashingWriter`) hashes the plaintext. Call
    :meth:`finish` after the last byte: it authenticates the last chunk.

    Raises (``write``/``finish``):
        CorruptCheckpointError: a bad header, a chunk that fails authentication (altered,
            moved, reordered), or a file cut short, naming ``where``.
    """

    def __init__(self, dst: Any, key: bytes, *, kid: str, name: str, relpath: str,
                 where: str) -> None:
        super().__init__(HEADER_SIZE)  # the header first; then blocks of chunk + tag
        self.dst = dst
        self.path = getattr(dst, "path", where)
        self.where = where
        self._key, self._kid, self._name, self._relpath = key, kid, name, relpath
        self._aead: Any = None
        self._context = b""
        self._index = 0
        self._plain = bytearray()

    def _corrupt(self, why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{self.where}: encrypted file {why}; the stored bytes were "
                                      "altered, moved or cut short", path=self.where)

    def _start(self, header: bytes) -> None:
        magic, version, chunk, kid, salt = _HEADER.unpack(header)
        if magic != MAGIC or version != VERSION:
            raise self._corrupt("has no valid ckptsync encryption header")
        if not _MIN_CHUNK <= chunk <= _MAX_CHUNK:
            raise self._corrupt(f"header names an impossible chunk size {chunk}")
        if kid.hex() != self._kid:
            raise self._corrupt(f"header names key id {kid.hex()}, its manifest {self._kid}")
        self._aead = _aead(_file_key(self._key, salt))
        self._context = _context(header, self._name, self._relpath)
        self._block = chunk + TAG
        self._buf = bytearray(self._block)
        self._fill = 0
        self._plain = bytearray(chunk)

    def _process(self, chunk: memoryview, last: bool) -> None:
        from cryptography.exceptions import InvalidTag

        if len(chunk) < TAG:
            raise self._corrupt("ends without its last chunk")
        out = memoryview(self._plain)[:len(chunk) - TAG]
        try:
            self._aead.decrypt_into(_nonce(self._index), chunk,
                                    _ad(self._context, self._index, last), out)
        except InvalidTag:
            raise self._corrupt(f"chunk {self._index} fails authentication") from None
        self._index += 1
        if len(out):
            self.dst.write(out)

    def write(self, data: Any) -> int:
        mv = memoryview(data).cast("B")
        n = len(mv)
        self._count(mv)
        pos = 0
        if self._aead is None:
            pos = min(HEADER_SIZE - self._fill, n)
            self._buf[self._fill:self._fill + pos] = mv[:pos]
            self._fill += pos
            if self._fill < HEADER_SIZE:
                return n
            self._start(bytes(self._buf))
        self._feed(mv[pos:])
        return n

    def finish(self) -> None:
        """Authenticate the last chunk; raises if the file ended early."""
        if self._aead is None:
            raise self._corrupt("is shorter than its header")
        self._flush_last()


class SealedReader(io.RawIOBase):
    """A stored (encrypted) file read back as its plaintext: seekable, read-only, one chunk
    decrypted (and authenticated) at a time as it is read, never a plaintext copy on disk.
    What ``torch.load`` reads an ``encrypt_local=True`` checkpoint's file through.

    Raises (constructor, reads): CorruptCheckpointError naming ``where``: a bad header, a
    size no chunk sequence has, a chunk that fails authentication. ``error`` keeps the first
    one (``torch.load`` wraps what a read raises).
    """

    def __init__(self, path: str | os.PathLike[str], key: bytes, *, kid: str, name: str,
                 relpath: str, where: str) -> None:
        super().__init__()
        self.where = where
        self.error: CorruptCheckpointError | None = None
        self._f = open(path, "rb")  # noqa: SIM115 (closed by close())
        try:
            stored = os.fstat(self._f.fileno()).st_size
            header = self._f.read(HEADER_SIZE)
            if len(header) < HEADER_SIZE:
                raise self._corrupt("is shorter than its header")
            magic, version, chunk, hkid, salt = _HEADER.unpack(header)
            if magic != MAGIC or version != VERSION:
                raise self._corrupt("has no valid ckptsync encryption header")
            if not _MIN_CHUNK <= chunk <= _MAX_CHUNK:
                raise self._corrupt(f"header names an impossible chunk size {chunk}")
            if hkid.hex() != kid:
                raise self._corrupt(f"header names key id {hkid.hex()}, its manifest {kid}")
            body, block = stored - HEADER_SIZE, chunk + TAG
            self._chunks = max(1, -(-body // block))
            if body - (self._chunks - 1) * block < TAG:
                raise self._corrupt("ends without its last chunk")
        except BaseException:
            self._f.close()
            raise
        self.plain_size = body - self._chunks * TAG
        self._chunk, self._block = chunk, block
        self._aead = _aead(_file_key(key, salt))
        self._context = _context(header, name, relpath)
        self._pos = 0
        self._cached: tuple[int, bytes] | None = None

    def _corrupt(self, why: str) -> CorruptCheckpointError:
        self.error = self.error or CorruptCheckpointError(
            f"{self.where}: encrypted file {why}; the stored bytes were altered, moved or cut "
            "short", path=self.where)
        return self.error

    def _plain(self, index: int) -> bytes:
        if self._cached is not None and self._cached[0] == index:
            return self._cached[1]
        from cryptography.exceptions import InvalidTag

        self._f.seek(HEADER_SIZE + index * self._block)
        sealed = self._f.read(self._block)
        try:
            plain = self._aead.decrypt(_nonce(index), sealed,
                                       _ad(self._context, index, index == self._chunks - 1))
        except InvalidTag:
            raise self._corrupt(f"chunk {index} fails authentication") from None
        self._cached = (index, plain)
        return plain

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.plain_size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def readinto(self, b: Any) -> int:
        out = memoryview(b).cast("B")
        done = 0
        while done < len(out) and self._pos < self.plain_size:
            index, off = divmod(self._pos, self._chunk)
            plain = self._plain(index)
            k = min(len(out) - done, len(plain) - off)
            out[done:done + k] = plain[off:off + k]
            done += k
            self._pos += k
        return done

    def close(self) -> None:
        self._f.close()
        super().close()
