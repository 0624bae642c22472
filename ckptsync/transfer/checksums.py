"""The backend's own checksum of an upload, so that the server refuses bytes damaged in
transit (DESIGN.md, "Validity"): a full-object CRC32C, for S3 and for GCS.

The manifest's digest (BLAKE3) stays the end-to-end truth; this one only lets the server
check what it received. S3 keeps a CRC of every object; for a multipart upload created with
``ChecksumType=FULL_OBJECT`` it checks each part against the CRC sent with it and, at
CompleteMultipartUpload, the whole object against the full-object CRC, which
:class:`PartChecksums` combines from the parts' CRCs (no second pass over the bytes). A part
or a body damaged in transit is refused (``BadDigest``) and sent again; an object that never
matched is never completed. GCS checks the CRC32C declared on the request that finalizes a
resumable upload (:mod:`ckptsync.remote.backends.gcs`).

Each CRC is computed once, by the caller, in the pass that already reads the bytes it sends
(a file's chunks, a part as it is read or filled); since every request then carries its
checksum, botocore computes none of its own (its default, ``when_supported``, is a CRC32 pass
of its own over every body).

CRC32C, with ``google-crc32c``'s C code (SSE4.2 / ARMv8 CRC instructions: ~0.1 CPU-s per GiB
here against zlib CRC32's ~0.26-0.55), is the one checksum S3 and GCS both check (S3 and
SeaweedFS 4.48 check it on a PUT, a part and at CompleteMultipartUpload). google-crc32c takes
only ``bytes`` or a buffer that needs no release: a part buffer (a ``bytearray``) is handed to
it as a ctypes array over the same memory, without a copy. Without google-crc32c's C code
(the s3 extra installs it), S3 uploads send the CRC32 (zlib) they sent before, which S3 checks
the same way; GCS uploads send none (:mod:`ckptsync.remote.backends.gcs` says so once). A
server that does not keep checksums ignores these headers (moto stores them without checking).

Nothing here knows about any one backend's client: callers pass the arguments on.
"""

from __future__ import annotations

import base64
import ctypes
import functools
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["ALGORITHM", "CRC32", "CRC32C", "Crc", "PartChecksums", "checksum",
           "checksum_field", "encode", "full_object_args"]

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class Crc:
    """A CRC that S3 checks as a full-object checksum.

    Attributes:
        name: S3's name (``ChecksumAlgorithm``; the argument is ``Checksum<name>``).
        update: ``update(crc, data) -> crc``: the CRC carried on over ``data`` (any buffer,
            no copy).
        poly: the reflected polynomial (to combine the CRCs of parts, :meth:`combine`).
    """

    name: str
    update: Callable[[int, Buffer], int]
    poly: int

    @property
    def field(self) -> str:
        return f"Checksum{self.name}"

    def combine(self, crc1: int, crc2: int, len2: int) -> int:
        """The CRC of ``A + B`` from ``crc(A)``, ``crc(B)`` and ``len(B)`` (zlib's
        ``crc32_combine``: ``crc1`` carried through ``len2`` zero bytes, then ``crc2`` added)."""
        return _gf2_times(_zeros(self.poly, len2), crc1) ^ crc2


def _crc32c_update() -> Callable[[int, Buffer], int] | None:
    """google-crc32c's ``extend`` over any buffer, without a copy; None without its C code."""
    try:
        import google_crc32c
    except ImportError:
        return None
    if google_crc32c.implementation != "c":
        return None
    extend = google_crc32c.extend

    def update(crc: int, data: Buffer) -> int:
        if isinstance(data, bytes):
            return int(extend(crc, data))
        view = memoryview(data).cast("B")
        if not len(view):
            return crc
        if view.readonly:  # not a part buffer (those are bytearrays): rare, copied
            return int(extend(crc, view.tobytes()))
        # Its C code takes a buffer only if that needs no release; a ctypes array over the
        # same memory is one (and keeps ``data`` from being resized while it lives).
        return int(extend(crc, (ctypes.c_char * len(view)).from_buffer(view)))

    return update


def _zlib_update(crc: int, data: Buffer) -> int:
    return zlib.crc32(data, crc)


_crc32c = _crc32c_update()

#: CRC32C through google-crc32c's C code; None where it is not installed.
CRC32C: Crc | None = Crc("CRC32C", _crc32c, 0x82F63B78) if _crc32c is not None else None
#: CRC32 through zlib (what S3 uploads send without google-crc32c).
CRC32 = Crc("CRC32", _zlib_update, 0xEDB88320)
#: The checksum S3 uploads send.
ALGORITHM: Crc = CRC32C or CRC32


def checksum(data: Buffer, crc: int = 0) -> int:
    """The :data:`ALGORITHM` CRC of ``data`` (continuing ``crc``); any buffer, no copy."""
    return ALGORITHM.update(crc, data)


def checksum_field() -> str:
    """The argument (UploadPart, PutObject, CompleteMultipartUpload) carrying the checksum."""
    return ALGORITHM.field


def encode(crc: int) -> str:
    """A CRC as S3 and GCS carry it: base64 of its 4 big-endian bytes."""
    return base64.b64encode(crc.to_bytes(4, "big")).decode("ascii")


def _gf2_times(mat: tuple[int, ...], vec: int) -> int:
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def _gf2_square(mat: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(_gf2_times(mat, m) for m in mat)


@functools.lru_cache(maxsize=32)
def _zeros(poly: int, length: int) -> tuple[int, ...]:
    """The GF(2) operator that carries a CRC (of reflected polynomial ``poly``) through
    ``length`` zero bytes (as a matrix: the image of each bit); cached, since the parts of an
    upload share one or two sizes."""
    op = (poly, *(1 << i for i in range(31)))  # one zero bit
    for _ in range(3):
        op = _gf2_square(op)  # one zero byte
    acc: tuple[int, ...] | None = None
    while length:
        if length & 1:
            acc = op if acc is None else tuple(_gf2_times(op, c) for c in acc)
        length >>= 1
        if length:
            op = _gf2_square(op)
    return acc if acc is not None else tuple(1 << i for i in range(32))


def full_object_args() -> dict[str, str]:
    """The CreateMultipartUpload arguments that make S3 check a full-object checksum."""
    return {"ChecksumAlgorithm": ALGORITHM.name, "ChecksumType": "FULL_OBJECT"}


class PartChecksums:
    """The CRC of each part of one multipart upload, recorded as parts are sent (from any
    thread, in any order), and the full-object CRC they combine into.

    :meth:`record` keeps a part's CRC (computed by the caller in the pass that read the
    part) and returns the UploadPart argument carrying it; :meth:`part` computes it first.
    :meth:`complete_args` gives the CompleteMultipartUpload arguments for ``parts`` (each
    part's CRC added to its entry, and the full object's).
    """

    def __init__(self, crc: Crc | None = None) -> None:
        self.crc = crc or ALGORITHM
        self._parts: dict[int, tuple[int, int]] = {}  # number -> (crc, size)
        self._lock = threading.Lock()

    def part(self, number: int, data: Buffer) -> dict[str, str]:
        return self.record(number, self.crc.update(0, data), memoryview(data).nbytes)

    def record(self, number: int, crc: int, size: int) -> dict[str, str]:
        with self._lock:
            self._parts[number] = (crc, size)
        return {self.crc.field: encode(crc)}

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
            total = self.crc.combine(total, crc, size)
        field = self.crc.field
        listed = [{**p, field: encode(known[int(str(p["PartNumber"]))][0])} for p in parts]
        return {"MultipartUpload": {"Parts": listed}, field: encode(total),
                "ChecksumType": "FULL_OBJECT"}
