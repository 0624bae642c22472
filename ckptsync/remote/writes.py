"""The store's writes that must not be half done: create-only, and durable replacement.

:meth:`WriteBase._create_only` writes a name only if nothing is there (the commit of a
manifest, the root marker): S3 ``If-None-Match: *``, GCS ``ifGenerationMatch=0``, a hard link
on a local directory; elsewhere (memory, Drive) fsspec checks, then writes.
:meth:`WriteBase._replace` overwrites a small object (``LATEST``, a part marker, the root
marker's keys). On a local directory every write is fsynced before it is renamed or linked
into place.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from ckptsync.atomic import temp_name
from ckptsync.errors import CkptSyncError
from ckptsync.manifest import Manifest
from ckptsync.remote.listing import StoreBase

__all__ = ["ManifestExists", "WriteBase"]


class ManifestExists(CkptSyncError):
    """The create-only write of a manifest (or of the root marker) found one already there."""


class WriteBase(StoreBase):
    """Create-only and durable writes of :class:`~ckptsync.remote.RemoteStore`."""

    # Local directories (backend.local_paths): real paths, so plain os calls. Every fsync
    # goes through self._ops (FileOps, the store's fault seam), so a test can count or fail
    # each step: the fsync of a file right before its os.replace or os.link (uploads, the
    # manifest, the marker, LATEST), the fsync of each directory before the manifest, and of
    # the manifest's directory right after its link.

    def _fsync_file(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            self._ops.fsync(fd)  # the data of every descriptor of the file, this one included
        finally:
            os.close(fd)

    def _durable_rename(self, tmp: str, final: str) -> None:
        """A local upload into place: its bytes on disk first, then the rename (the names
        are made durable by :meth:`_fsync_dirs` before the manifest)."""
        self._fsync_file(tmp)
        os.replace(tmp, final)

    def _fsync_dirs(self, m: Manifest) -> None:
        """Make the names of ``m``'s files (and of its directory) durable: before the
        manifest, or a power cut could leave a manifest listing files that are not there."""
        dirs = {self._path(m.name)} | {
            self._path(m.name, *f.path.split("/")[:-1]) for f in m.files if "/" in f.path}
        for d in sorted(dirs, reverse=True):
            self._ops.fsync_dir(Path(d))
        self._ops.fsync_dir(Path(self.root))

    def _write_synced(self, path: str, data: bytes) -> None:
        """``data`` into the file ``path``, on disk (fsync) before this returns."""
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            self._ops.fsync(f.fileno())

    def _local_replace(self, path: str, data: bytes) -> None:
        tmp = os.path.join(os.path.dirname(path), temp_name(os.path.basename(path)))
        self._write_synced(tmp, data)
        os.replace(tmp, path)

    def _local_create_only(self, path: str, data: bytes) -> None:
        # Write a temporary file, then hard-link it into place: link() fails if the target
        # exists, so this is a true create-only write and readers never see a partial file.
        tmp = os.path.join(os.path.dirname(path), temp_name(os.path.basename(path)))
        self._write_synced(tmp, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise
        except OSError:
            # Some mounts (FUSE, e.g. a mounted Google Drive) have no hard links: fall back to
            # check-then-rename, which is not atomic against a second writer of the same name.
            if os.path.exists(path):
                raise FileExistsError(path) from None
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self._ops.fsync_dir(Path(os.path.dirname(path)))  # the commit itself is durable

    def _create_only(self, path: str, url: str, data: bytes, action: str) -> None:
        """Write ``path`` only if it does not exist yet.

        Raises :class:`ManifestExists` if something is already there.
        """

        def write() -> None:
            try:
                if self.backend.local_paths:
                    self._local_create_only(path, data)
                else:
                    # S3: If-None-Match: * ; GCS: ifGenerationMatch=0 (native create-only).
                    # Other backends (memory, Drive, ...) have no create-only write: fsspec's
                    # pipe_file(mode="create") checks, then writes. Unique names make a second
                    # writer of the same name a rare, benign race (both write the same bytes).
                    self.fs.pipe_file(path, data, mode="create")
            except FileExistsError:  # S3 on moto/AWS, GCS, local, memory
                raise ManifestExists(path) from None
            except OSError as e:
                # SeaweedFS answers 412 without the If-None-Match condition, which s3fs maps
                # to OSError(EINVAL); tell it from a real EINVAL by looking.
                if e.errno == errno.EINVAL and self.backend.native_create_only:
                    self.fs.invalidate_cache(path)
                    if self.fs.exists(path):
                        raise ManifestExists(path) from e
                raise

        self._call(write, url, action)

    def _replace(self, path: str, url: str, data: bytes) -> None:
        """Overwrite the small object ``path`` with ``data`` (a hint or a marker)."""
        def write() -> None:
            if self.backend.local_paths:
                self._local_replace(path, data)
                return
            if not self.backend.overwrites and self.fs.exists(path):
                self.fs.rm_file(path)
            self.fs.pipe_file(path, data)

        self._call(write, url, "write")
