"""The backend's own checksum of an upload, so that the server refuses bytes damaged in
transit (DESIGN.md, "Validity"): S3's full-object CRC32.

The manifest's digest (BLAKE3) stays the end-to-end truth; this one only lets the server
check what it received. S3 keeps a CRC of every object; for a multipart upload created with
``ChecksumType=FULL_OBJECT`` it checks each part against the CRC sent with it and, at
CompleteMultipartUpload, the whole object against the full-object CRC, which
:class:`PartChecksums` combines from the parts' CRCs (no second pass over the bytes). A part
or a body damaged in transit is refused (``BadDigest``) and sent again; an object that never
matched is never completed.

Each CRC is computed once, over the very bytes sent (a part's body, a single PUT's body), on
the thread that sends it; since every request then carries its checksum, botocore computes
none of its own (its default, ``when_supported``, is a CRC32 pass of its own over every body).
CRC32 because the standard library computes it over any buffer without a copy (part buffers
are bytearrays), and S3 and SeaweedFS check it as a full-object checksum like CRC32C and
CRC64NVME. A server that does not keep checksums ignores these headers (moto stores them
without checking).

Nothing here knows about any one backend's client: callers pass the arguments on.
"""

from __future__ import annotations

import base64
import functools
import threading
import zlib

__all__ = ["ALGORITHM", "PartChecksums", "checksum", "checksum_field", "crc32_combine", "encode",
           "full_object_args"]

#: S3's name of the checksum ckptsync sends (``ChecksumAlgorithm``, ``Checksum<ALGORITHM>``).
ALGORITHM = "CRC32"
_FIELD = f"Checksum{ALGORITHM}"
_POLY = 0xEDB88320  # CRC32 (zlib), reflected


def checksum(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """The CRC32 of ``data`` (continuing ``crc``); any buffer, no copy."""
    return zlib.crc32(data, crc)


def checksum_field() -> str:
    """The argument (UploadPart, PutObject, CompleteMultipartUpload) carrying the checksum."""
    return _FIELD


def encode(crc: int) -> str:
    """A CRC as S3 carries it: base64 of its 4 big-endian bytes."""
    return base64.b64encode(crc.to_bytes(4, "big")).decode("ascii")


def _gf2_times(mat: list[int] | tuple[int, ...], vec: int) -> int:
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def _gf2_square(mat: list[int]) -> list[int]:
    return [_gf2_times(mat, m) for m in mat]


@functools.lru_cache(maxsize=32)
def _zeros(length: int) -> tuple[int, ...]:
    """The GF(2) operator that carries a CRC32 through ``length`` zero bytes (as a matrix:
    the image of each bit); cached, since the parts of an upload share one or two sizes."""
    op = [_POLY] + [1 << i for i in range(31)]  # one zero bit
    for _ in range(3):
        op = _gf2_square(op)  # one zero byte
    acc: list[int] | None = None
    while length:
        if length & 1:
            acc = op if acc is None else [_gf2_times(op, c) for c in acc]
        length >>= 1
        if length:
            op = _gf2_square(op)
    return tuple(acc if acc is not None else [1 << i for i in range(32)])


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC32 of ``A + B`` from ``crc(A)``, ``crc(B)`` and ``len(B)`` (zlib's
    ``crc32_combine``: ``crc1`` carried through ``len2`` zero bytes, then ``crc2`` added)."""
    return _gf2_times(list(_zeros(len2)), crc1) ^ crc2


def full_object_args() -> dict[str, str]:
    """The CreateMultipartUpload arguments that make S3 check a full-object checksum."""
    return {"ChecksumAlgorithm": ALGORITHM, "ChecksumType": "FULL_OBJECT"}


class PartChecksums:
    """The CRC of each part of one multipart upload, recorded as parts are sent (from any
    thread, in any order), and the full-object CRC they combine into.

    :meth:`part` computes a part's CRC and returns the UploadPart argument carrying it;
    :meth:`complete_args` the CompleteMultipartUpload arguments for ``parts`` (each part's
    CRC added to its entry, and the full object's).
    """

    def __init__(self) -> None:
        self._parts: dict[int, tuple[int, int]] = {}  # number -> (crc, size)
        self._lock = threading.Lock()

    def part(self, number: int, data: bytes | bytearray | memoryview) -> dict[str, str]:
        crc = checksum(data)
        with self._lock:
            self._parts[number] = (crc, len(data))
        return {_FIELD: encode(crc)}

    def complete_args(self, parts: list[dict[str, object]]) -> dict[str, object]:
        """``MultipartUpload`` and the full-object checksum for completing ``parts``; {} when
        a part's CRC is unknown (sent by an attempt that did not record it)."""
        with self._lock:
            known = dict(self._parts)
        numbers = [int(str(p["PartNumber"])) for p in parts]
        if not numbers or any(n not in known for n in numbers):
            return {}
        total = 0  # the CRC of no bytes
        for n in sorted(numbers):
            crc, size = known[n]
            total = crc32_combine(total, crc, size)
        listed = [{**p, _FIELD: encode(known[int(str(p["PartNumber"]))][0])} for p in parts]
        return {"MultipartUpload": {"Parts": listed}, _FIELD: encode(total),
                "ChecksumType": "FULL_OBJECT"}
