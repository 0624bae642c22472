"""The full-object CRC32 S3 checks is the CRC32 of the whole file, whatever its parts."""

from __future__ import annotations

import base64
import os
import zlib

import pytest

from ckptsync.transfer.checksums import PartChecksums, crc32_combine

pytestmark = pytest.mark.core


@pytest.mark.parametrize("sizes", [[1], [0, 5], [7, 1, 3], [5 << 20, 5 << 20, 12345]])
def test_full_object_crc_is_the_crc_of_all_the_bytes(sizes: list[int]) -> None:
    parts = [os.urandom(n) for n in sizes]
    sums = PartChecksums()
    for number in reversed(range(1, len(parts) + 1)):  # parts finish in any order
        sums.part(number, bytearray(parts[number - 1]))
    listed = [{"PartNumber": n, "ETag": f"e{n}"} for n in range(1, len(parts) + 1)]
    args = sums.complete_args(listed)
    whole = zlib.crc32(b"".join(parts))
    assert args["ChecksumCRC32"] == base64.b64encode(whole.to_bytes(4, "big")).decode()
    assert args["ChecksumType"] == "FULL_OBJECT"
    assert [p["ChecksumCRC32"] for p in args["MultipartUpload"]["Parts"]] == [
        base64.b64encode(zlib.crc32(p).to_bytes(4, "big")).decode() for p in parts]


def test_combine_matches_zlib() -> None:
    a, b = os.urandom(1000), os.urandom(4097)
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def test_a_part_whose_crc_is_unknown_sends_no_full_object_checksum() -> None:
    sums = PartChecksums()
    sums.part(1, b"abc")
    assert sums.complete_args([{"PartNumber": 1, "ETag": "x"}, {"PartNumber": 2, "ETag": "y"}]) \
        == {}
