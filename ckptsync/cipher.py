"""The stored format of an encrypted file: chunked AES-256-GCM, both ways, streaming
(:class:`Encryptor`, :class:`Decryptor`) and with random access (:class:`SealedReader`)::

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
  plaintext size without encrypting. A file read back from a local checkpoint written with
  ``encrypt_local=True`` is decrypted on demand, chunk by chunk, by :class:`SealedReader` (a
  seekable file for ``torch.load``: no plaintext copy on disk).

Keys, key ids and key rings are :mod:`ckptsync.crypto`. ``cryptography`` is imported only when
a file is encrypted or decrypted (``ckptsync[encrypt]``).
"""

from __future__ import annotations

import io
import os
import secrets
import struct
from typing import Any

import blake3

from ckptsync.digests import WRITE_ALGO, Hasher, new_hasher
from ckptsync.errors import ConfigError, CorruptCheckpointError

__all__ = ["ALG", "CHUNK_SIZE", "HEADER_SIZE", "TAG", "Decryptor", "Encryptor", "SealedReader",
           "key_id", "stored_size"]

#: The algorithm name recorded in manifests (``"enc": {"alg": ALG, ...}``).
ALG = "aes-256-gcm-chunked/1"
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


def key_id(key: bytes) -> str:
    """The key's public fingerprint: 16 hex chars of BLAKE3(label + key). Never the key."""
    return blake3.blake3(_ID_LABEL + key).digest(KEY_ID_BYTES).hex()


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
