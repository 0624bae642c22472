"""The encrypted file format (ckptsync.crypto): round trips, and every tampering refused."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import pytest

from ckptsync.crypto import (
    CHUNK_SIZE,
    HEADER_SIZE,
    TAG,
    KeyRing,
    key_id,
    parse_key,
    stored_size,
)
from ckptsync.errors import ConfigError, CorruptCheckpointError, EncryptionKeyError

pytestmark = pytest.mark.core

KEY = bytes(range(32))
RING = KeyRing((KEY,))
C = 4096  # a small chunk size (the header carries it) keeps these tests fast


class _Sink(io.BytesIO):
    def close(self) -> None:
        self.value = self.getvalue()
        super().close()


def seal(data: bytes, *, name: str = "ck", relpath: str = "model.pt", piece: int = 1000,
         chunk: int = C, ring: KeyRing = RING) -> bytes:
    sink = _Sink()
    w = ring.encryptor(sink, name=name, relpath=relpath, chunk_size=chunk)
    for i in range(0, len(data), piece):
        w.write(data[i:i + piece])
    w.close()
    assert w.size == len(sink.value)
    return sink.value


def unseal(stored: bytes, *, name: str = "ck", relpath: str = "model.pt",
           piece: int = 777, ring: KeyRing = RING) -> bytes:
    out = io.BytesIO()
    r = ring.decryptor(out, kid=ring.current_id, name=name, relpath=relpath, where="remote/x")
    for i in range(0, len(stored), piece):
        r.write(stored[i:i + piece])
    r.finish()
    return out.getvalue()


def chunks(stored: bytes, chunk: int = C) -> tuple[bytes, list[bytes]]:
    body = stored[HEADER_SIZE:]
    step = chunk + TAG
    return stored[:HEADER_SIZE], [body[i:i + step] for i in range(0, len(body), step)]


@pytest.mark.parametrize("size", [0, 1, C - 1, C, C + 1, 3 * C, 3 * C + 17])
@pytest.mark.parametrize("piece", [1, 1000, 10 * C])
def test_round_trip_any_size_any_pieces(size: int, piece: int) -> None:
    data = os.urandom(size)
    stored = seal(data, piece=piece)
    assert len(stored) == stored_size(size, C)
    assert unseal(stored, piece=piece) == data
    assert data[:64] not in stored or size < 64


def test_default_chunk_size_round_trip() -> None:
    data = os.urandom(2 * CHUNK_SIZE + 5)
    stored = seal(data, chunk=CHUNK_SIZE, piece=300_000)
    assert len(stored) == stored_size(len(data))
    assert unseal(stored, piece=1 << 20) == data


def test_each_file_gets_a_fresh_salt() -> None:
    data = b"x" * 5000
    assert seal(data) != seal(data)  # same key, same bytes, same name: other ciphertext


def _refused(stored: bytes, **kw: str) -> str:
    with pytest.raises(CorruptCheckpointError) as ei:
        unseal(stored, **kw)
    assert "remote/x" in str(ei.value)
    return str(ei.value)


def test_tampering_is_refused() -> None:
    data = os.urandom(4 * C + 100)
    stored = seal(data)
    head, cs = chunks(stored)
    assert len(cs) == 5
    flipped = bytearray(stored)
    flipped[HEADER_SIZE + C + 40] ^= 0x01
    assert "chunk 1 fails authentication" in _refused(bytes(flipped))
    _refused(head + b"".join(cs[:1] + cs[2:]))                 # a chunk dropped
    _refused(head + b"".join([cs[1], cs[0], *cs[2:]]))         # two chunks swapped
    _refused(head + b"".join(cs[:3]))                          # cut at a chunk boundary
    _refused(stored[:-1])                                      # cut inside the last chunk
    _refused(stored + b"\0" * 20)                              # bytes appended
    _refused(head[:-1] + bytes([head[-1] ^ 1]) + b"".join(cs))  # another salt
    assert "without its last chunk" in _refused(head)
    assert "shorter than its header" in _refused(head[:10])


def test_a_file_cannot_be_moved_to_another_path_or_checkpoint() -> None:
    stored = seal(os.urandom(2 * C))
    _refused(stored, relpath="optim.pt")
    _refused(stored, name="other-checkpoint")
    # a chunk of another file under the same key does not fit either
    _, other = chunks(seal(os.urandom(2 * C)))
    head, cs = chunks(stored)
    assert len(cs) == 2
    _refused(head + other[0] + cs[1])


def test_a_wrong_key_is_named_by_its_id(tmp_path: Path) -> None:
    other = KeyRing((os.urandom(32),))
    with pytest.raises(EncryptionKeyError) as ei:
        other.decryptor(io.BytesIO(), kid=RING.current_id, name="ck-7", relpath="m", where="u")
    msg = str(ei.value)
    assert RING.current_id in msg and "ck-7" in msg and other.current_id in msg
    assert "--key-file" in msg and KEY.hex() not in msg
    assert ei.value.key_id == RING.current_id


def test_keys_parse_from_hex_base64_raw_and_files(tmp_path: Path) -> None:
    assert parse_key(KEY.hex(), where="x") == KEY
    assert parse_key(base64.b64encode(KEY).decode(), where="x") == KEY
    assert parse_key(base64.urlsafe_b64encode(KEY).decode() + "\n", where="x") == KEY
    raw = bytes([0xFF]) * 32
    assert parse_key(raw, where="x") == raw
    f = tmp_path / "key"
    f.write_text(KEY.hex() + "\n")
    g = tmp_path / "key2"
    g.write_bytes(raw)
    ring = KeyRing.load([f, g])
    assert ring is not None and ring.keys == (KEY, raw) and ring.current_id == key_id(KEY)
    for bad in ("", "abc", KEY.hex()[:-2], base64.b64encode(KEY[:16]).decode()):
        with pytest.raises(ConfigError, match="x: not a 32-byte key") as ei:
            parse_key(bad, where="x")
        assert "--key-file" in str(ei.value)
    with pytest.raises(ConfigError, match="cannot read key file"):
        KeyRing.load([tmp_path / "missing"])


def test_key_id_is_a_short_fingerprint_not_the_key() -> None:
    kid = key_id(KEY)
    assert len(kid) == 16 and kid != KEY.hex()[:16] and kid == RING.current_id
    assert key_id(os.urandom(32)) != kid
    assert KEY.hex() not in repr(RING) and kid in repr(RING)


def test_keys_from_the_environment(tmp_path: Path) -> None:
    a, b = os.urandom(32), os.urandom(32)
    f = tmp_path / "k"
    f.write_text(base64.b64encode(b).decode())
    ring = KeyRing.from_env({"CKPTSYNC_KEY": a.hex(), "CKPTSYNC_KEY_FILE": str(f)})
    assert ring is not None and ring.keys == (a, b)
    assert KeyRing.from_env({}) is None
    assert KeyRing.resolve([str(f)], {"CKPTSYNC_KEY": a.hex()}).keys == (b,)  # type: ignore[union-attr]
    assert KeyRing.of([a.hex(), b]).keys == (a, b)  # type: ignore[union-attr]
