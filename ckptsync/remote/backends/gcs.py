"""Google Cloud Storage through gcsfs (``gs://``, ``gcs://``): :class:`GCS`, and the CRC32C
that GCS checks on an upload, with every use of gcsfs's private API that sending it takes,
behind one fence.

GCS is an object store with a native create-only write (``ifGenerationMatch=0``) and
server-side copies; its client is opened with aiohttp timeouts (:meth:`GCS.open_options`).

GCS keeps a CRC32C of every object and, when an upload request declares one, refuses the
upload whose bytes do not match it (400 "Provided CRC32C ... doesn't match calculated
CRC32C"): bytes damaged in transit never become an object. gcsfs 2026.10 offers no way to
declare it: its files write every object as a JSON-API resumable upload (``GCSFile.flush``
initiates one even for a small file, at close) whose initiating metadata is limited to
``metadata`` (custom key/values, never checked) and ``fixed_key_metadata`` (filtered to
five known keys by ``_convert_fixed_key_metadata``); its ``consistency="crc32c"`` check
is the client's, after the object exists (and needs crcmod, a second pass). And the CRC of a
large file is not known when its upload is initiated. So :func:`crc32c_sender` declares it
the way Google's own client does: an ``X-Goog-Hash: crc32c=<base64>`` header on the request
that finalizes the resumable upload (the one whose ``Content-Range`` gives the total size),
which GCS checks before it creates the object. The CRC is computed by the caller in the pass
that reads and hashes the file (:meth:`Crc32cSender.update`, the upload's
:class:`~ckptsync.transfer.BodyCheck`), with ``google-crc32c``
(:data:`ckptsync.transfer.checksums.CRC32C`: installed with gcsfs through
google-cloud-storage; its C implementation only: the pure Python one would cost more than the
upload).

Since the server stores the CRC32C of what it received, the reply to the finalizing request
(the object's metadata) is also compared with the CRC sent: a server that does not check
the header (fake-gcs-server 1.x does not) still cannot keep a damaged object unseen; the
upload fails, retryable, and is sent again (the object is overwritten, and its checkpoint
is not committed meanwhile).

The reply to the finalizing request can be lost after GCS created the object (a reset, a
timeout); gcsfs then sends that request again, and GCS, which has closed the upload session,
answers 404. The outcome is ambiguous, and is resolved by reading the remote (DESIGN.md, "The
daemon"): :meth:`Crc32cSender.landed` reads the object back, and when it holds as many bytes
as were sent, with the CRC32C they had, the upload took effect.

The private API used, and where: the ``gcsfs`` attribute of a ``gcsfs.core.GCSFile`` (the
filesystem whose ``call`` sends each chunk), replaced on that one file by
:class:`_Finalizing`, which adds the header. The guard: when that attribute or its ``call``
is missing, or an upload completes without a finalizing request going through it (gcsfs
changed how it uploads), ONE warning per filesystem names what failed and the gcsfs version,
and that filesystem's uploads go without a declared CRC32C from then on (the manifest's
digest still verifies every download).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any, ClassVar

from ckptsync.config import TransferConfig
from ckptsync.errors import RemoteError
from ckptsync.remote.backends.objectstore import ObjectStore
from ckptsync.transfer import BodyCheck, Fence
from ckptsync.transfer.checksums import CRC32C, Buffer, Crc, encode

__all__ = ["GCS", "GCS_FENCE", "Crc32cSender", "crc32c_sender"]

log = logging.getLogger(__name__)

#: The fence around gcsfs's private API (one warning per filesystem).
GCS_FENCE = Fence(("gcsfs",), "uploads through this filesystem go without a CRC32C for the "
                  "server to check (the manifest's digest still verifies every download)", log)


class GCS(ObjectStore):
    """GCS through gcsfs: create-only manifests, server-side copies, and a CRC32C declared
    with every upload (through gcsfs's private API, fenced)."""

    name: ClassVar[str] = "gcs"
    extra: ClassVar[str | None] = "gcs"

    @classmethod
    def open_options(cls, options: Mapping[str, Any], config: TransferConfig) -> dict[str, Any]:
        """``options`` plus ``requests_timeout`` as an aiohttp ``ClientTimeout`` with
        ``sock_connect``/``sock_read`` (never a total, which would cut a large upload short),
        where the user did not set one: without it a black-holed endpoint hangs a call for
        many minutes."""
        out = dict(options)
        if out.get("requests_timeout") is not None:
            return out
        try:
            from aiohttp import ClientTimeout
        except ImportError:  # gcsfs is not installed: opening the URL says so
            return out
        out["requests_timeout"] = ClientTimeout(total=None, sock_connect=config.connect_timeout,
                                                sock_read=config.read_timeout)
        return out

    def body_check(self, f: Any, size: int) -> BodyCheck | None:
        """The CRC32C the request finalizing the upload declares (:func:`crc32c_sender`)."""
        return crc32c_sender(f)


class Crc32cSender:
    """The CRC32C of one upload through a gcsfs file, computed by :meth:`update` over the
    bytes written, in order; :meth:`seal` fixes it before the file is closed, so that the
    request finalizing the upload carries it; :meth:`check` (after the close) falls back,
    warned about, if no finalizing request went through.
    """

    def __init__(self, f: Any, crc32c: Crc) -> None:
        self._file = f
        self._crc32c = crc32c
        self.crc = 0
        self.sealed: str | None = None
        self.sent = False

    def update(self, chunk: Buffer) -> None:
        """Carry the CRC on over ``chunk``."""
        self.crc = self._crc32c.update(self.crc, chunk)

    def seal(self) -> None:
        self.sealed = encode(self.crc)

    def check(self) -> None:
        """After a close that completed the upload: the finalizing request carried the CRC."""
        if not self.sent:
            GCS_FENCE.fall_back(self._file.fs, "no request finalizing a GCS upload went "
                                "through GCSFile.gcsfs.call", "gcsfs changed how it uploads")

    def finalizing(self, headers: dict[str, str]) -> dict[str, str]:
        """``headers`` plus the CRC, for the request that finalizes the upload."""
        if self.sealed is None:
            return headers
        self.sent = True
        return {**headers, "X-Goog-Hash": f"crc32c={self.sealed}"}

    def landed(self, size: int) -> bool:
        """After a close that failed once the finalizing request was sent (its reply lost):
        does the object hold ``size`` bytes with the CRC32C sent? Read from the remote; False
        when it cannot be read (the caller's error stands)."""
        if self.sealed is None or not self.sent:
            return False
        fs, path = self._file.fs, self._file.path
        try:
            fs.invalidate_cache(path)
            info = fs.info(path)
        except Exception:  # not there, or unreadable: not known to have landed
            log.debug("cannot read back gs://%s", path, exc_info=True)
            return False
        return int(info.get("size", -1)) == size and info.get("crc32c") == self.sealed

    def verify_reply(self, path: str, contents: Any) -> None:
        """The object the server created holds the bytes sent, by its CRC32C (where the reply
        says): otherwise they were damaged on the way, and the upload is to be sent again."""
        if self.sealed is None or not contents:
            return
        try:
            stored = json.loads(contents).get("crc32c")
        except (ValueError, AttributeError, TypeError):
            return
        if stored is not None and stored != self.sealed:
            raise RemoteError(
                f"cannot upload to gs://{self._file.path}: refused: the server stored an object "
                f"whose CRC32C ({stored}) is not that of the bytes sent ({self.sealed}): they "
                "were damaged in transit; retry", url=f"gs://{self._file.path}", retryable=True)


class _Finalizing:
    """A stand-in for one ``GCSFile``'s filesystem: every attribute is the filesystem's, but
    ``call`` adds the CRC to the request that finalizes the resumable upload (a POST whose
    ``Content-Range`` gives the total size: ``bytes a-b/N`` or ``bytes */N``)."""

    def __init__(self, fs: Any, sender: Crc32cSender) -> None:
        self._fs = fs
        self._sender = sender

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fs, name)

    def call(self, method: str, path: str, *args: Any, **kwargs: Any) -> Any:
        headers = kwargs.get("headers")
        final = False
        if method == "POST" and isinstance(headers, dict):
            final = not str(headers.get("Content-Range", "/*")).endswith("/*")
            if final:
                kwargs["headers"] = self._sender.finalizing(headers)
        out = self._fs.call(method, path, *args, **kwargs)
        if final and isinstance(out, tuple) and len(out) == 2:
            self._sender.verify_reply(path, out[1])
        return out


def crc32c_sender(f: Any) -> Crc32cSender | None:
    """A :class:`Crc32cSender` for ``f``, a gcsfs file just opened for writing (nothing sent
    yet); None for any other file, or once gcsfs's private API failed on its filesystem, or
    without google-crc32c's C code."""
    try:
        from gcsfs.core import GCSFile
    except ImportError:
        return None
    if type(f) is not GCSFile or "w" not in str(getattr(f, "mode", "")):
        return None  # not a plain GCS object (a zonal bucket's file appends over gRPC)
    if GCS_FENCE.failure(f.fs) is not None:
        return None
    if CRC32C is None:
        GCS_FENCE.fall_back(f.fs, "google-crc32c's C implementation is not installed",
                            "pip install google-crc32c")
        return None
    fs = getattr(f, "gcsfs", None)
    if fs is None or not callable(getattr(fs, "call", None)) or getattr(f, "offset", None):
        GCS_FENCE.fall_back(f.fs, "GCSFile.gcsfs.call is missing", "gcsfs changed")
        return None
    sender = Crc32cSender(f, CRC32C)
    f.gcsfs = _Finalizing(fs, sender)
    return sender
