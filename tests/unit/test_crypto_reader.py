"""Reading an encrypted file back at random (:class:`ckptsync.crypto.SealedReader`, what
``torch.load`` reads an ``encrypt_local=True`` file through), and the keyed content MAC."""

from __future__ import annotations

import io
import os
import random
from pathlib import Path

import pytest

from ckptsync.crypto import HEADER_SIZE, KeyRing, SealedReader, content_mac
from ckptsync.errors import CorruptCheckpointError
from tests.unit.test_crypto import KEY, RING, C, chunks, seal

pytestmark = pytest.mark.core


def reader(path: Path, data: bytes, *, name: str = "ck", relpath: str = "model.pt",
           ring: KeyRing = RING) -> SealedReader:
    path.write_bytes(data)
    key = ring.get(ring.current_id)
    assert key is not None
    return SealedReader(path, key, kid=ring.current_id, name=name, relpath=relpath,
                        where=str(path))


@pytest.mark.parametrize("size", [0, 1, C - 1, C, C + 1, 3 * C + 17])
def test_random_reads_and_seeks_return_the_plaintext(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    with reader(tmp_path / "f", seal(data)) as r:
        assert r.plain_size == size and r.seek(0, io.SEEK_END) == size
        r.seek(0)
        assert r.read() == data
        rnd = random.Random(size)
        for _ in range(50):
            at, n = rnd.randrange(size + 1), rnd.randrange(2 * C)
            r.seek(at)
            assert r.read(n) == data[at:at + n] and r.tell() == min(size, at + n)


def _refused(tmp_path: Path, stored: bytes, **kw: str) -> str:
    with pytest.raises(CorruptCheckpointError) as ei, \
            reader(tmp_path / "t", stored, **kw) as r:  # opening or reading refuses it
        r.read()
    assert str(tmp_path / "t") in str(ei.value)
    return str(ei.value)


def test_tampering_is_refused_on_read(tmp_path: Path) -> None:
    stored = seal(os.urandom(4 * C + 100))
    head, cs = chunks(stored)
    flipped = bytearray(stored)
    flipped[HEADER_SIZE + 2 * C + 40] ^= 0x01
    assert "chunk 2 fails authentication" in _refused(tmp_path, bytes(flipped))
    _refused(tmp_path, head + b"".join(cs[:1] + cs[2:]))           # a chunk dropped
    _refused(tmp_path, head + b"".join([cs[1], cs[0], *cs[2:]]))   # two chunks swapped
    _refused(tmp_path, head + b"".join(cs[:3]))                    # cut at a chunk boundary
    _refused(tmp_path, stored[:-1])                                # cut inside the last one
    _refused(tmp_path, stored, relpath="optim.pt")                 # moved to another path
    _refused(tmp_path, stored, name="other")                       # or checkpoint
    assert "shorter than its header" in _refused(tmp_path, head[:10])
    assert "without its last chunk" in _refused(tmp_path, head)


def test_content_mac_is_keyed_and_bound_to_its_place() -> None:
    d = "ab" * 32
    mac = content_mac(KEY, "ck", "model.pt", "blake3", d)
    assert mac == RING.mac(RING.current_id, "ck", "model.pt", "blake3", d)
    assert len({mac, content_mac(os.urandom(32), "ck", "model.pt", "blake3", d),
                content_mac(KEY, "ck2", "model.pt", "blake3", d),
                content_mac(KEY, "ck", "optim.pt", "blake3", d),
                content_mac(KEY, "ck", "model.pt", "blake3", "cd" * 32)}) == 5
    assert d not in mac and RING.mac("0" * 16, "ck", "model.pt", "blake3", d) is None
