"""Encrypted uploads to S3 with parallel parts: :func:`upload_sealed_multipart`.

The plain path (:func:`~ckptsync.transfer.files.upload_file` with an encrypting ``wrap``) sends
an encrypted file through s3fs's file object, one part after another. Here the committed file
is read in order, hashed (it must still be the committed one), encrypted by the writer that
``seal`` makes, and the stored bytes are sent as the parts of a :class:`MultipartUpload` on a
pool, as :func:`~ckptsync.transfer.multipart.upload_file_multipart` sends a plaintext file.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ckptsync.config import TransferConfig
from ckptsync.errors import CorruptCheckpointError, LocalStorageError
from ckptsync.manifest import FileEntry, new_hasher
from ckptsync.progress import NullProgress, Progress
from ckptsync.transfer.checksums import checksum
from ckptsync.transfer.files import open_local
from ckptsync.transfer.multipart import MultipartUpload, OpenObject
from ckptsync.transfer.parallel import Slots, wait_for_slot
from ckptsync.transfer.retry import Retrier, check_stop

__all__ = ["PartSink", "upload_sealed_multipart"]


class PartSink:
    """A write-only file whose bytes go up as the parts of one S3 multipart upload.

    A write waits for a slot of ``slots`` before filling a part (memory stays bounded);
    every full part is sent on the upload's pool. :meth:`close` sends the last part and
    completes the upload; :meth:`discard` aborts it (nothing becomes visible).
    """

    def __init__(self, upload: MultipartUpload, *, part_size: int, slots: Slots,
                 stop: threading.Event | None) -> None:
        self.upload = upload
        self.part_size = part_size
        self.slots = slots
        self.stop = stop
        self.size = 0
        self.closed = False
        self._part: bytearray | None = None
        self._fill = 0
        self._crc = 0  # of the part's bytes so far

    def write(self, data: Any) -> int:
        mv = memoryview(data).cast("B")
        n = len(mv)
        while len(mv):
            if self._part is None:
                check_stop(self.stop, self.upload.url)
                self.upload.raise_failed()
                wait_for_slot(self.slots, self.stop, self.upload.url)
                self._part = self.slots.take(self.part_size)
                self._fill = 0
                self._crc = 0
            k = min(len(mv), self.part_size - self._fill)
            self._part[self._fill:self._fill + k] = mv[:k]
            # The part's CRC over the stored bytes just copied, while they are in the cache.
            self._crc = checksum(memoryview(self._part)[self._fill:self._fill + k], self._crc)
            self._fill += k
            mv = mv[k:]
            if self._fill == self.part_size:
                self._send()
        self.size += n
        return n

    def _send(self) -> None:
        assert self._part is not None
        part, self._part = self._part, None
        try:
            data, lent = self.slots.body(part, self._fill)
        except BaseException:
            self.slots.sent(part)
            raise
        self.upload.send(data, lent, self._crc)

    def close(self) -> None:
        if self.closed:
            return
        if self._part is not None:
            self._send()  # the last part (a single part may be short)
        self.upload.complete(self.upload.parts(), self.size)
        self.closed = True

    def discard(self) -> None:
        if self._part is not None:
            self.slots.sent(self._part)
            self._part = None
        self.upload.abort()


def upload_sealed_multipart(
    fs: Any, local_path: Path, remote_path: str, entry: FileEntry, *, open_object: OpenObject,
    url: str, config: TransferConfig, retrier: Retrier, slots: Slots,
    seal: Callable[[Any], Any], stored: int, progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Upload ``local_path`` (verified against ``entry`` while read) through the writer
    ``seal(sink)`` returns (an :class:`~ckptsync.crypto.Encryptor`) as a parallel multipart
    upload of its ``stored`` bytes. Not retried as a whole (each part is).

    ``open_object`` makes the S3 calls (the backend's); ``fs`` forgets ``remote_path`` after.

    Raises: as :func:`~ckptsync.transfer.files.upload_file`;
    :class:`~ckptsync.transfer.fence.PrivateApiChanged` when the backend's private API failed
    (the caller uploads the plain way).
    """
    progress = progress or NullProgress()
    sent = [0]
    upload = MultipartUpload(open_object, remote_path, url=url, retrier=retrier, slots=slots,
                             window=max(1, config.parts_in_flight), thread_name="ckptsync-part",
                             stop=stop)
    digest = new_hasher(entry.algo)
    size = 0
    sink = PartSink(upload, part_size=max(config.part_size, -(-stored // 10_000)), slots=slots,
                    stop=stop)
    try:
        upload.create()
        writer = seal(sink)
        with open_local(local_path) as src:
            while True:
                check_stop(stop, url)
                try:
                    chunk = src.read(config.chunk_size)
                except OSError as e:
                    raise LocalStorageError(f"cannot read local checkpoint file {local_path}: "
                                            f"{e.strerror or e}") from e
                if not chunk:
                    break
                digest.update(chunk)
                size += len(chunk)
                writer.write(chunk)
                progress.update(len(chunk))
                sent[0] += len(chunk)
        # Complete only if the bytes read are the committed ones.
        if size != entry.size or digest.hexdigest() != entry.digest:
            raise CorruptCheckpointError(
                f"{local_path}: content no longer matches its manifest (read {size} bytes, "
                f"expected {entry.size}); the file changed after its checkpoint was committed, "
                "so it is not uploaded", path=str(local_path))
        writer.close()  # the last chunk, the last part, CompleteMultipartUpload
    except BaseException:
        progress.update(-sent[0])
        sink.discard()  # its part's slot back, the upload aborted: nothing visible
        raise
    finally:
        upload.join()
        upload.close()
        fs.invalidate_cache(remote_path)
