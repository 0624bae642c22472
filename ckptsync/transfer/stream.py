"""A file uploaded to S3 while it is being written: :class:`MultipartStream`.

The checkpointer tees a file being serialized into a stream (:meth:`RemoteStore.stream_file
<ckptsync.remote.RemoteStore.stream_file>`), whose parts go up as a parallel multipart upload
(:class:`~ckptsync.transfer.multipart.MultipartUpload`) without ever making the writer wait;
the push completes it once the local checkpoint is committed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from ckptsync.config import TransferConfig
from ckptsync.manifest import FileEntry
from ckptsync.progress import Progress
from ckptsync.transfer.checksums import checksum
from ckptsync.transfer.fence import PrivateApiChanged
from ckptsync.transfer.multipart import MultipartUpload, OpenObject
from ckptsync.transfer.parallel import Slots, wait_for_slot
from ckptsync.transfer.retry import Retrier
from ckptsync.transfer.upload_parts import send_file

__all__ = ["MultipartStream"]

log = logging.getLogger(__name__)


class MultipartStream:
    """Uploads bytes to S3 as they are written: a parallel multipart upload fed by a writer,
    which it never makes wait (DESIGN.md: a save never waits on the network).

    The checkpointer tees a file being serialized (and hashed, and written locally) into
    :meth:`write`, which copies it into a part buffer lent by ``slots``; every full
    ``part_size`` part is sent on a small pool at once, so serialization, hashing and upload
    overlap. The multipart upload is created on that pool with the first full part (a
    smaller file is left to the normal upload). ``slots`` bound the parts held in memory.

    When the window is full (the link is slower than the disk, stalled, or the create is
    still being retried), the stream stops taking bytes: it *detaches* at the end of the
    parts it sent, and the writer goes on at the speed of its disk. :meth:`finish`, once the
    file is committed, then resumes the same upload from the committed file at the first byte
    not sent (parts already sent are kept: no byte goes twice). It reads and hashes the whole
    file (the bytes already sent included), so the upload is completed only when every byte
    read hashes to the manifest's entry, as a fresh upload of the file is.

    :meth:`write` never raises and never waits: a failure marks the stream failed, and
    :meth:`finish` then returns False so that the caller uploads the committed file the normal
    way. Nothing is visible remotely until :meth:`finish` completes the upload; :meth:`abort`
    drops it.

    ``open_object`` makes the S3 calls (the backend's); ``forget(remote_path)`` is told once
    the upload is over (the filesystem's cache of that path); ``unusable``: what private API
    already failed on this filesystem (warned about): the stream takes no bytes, and the
    committed file goes up the normal way.
    """

    def __init__(self, open_object: OpenObject, remote_path: str, *, url: str,
                 config: TransferConfig, retrier: Retrier, slots: Slots,
                 forget: Callable[[str], None] | None = None,
                 unusable: str | None = None) -> None:
        self.forget = forget
        self.remote_path = remote_path
        self.url = url
        self.retrier = retrier
        self.slots = slots
        self.part_size = config.part_size
        self.size = 0  # bytes written to the file
        self.sent = 0  # bytes handed to parts (whole parts)
        self.detached = False  # stopped taking bytes at ``sent``; finish resumes from the file
        self.error: BaseException | None = None
        if unusable is not None:  # warned about: the committed file goes up the normal way
            self.error = PrivateApiChanged(unusable)
        # The part being filled (a buffer lent by ``slots``; its slot is taken only to send
        # it, so that streams waiting for their commit never hold the window) and its fill.
        self._part: bytearray | None = None
        self._fill = 0
        self._crc = 0  # of the part's bytes so far
        self._done = False
        self._upload = MultipartUpload(open_object, remote_path, url=url, retrier=retrier,
                                       slots=slots, window=max(1, config.parts_in_flight),
                                       thread_name="ckptsync-stream")

    def write(self, data: memoryview) -> None:
        self.size += len(data)
        if self.error is not None or self._done or self.detached:
            return
        try:
            while len(data):
                if self._part is None:
                    self._part = self.slots.take(self.part_size)
                    self._fill = 0
                    self._crc = 0
                k = min(len(data), self.part_size - self._fill)
                self._part[self._fill:self._fill + k] = data[:k]  # the one copy of each byte
                # The part's CRC over the bytes just copied, while they are in the cache.
                self._crc = checksum(memoryview(self._part)[self._fill:self._fill + k],
                                     self._crc)
                self._fill += k
                data = data[k:]
                if self._fill == self.part_size:
                    # Never wait for the window: the link is behind the disk, so the rest of
                    # the file goes up from the committed file, after the local commit.
                    if not self.slots.acquire(blocking=False):
                        self._detach()
                        return
                    part, self._part = self._part, None
                    self._send(part, part, self._crc)
                    self.sent += self.part_size
        except BaseException as e:  # the local save must go on: fall back to a normal upload
            log.info("streaming upload of %s stopped, will upload after commit: %s", self.url, e)
            self.error = e
            self._drop_part()

    def _detach(self) -> None:
        log.debug("streaming upload of %s: the link is behind, %d bytes sent; the rest goes "
                  "up after the local commit", self.url, self.sent)
        self.detached = True
        self._drop_part()

    def _drop_part(self) -> None:
        if self._part is not None:
            self.slots.give(self._part)
            self._part = None

    def _send(self, data: bytes | bytearray, buf: bytearray | None, crc: int) -> None:
        """Send one part (of CRC ``crc``); the caller holds its slot (and ``buf``), handed to
        the part here."""
        try:
            if not self._upload.started:
                self._upload.start()  # created on the pool: never waited for here
            self._upload.raise_failed()
        except BaseException:
            self.slots.sent(buf)
            raise
        self._upload.send(data, buf, crc)

    def finish(self, entry: FileEntry, local_path: Path, progress: Progress | None = None,
               stop: threading.Event | None = None) -> bool:
        """Send the rest (from memory, or from ``local_path``, the committed file, where the
        stream detached) and complete the upload; True if ``remote_path`` now holds exactly
        the ``entry.size`` bytes of ``entry``, False if the caller must upload the file
        itself (nothing sent was completed)."""
        if self._done:
            return False
        reported = [0]  # bytes given to progress, taken back if this fails
        lock = threading.Lock()

        def sent(n: int) -> None:  # a resumed upload can be long: show that bytes move
            if progress is not None:
                progress.update(n)
            with lock:
                reported[0] += n

        try:
            if (self.error is not None or not self._upload.started
                    or self.size != entry.size):
                return False
            self._upload.on_part = sent
            self._upload.raise_failed()
            if self.detached:
                send_file(self._upload, local_path, entry, part_size=self.part_size,
                           slots=self.slots, url=self.url, stop=stop, skip=self.sent)
            else:
                if self._part is not None:  # the short last part
                    part, self._part = self._part, None
                    wait_for_slot(self.slots, stop, self.url)
                    self._send(*self.slots.body(part, self._fill), self._crc)
                self._upload.complete(self._upload.parts(), entry.size)
            with lock:
                rest, reported[0] = entry.size - reported[0], entry.size
            if progress is not None:
                progress.update(rest)  # the parts sent before this call
            return True
        except BaseException as e:
            log.info("streaming upload of %s failed, uploading the file instead: %s", self.url, e)
            self.error = e
            return False
        finally:
            self.abort()  # every part done (a completed upload has nothing to abort)
            if self.error is not None and progress is not None and reported[0]:
                progress.update(-reported[0])  # the caller uploads the file: counted again

    def abort(self) -> None:
        """Drop the upload (idempotent); nothing becomes visible."""
        self._done = True
        self._drop_part()
        self._upload.abort()
        self._upload.close()
        if self.forget is not None:
            self.forget(self.remote_path)
