"""A committed local file as an S3 multipart upload with parallel parts:
:func:`upload_file_multipart`, and :func:`send_file`, which a stream that fell behind the disk
also finishes with (:class:`~ckptsync.transfer.stream.MultipartStream`).

One thread reads the file in order, part by part, hashing every byte it reads; each part is
sent on the upload's pool (:class:`~ckptsync.transfer.multipart.MultipartUpload`), so reading,
hashing and sending overlap, and a part holds a slot of the transfer's
:class:`~ckptsync.transfer.parallel.Slots` from before it is read until it is sent.
"""

from __future__ import annotations

import threading
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

__all__ = ["send_file", "upload_file_multipart"]


def _read_into(src: Any, buf: bytearray | memoryview) -> int:
    """Fill ``buf`` from ``src`` (``readinto``); the bytes read (short only at the end)."""
    view = memoryview(buf)
    n = 0
    while n < len(view):
        k = src.readinto(view[n:])
        if not k:
            break
        n += k
    return n


def send_file(upload: MultipartUpload, local_path: Path, entry: FileEntry, *, part_size: int,
               slots: Slots, url: str, stop: threading.Event | None, skip: int = 0) -> None:
    """Read ``local_path`` in order, hashing every byte, and send it from byte ``skip`` on as
    the next parts of ``upload`` (the bytes before ``skip`` were sent already, as whole
    ``part_size`` parts); then wait for every part and complete the upload, but only when
    the bytes read hash to ``entry``.

    Raises: CorruptCheckpointError (the file no longer matches ``entry``: nothing completed),
    LocalStorageError, and the errors of the parts.
    """
    digest = new_hasher(entry.algo)
    size = 0
    with open_local(local_path) as src:
        try:
            if skip:  # sent already: only hashed, so that the whole file is verified
                buf = slots.take(part_size)
                try:
                    while size < skip:
                        check_stop(stop, url)
                        try:
                            n = _read_into(src, memoryview(buf)[:min(part_size, skip - size)])
                        except OSError as e:
                            raise LocalStorageError(f"cannot read local checkpoint file "
                                                    f"{local_path}: {e.strerror or e}") from e
                        if not n:
                            break
                        digest.update(memoryview(buf)[:n])
                        size += n
                finally:
                    slots.give(buf)
            while size >= skip:  # (a file shorter than ``skip`` sends nothing: refused below)
                check_stop(stop, url)
                upload.raise_failed()
                wait_for_slot(slots, stop, url)
                buf = slots.take(part_size)
                try:
                    n = _read_into(src, buf)
                except OSError as e:
                    slots.sent(buf)
                    raise LocalStorageError(
                        f"cannot read local checkpoint file {local_path}: {e.strerror or e}"
                    ) from e
                if not n:
                    slots.sent(buf)
                    break
                data, lent = slots.body(buf, n)
                digest.update(data)
                size += n
                upload.send(data, lent, checksum(data))  # its CRC in the pass that read it
                del data, buf, lent
            parts = upload.parts()
        except BaseException:
            upload.cancel()
            raise
        finally:
            upload.join()
    # The bytes sent are the bytes hashed: complete only if they are the committed ones.
    if size != entry.size or digest.hexdigest() != entry.digest:
        raise CorruptCheckpointError(
            f"{local_path}: content no longer matches its manifest (read {size} bytes, "
            f"expected {entry.size}); the file changed after its checkpoint was committed, "
            "so it is not uploaded",
            path=str(local_path),
        )
    upload.complete(parts, entry.size)


def upload_file_multipart(
    fs: Any,
    local_path: Path,
    remote_path: str,
    entry: FileEntry,
    *,
    open_object: OpenObject,
    url: str,
    config: TransferConfig,
    retrier: Retrier,
    slots: Slots,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Upload ``local_path`` to S3 as a multipart upload whose parts are sent concurrently.

    ``open_object`` makes the S3 calls (the backend's); ``fs`` is the filesystem whose cache
    forgets ``remote_path`` afterwards. One thread reads the file in order, part by part,
    hashing every byte it reads; each part is then sent on a small pool, so hashing, reading
    and sending overlap. A part holds a slot of ``slots`` from before it is read until it is
    sent: memory is bounded by the slots, whatever the file's size. Each part is retried on
    its own. The upload is completed only when the bytes read hash to ``entry``; otherwise
    (or on any error, or ``stop``) it is aborted, so no object ever appears.

    Raises: as :func:`~ckptsync.transfer.files.upload_file`;
    :class:`~ckptsync.transfer.fence.PrivateApiChanged` when the backend's private API failed
    (warned about; the upload aborted, its progress taken back): upload the file through the
    public API instead.
    """
    progress = progress or NullProgress()
    part_size = max(config.part_size, -(-entry.size // 10_000))  # S3: at most 10,000 parts
    reported = [0]  # bytes given to progress, taken back if the upload fails
    lock = threading.Lock()

    def sent(n: int) -> None:
        progress.update(n)
        with lock:
            reported[0] += n

    upload = MultipartUpload(open_object, remote_path, url=url, retrier=retrier, slots=slots,
                             window=max(1, config.parts_in_flight),
                             thread_name="ckptsync-part", stop=stop, on_part=sent)
    try:
        upload.create()
    except BaseException:
        upload.close()
        raise
    try:
        send_file(upload, local_path, entry, part_size=part_size, slots=slots, url=url,
                   stop=stop)
    except BaseException:
        with lock:
            progress.update(-reported[0])
        upload.abort()
        raise
    finally:
        upload.close()
        fs.invalidate_cache(remote_path)
