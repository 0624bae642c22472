"""The full-object CRC S3 checks is the CRC of the whole file, whatever its parts: CRC32C
(google-crc32c's C code), and CRC32 (zlib) where google-crc32c is not installed."""

from __future__ import annotations

import base64
import os
import zlib

import google_crc32c
import pytest

from ckptsync.transfer.checksums import ALGORITHM, CRC32, CRC32C, Crc, PartChecksums, checksum

pytestmark = pytest.mark.core

assert CRC32C is not None  # the dev environment has google-crc32c's C code
REFERENCE = {"CRC32C": lambda b: google_crc32c.value(bytes(b)), "CRC32": zlib.crc32}
ALGORITHMS = [CRC32C, CRC32]


def _b64(crc: int) -> str:
    return base64.b64encode(crc.to_bytes(4, "big")).decode()


def test_s3_uploads_send_crc32c() -> None:
    assert ALGORITHM is CRC32C
    data = os.urandom(1000)
    assert checksum(data) == google_crc32c.value(data)


@pytest.mark.parametrize("crc", ALGORITHMS, ids=lambda c: c.name)
@pytest.mark.parametrize("sizes", [[1], [0, 5], [7, 1, 3], [5 << 20, 5 << 20, 12345]])
def test_full_object_crc_is_the_crc_of_all_the_bytes(crc: Crc, sizes: list[int]) -> None:
    parts = [os.urandom(n) for n in sizes]
    sums = PartChecksums(crc)
    for number in reversed(range(1, len(parts) + 1)):  # parts finish in any order
        sums.part(number, bytearray(parts[number - 1]))
    listed = [{"PartNumber": n, "ETag": f"e{n}"} for n in range(1, len(parts) + 1)]
    args = sums.complete_args(listed)
    ref = REFERENCE[crc.name]
    assert args[f"Checksum{crc.name}"] == _b64(ref(b"".join(parts)))
    assert args["ChecksumType"] == "FULL_OBJECT"
    assert [p[f"Checksum{crc.name}"] for p in args["MultipartUpload"]["Parts"]] == [
        _b64(ref(p)) for p in parts]


@pytest.mark.parametrize("crc", ALGORITHMS, ids=lambda c: c.name)
def test_combine_matches_the_crc_of_the_concatenation(crc: Crc) -> None:
    a, b = os.urandom(1000), os.urandom(4097)
    ref = REFERENCE[crc.name]
    assert crc.combine(ref(a), ref(b), len(b)) == ref(a + b)


@pytest.mark.parametrize("crc", ALGORITHMS, ids=lambda c: c.name)
def test_any_buffer_is_checksummed_in_place(crc: Crc) -> None:
    """Part buffers are bytearrays, filled in pieces: views of them, and of bytes, give the
    CRC of their bytes (and carry a CRC on)."""
    data = os.urandom(3 << 20)
    buf = bytearray(data)
    ref = REFERENCE[crc.name]
    assert crc.update(0, buf) == ref(data)
    assert crc.update(0, memoryview(buf)[5:70001]) == ref(data[5:70001])
    assert crc.update(0, memoryview(data)[5:70001]) == ref(data[5:70001])
    carried = crc.update(crc.update(0, memoryview(buf)[:1000]), memoryview(buf)[1000:])
    assert carried == ref(data)
    assert crc.update(7, b"") == 7
    buf.extend(b"x")  # the buffer is not held after the call


def test_a_part_whose_crc_is_unknown_sends_no_full_object_checksum() -> None:
    sums = PartChecksums()
    sums.part(1, b"abc")
    assert sums.complete_args([{"PartNumber": 1, "ETag": "x"}, {"PartNumber": 2, "ETag": "y"}]) \
        == {}
