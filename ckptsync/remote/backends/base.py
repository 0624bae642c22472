"""The storage any fsspec filesystem offers (:class:`Backend`), and what every other backend
class overrides: what its storage can do, and how the few things it does its own way are done.

A backend is bound to one opened filesystem (``backend.fs``) and the store's transfer settings.
Its class attributes say what the family of storage can do; its methods are the hooks the
store and the transfers call (a create-only write, a small object replaced, the checksum an
upload declares, ranged reads, S3 calls, unfinished multipart uploads). This base is what
fsspec's public API gives any filesystem (``memory://`` and the rest): a local directory,
S3, GCS and Drive are subclasses (:mod:`ckptsync.remote.backends`).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any, ClassVar, Literal

from ckptsync.config import TransferConfig
from ckptsync.transfer import BodyCheck, ObjectCalls, RangeReader
from ckptsync.transfer.ranged import public_ranges

__all__ = ["Backend", "CommitKind", "MultipartUploadInfo"]

CommitKind = Literal["rename", "create-only", "check-then-write"]
"""How a checkpoint becomes visible on the storage (:mod:`ckptsync.remote.visibility`):
``rename`` (a directory: temporary names renamed into place, the manifest hard-linked),
``create-only`` (an object store's conditional write of the manifest), ``check-then-write``
(no create-only write: look, then write)."""

MultipartUploadInfo = Mapping[str, Any]
"""One unfinished multipart upload as S3 lists it (``Key``, ``UploadId``, ``Initiated``)."""


class Backend:
    """Any fsspec filesystem: what its storage can do, and the hooks the store calls.

    Args:
        fs: the opened filesystem.
        config: the store's transfer settings.
        own: the filesystem is this family's own (not a wrapper that only the URL's scheme
            says is of it, such as a caching layer): capabilities that drive the
            filesystem's own calls (a server-side copy, S3's calls) need it.

    Class attributes:
        name: the family, for logs and tests (``s3``, ``gcs``, ``local``, ``gdrive``,
            ``fsspec``).
        extra: the ``ckptsync[...]`` extra that installs its fsspec package, if any.
        commit: how a checkpoint becomes visible (:data:`CommitKind`).
        buckets: an object store: a missing bucket is an error (a missing prefix is just
            empty), and an empty "directory" (SeaweedFS keeps one) holds nothing.
        overwrites: writing an existing name replaces it (Drive keeps two files of one name
            side by side instead, so a file is deleted before it is written again).
        needs_dirs: parent directories must be created before files go in them.
        upload_via_temp: a file being written is visible, so an upload goes to a temporary
            name and is renamed into place (objects in S3, GCS and Drive appear whole).
        max_workers: files transferred at once, where the family has a limit of its own
            (0: the config's ``max_workers``).
        filesystem: the fsspec class (``module:Class``) a URL of this family is opened with
            instead of the one fsspec registers for its protocol (Drive:
            :class:`~ckptsync.remote.gdrive.DriveFileSystem`, which takes a Colab user's
            credentials); None: fsspec's.
        upload_process: its bytes go through a network client that spends CPU per byte, so
            a Checkpointer pushes to it from an upload process by default
            (:mod:`ckptsync.remote.process`); a local copy is cheaper than a second process.
    """

    name: ClassVar[str] = "fsspec"
    extra: ClassVar[str | None] = None
    commit: ClassVar[CommitKind] = "check-then-write"
    buckets: ClassVar[bool] = False
    overwrites: ClassVar[bool] = True
    needs_dirs: ClassVar[bool] = False
    upload_via_temp: ClassVar[bool] = True
    max_workers: ClassVar[int] = 0
    filesystem: ClassVar[str | None] = None
    upload_process: ClassVar[bool] = False

    def __init__(self, fs: Any, config: TransferConfig, *, own: bool = True) -> None:
        self.fs = fs
        self.config = config
        self.own = own
        self.workers = self.max_workers or config.max_workers
        """Files transferred at once."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, workers={self.workers})"

    @classmethod
    def open_options(cls, options: Mapping[str, Any], config: TransferConfig) -> dict[str, Any]:
        """``options`` as this family's filesystem is opened with them: ckptsync's settings
        (timeouts, ...) added where the user did not set them."""
        return dict(options)

    # ------------------------------------------------------------ what the filesystem can do

    @property
    def server_copy(self) -> bool:
        """Unchanged files are copied server-side from the previous checkpoint."""
        return False

    @property
    def parallel_parts(self) -> bool:
        """Large files go up as multipart uploads with parallel parts (:meth:`object_calls`)."""
        return False

    def private_api_failure(self) -> str | None:
        """What private API of its library failed on this filesystem (warned about once; its
        transfers take the public API since), or None."""
        return None

    def bucket_of(self, root: str) -> str | None:
        """The bucket ``root`` lies in, where the storage has buckets."""
        return root.split("/", 1)[0] if self.buckets else None

    # ------------------------------------------------------------ writes of small objects

    def create_only(self, path: str, data: bytes) -> None:
        """Write ``path`` only if it does not exist (:class:`FileExistsError` if it does).

        Here fsspec checks, then writes (``pipe_file(mode="create")``): not atomic against a
        second writer of the same name; unique names make that a rare, benign race (both
        write the same bytes)."""
        self.fs.pipe_file(path, data, mode="create")

    def replace(self, path: str, data: bytes) -> None:
        """Overwrite the small object ``path`` with ``data`` (a hint, a marker)."""
        if not self.overwrites and self.fs.exists(path):
            self.fs.rm_file(path)
        self.fs.pipe_file(path, data)

    def makedirs(self, path: str) -> None:
        """Create directory ``path`` (and its parents) where the storage needs them."""
        if self.needs_dirs:
            self.fs.makedirs(path, exist_ok=True)

    # ------------------------------------------------------------ transfer hooks

    def body_check(self, f: Any, size: int) -> BodyCheck | None:
        """The checksum an upload of ``size`` bytes through ``f`` (just opened for writing)
        declares for the server to check (:class:`~ckptsync.transfer.BodyCheck`); None."""
        return None

    def open_ranges(self, path: str, threads: int) -> AbstractContextManager[RangeReader]:
        """Ranged reads of ``path`` for up to ``threads`` threads (here ``fs.cat_file``)."""
        return public_ranges(self.fs, path)

    def object_calls(self, path: str, connections: int) -> ObjectCalls:
        """The S3 calls on object ``path`` (:class:`~ckptsync.transfer.ObjectCalls`): only
        where :attr:`parallel_parts`."""
        raise NotImplementedError(f"{self.name} has no multipart uploads")

    def forget(self, path: str) -> None:
        """Drop what the filesystem cached about ``path`` (a listing, an object's info)."""
        self.fs.invalidate_cache(path)

    # ------------------------------------------------------------ unfinished uploads

    def multipart_uploads(self, bucket: str) -> list[MultipartUploadInfo]:
        """The unfinished multipart uploads in ``bucket`` (none where there are none)."""
        return []

    def abort_multipart(self, bucket: str, key: str, upload_id: str) -> None:
        """Abort one unfinished multipart upload (only where :meth:`multipart_uploads` lists
        some)."""
        raise NotImplementedError(f"{self.name} has no multipart uploads")
