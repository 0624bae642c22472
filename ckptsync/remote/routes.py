"""How one file of a push goes up: the upload routes, each an object that says whether it fits
a file (:meth:`Route.is_compatible`) and tries it (:meth:`Route.send`). The model is
s3transfer's upload input managers.

The routes a store can take are chosen once, from its backend (:func:`routes_for`); each file
then takes the first compatible route that sends it. A route that cannot finish (a stream
that fell too far behind, a server-side copy that failed, a library whose private API
changed) returns False and the next one takes the file, so that a file always goes up:

1. :class:`Stream`: the bytes were sent while the file was written (S3); the rest, where
   the link fell behind, from the committed file.
2. :class:`ServerCopy`: the previous checkpoint holds these very bytes (same digest): copied
   server-side, not sent (S3, GCS).
3. :class:`SealedParts`: an encrypted file larger than a part, as a multipart upload of its
   ciphertext with parallel parts (S3).
4. :class:`Parts`: a file larger than a part, as a multipart upload with parallel parts (S3).
5. :class:`ViaTemp`: to a temporary name, then into place the storage's way (a directory,
   ``memory://``: where a file being written is visible).
6. :class:`Plain`: streamed through the filesystem's file (objects appear whole).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

from ckptsync.atomic import temp_name
from ckptsync.crypto import stored_size
from ckptsync.errors import CkptSyncError, CorruptCheckpointError, RemoteError
from ckptsync.local import LocalCheckpoint
from ckptsync.manifest import FileEntry
from ckptsync.remote.backends import Backend
from ckptsync.remote.boundary import not_found
from ckptsync.remote.location import Location
from ckptsync.remote.visibility import Visibility
from ckptsync.transfer import (
    MultipartStream,
    PrivateApiChanged,
    Progress,
    Slots,
    upload_file,
    upload_file_multipart,
    upload_sealed_multipart,
)

__all__ = ["Parts", "Plain", "Route", "SealedParts", "ServerCopy", "Stream", "Upload", "ViaTemp",
           "routes_for"]

log = logging.getLogger("ckptsync.remote")


@dataclass
class Upload:
    """One file of one push, as the routes see it.

    Attributes:
        ckpt: the committed local checkpoint.
        entry: the file's entry in its manifest (what the bytes read must hash to).
        final: the file's remote path; ``url`` the same for messages.
        progress, stop, slots: the push's (``slots``: the multipart parts it holds at once).
        source: the remote path of the same bytes in the previous checkpoint, if any.
        stream: the sink that sent the file while it was written, if any.
        seal: under a key, wraps each attempt's remote file in an encryptor.
    """

    ckpt: LocalCheckpoint
    entry: FileEntry
    final: str
    url: str
    progress: Progress
    stop: threading.Event
    slots: Slots
    source: str | None = None
    stream: MultipartStream | None = None
    seal: Callable[[Any], Any] | None = None

    @property
    def local(self) -> Path:
        """The committed local file."""
        return self.ckpt.file(self.entry.path)


class Route:
    """One way a file goes up (see the module docstring)."""

    copies: ClassVar[bool] = False
    """The route copies bytes already on the remote (not sent: counted apart)."""

    def __init__(self, at: Location, visibility: Visibility) -> None:
        self.at = at
        self.visibility = visibility

    @classmethod
    def available(cls, backend: Backend) -> bool:
        """Whether a store on ``backend`` can take this route at all."""
        return True

    def is_compatible(self, up: Upload) -> bool:
        """Whether this route fits ``up``."""
        return True

    def send(self, up: Upload) -> bool:
        """Upload ``up``: True when the file is there; False when the next route must
        take it (nothing of this attempt is visible).

        Raises:
            RemoteError, LocalStorageError, CorruptCheckpointError: the upload failed.
        """
        raise NotImplementedError

    def _multipart(self, up: Upload) -> bool:
        backend = self.at.backend
        return (backend.parallel_parts and backend.private_api_failure() is None
                and up.entry.size > self.at.config.part_size)


class Stream(Route):
    @classmethod
    def available(cls, backend: Backend) -> bool:
        return backend.parallel_parts

    def is_compatible(self, up: Upload) -> bool:
        return up.stream is not None

    def send(self, up: Upload) -> bool:
        assert up.stream is not None
        # Sent while it was serialized (the bytes hashed into entry), and where the link fell
        # behind, the rest from the committed file, verified against entry.
        return up.stream.finish(up.entry, up.local, up.progress, stop=up.stop)


class ServerCopy(Route):
    copies: ClassVar[bool] = True

    @classmethod
    def available(cls, backend: Backend) -> bool:
        return backend.server_copy

    def is_compatible(self, up: Upload) -> bool:
        return up.source is not None

    def send(self, up: Upload) -> bool:
        """The copy's size is checked (and every download verifies its digest as usual); a
        copy that fails (its source deleted since, by retention or gc) is uploaded instead."""
        at, source, size = self.at, up.source, up.entry.size

        def copy() -> None:
            at.fs.copy(source, up.final)
            at.backend.forget(up.final)
            got = int(at.fs.info(up.final).get("size") or 0)
            if got != size:
                raise CorruptCheckpointError(f"{up.url}: copy has {got} bytes, not {size}",
                                             path=up.url)

        try:
            at.call(copy, up.url, "copy to")
        except CkptSyncError as e:
            log.info("server-side copy of %s failed, uploading it instead: %s", up.url, e)
            return False
        up.progress.update(size)
        return True


class SealedParts(Route):
    @classmethod
    def available(cls, backend: Backend) -> bool:
        return backend.parallel_parts

    def is_compatible(self, up: Upload) -> bool:
        return up.seal is not None and self._multipart(up)

    def send(self, up: Upload) -> bool:
        assert up.seal is not None
        at = self.at
        try:
            upload_sealed_multipart(at.fs, up.local, up.final, up.entry,
                                    open_object=at.backend.object_calls, url=up.url,
                                    config=at.config, retrier=at.retry, slots=up.slots,
                                    seal=up.seal, stored=stored_size(up.entry.size),
                                    progress=up.progress, stop=up.stop)
        except PrivateApiChanged:  # warned about: the plain way
            return False
        return True


class Parts(Route):
    @classmethod
    def available(cls, backend: Backend) -> bool:
        return backend.parallel_parts

    def is_compatible(self, up: Upload) -> bool:
        return up.seal is None and self._multipart(up)

    def send(self, up: Upload) -> bool:
        at = self.at
        try:
            upload_file_multipart(at.fs, up.local, up.final, up.entry,
                                  open_object=at.backend.object_calls, url=up.url,
                                  config=at.config, retrier=at.retry, slots=up.slots,
                                  progress=up.progress, stop=up.stop)
        except PrivateApiChanged:  # warned about: aborted, its progress taken back
            return False
        return True


class Plain(Route):
    def send(self, up: Upload) -> bool:
        self._upload(up, up.final)
        return True

    def _upload(self, up: Upload, target: str, finish: Callable[[], None] | None = None) -> None:
        at = self.at
        try:
            upload_file(at.fs, up.local, target, up.entry, url=up.url, config=at.config,
                        retrier=at.retry, progress=up.progress, stop=up.stop, finish=finish,
                        wrap=up.seal, body_check=at.backend.body_check)
        except BaseException as e:
            if target != up.final:  # a failed attempt removes its own temporary file
                with contextlib.suppress(Exception):
                    at.fs.rm_file(target)
            if isinstance(e, RemoteError) and not e.retryable and not_found(e):
                # This push already read the root's marker, so the bucket is there: a "not
                # found" here is an upload session that finished while its reply was lost
                # (gcsfs sends the last request of a resumable upload again). Ambiguous: a new
                # upload resolves it.
                raise RemoteError(f"cannot upload to {up.url}: the server no longer knew the "
                                  "upload when its last request was sent again (the reply to "
                                  "it was lost); retry the push", url=up.url,
                                  retryable=True) from e
            raise


class ViaTemp(Plain):
    @classmethod
    def available(cls, backend: Backend) -> bool:
        return backend.upload_via_temp

    def send(self, up: Upload) -> bool:
        head, _, base = up.final.rpartition("/")
        target = f"{head}/{temp_name(base, 'part')}"
        self._upload(up, target, finish=partial(self.visibility.place_upload, target, up.final))
        return True


#: Every route, in the order a file tries them.
ROUTES: tuple[type[Route], ...] = (Stream, ServerCopy, SealedParts, Parts, ViaTemp, Plain)


def routes_for(at: Location, visibility: Visibility) -> list[Route]:
    """The routes a store at ``at`` can take, in order (chosen once, from its backend)."""
    return [cls(at, visibility) for cls in ROUTES if cls.available(at.backend)]
