"""What S3 and GCS share: :class:`ObjectStore`, an object store with buckets, a native
create-only write and server-side copies, whose objects appear whole."""

from __future__ import annotations

import errno
from typing import ClassVar

from ckptsync.remote.backends.base import Backend, CommitKind

__all__ = ["ObjectStore"]


class ObjectStore(Backend):
    """An object store: buckets, a conditional create-only write, server-side copies."""

    commit: ClassVar[CommitKind] = "create-only"
    buckets: ClassVar[bool] = True
    upload_via_temp: ClassVar[bool] = False
    upload_process: ClassVar[bool] = True

    @property
    def server_copy(self) -> bool:
        # A copy through a filesystem that only the URL says is of this family (a caching
        # wrapper) might be a download and an upload: not worth it.
        return self.own

    def create_only(self, path: str, data: bytes) -> None:
        """The server's conditional write (S3 ``If-None-Match: *``, GCS
        ``ifGenerationMatch=0``): :class:`FileExistsError` if the object is there."""
        try:
            self.fs.pipe_file(path, data, mode="create")
        except OSError as e:
            # SeaweedFS answers 412 without the If-None-Match condition, which s3fs maps to
            # OSError(EINVAL); tell it from a real EINVAL by looking.
            if e.errno == errno.EINVAL:
                self.fs.invalidate_cache(path)
                if self.fs.exists(path):
                    raise FileExistsError(path) from e
            raise
