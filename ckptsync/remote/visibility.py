"""How a checkpoint becomes visible on one storage: one class per way, chosen once from the
backend (:func:`visibility_for`). The model is orbax's atomicity classes.

Each answers the same questions, each its own way: how a small object is written only if it
is absent (:meth:`Visibility.create_only`: the manifest, the commit point; the root marker),
how it is replaced (:meth:`Visibility.replace`: ``LATEST``, a part marker), how a file uploaded
under a temporary name goes into place (:meth:`Visibility.place_upload`), what must be durable
before the manifest (:meth:`Visibility.before_manifest`), and whether the storage itself
refuses a second writer of a name (:attr:`Visibility.exclusive`).

- :class:`DirectoryRename`: a local or mounted directory. Every write is fsynced under a
  temporary name, then renamed (or, for a create-only write, hard-linked: ``link()`` fails if
  the target exists) into place; the directories are fsynced before the manifest, so that a
  power cut never leaves a manifest listing files that are not on disk.
- :class:`CreateOnly`: an object store with a conditional write (S3 ``If-None-Match: *``,
  GCS ``ifGenerationMatch=0``); objects appear whole.
- :class:`CheckThenWrite`: storage without a create-only write (Drive, ``memory://``): it
  looks, then writes. Not atomic against a second writer of the same name: unique names make
  that a rare, benign race (both write the same bytes), and a second run in one prefix is
  only warned about.

The multi-node protocol (each node's part, the last one commits) goes over these:
:mod:`ckptsync.remote.nodeparts`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

from ckptsync.atomic import temp_name
from ckptsync.errors import CkptSyncError
from ckptsync.manifest import Manifest
from ckptsync.remote.backends import CommitKind
from ckptsync.remote.location import Location

__all__ = ["CheckThenWrite", "CreateOnly", "DirectoryRename", "ManifestExists", "Visibility",
           "visibility_for"]


class ManifestExists(CkptSyncError):
    """The create-only write of a manifest (or of the root marker) found one already there."""


class Visibility:
    """How a checkpoint becomes visible on the storage of ``at`` (see the module docstring);
    this base writes through the backend (:class:`CreateOnly`, :class:`CheckThenWrite`)."""

    exclusive: ClassVar[bool] = True
    """The storage itself refuses a second create-only write of a name."""

    def __init__(self, at: Location) -> None:
        self.at = at

    def create_only(self, path: str, url: str, data: bytes, action: str) -> None:
        """Write ``path`` only if it does not exist yet (retried, translated).

        Raises:
            ManifestExists: something is already there.
        """
        def write() -> None:
            try:
                self._create_only(path, data)
            except FileExistsError:  # S3 on moto/AWS, GCS, local, memory
                raise ManifestExists(path) from None

        self.at.call(write, url, action)

    def replace(self, path: str, url: str, data: bytes) -> None:
        """Overwrite the small object ``path`` with ``data`` (a hint or a marker)."""
        self.at.call(lambda: self._replace(path, data), url, "write")

    def place_upload(self, tmp: str, final: str) -> None:
        """A file uploaded to the temporary name ``tmp``, into place as ``final``."""
        self.at.fs.mv(tmp, final)

    def before_manifest(self, m: Manifest) -> None:
        """Whatever must be durable before ``m``'s manifest makes it exist (nothing here:
        an object is durable once its upload completed)."""

    def _create_only(self, path: str, data: bytes) -> None:
        self.at.backend.create_only(path, data)

    def _replace(self, path: str, data: bytes) -> None:
        self.at.backend.replace(path, data)


class CreateOnly(Visibility):
    """An object store: the manifest is written with the server's conditional write."""

    exclusive: ClassVar[bool] = True


class CheckThenWrite(Visibility):
    """No create-only write (Drive, ``memory://``): fsspec looks, then writes. A second
    writer of one name is not refused by the storage (see the module docstring)."""

    exclusive: ClassVar[bool] = False


class DirectoryRename(Visibility):
    """A local or mounted directory: real paths, written under temporary names, fsynced,
    renamed or hard-linked into place.

    Every fsync goes through the location's ``ops`` (:class:`~ckptsync.atomic.FileOps`, the
    store's fault seam), so a test can count or fail each step: the fsync of a file right
    before its ``os.replace`` or ``os.link`` (uploads, the manifest, the marker, ``LATEST``),
    the fsync of each directory before the manifest, and of the manifest's directory right
    after its link.
    """

    exclusive: ClassVar[bool] = True

    def place_upload(self, tmp: str, final: str) -> None:
        """Its bytes on disk first, then the rename (the names are made durable by
        :meth:`before_manifest`)."""
        self._fsync_file(tmp)
        os.replace(tmp, final)

    def before_manifest(self, m: Manifest) -> None:
        """Make the names of ``m``'s files (and of its directory) durable: before the
        manifest, or a power cut could leave a manifest listing files that are not there."""
        at = self.at

        def sync() -> None:
            dirs = {at.path(m.name)} | {
                at.path(m.name, *f.path.split("/")[:-1]) for f in m.files if "/" in f.path}
            for d in sorted(dirs, reverse=True):
                at.ops.fsync_dir(Path(d))
            at.ops.fsync_dir(Path(at.root))

        at.call(sync, at.url_of(m.name), "sync")

    def _fsync_file(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            self.at.ops.fsync(fd)  # the data of every descriptor of the file, this one included
        finally:
            os.close(fd)

    def _write_synced(self, path: str, data: bytes) -> None:
        """``data`` into the file ``path``, on disk (fsync) before this returns."""
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            self.at.ops.fsync(f.fileno())

    def _replace(self, path: str, data: bytes) -> None:
        tmp = os.path.join(os.path.dirname(path), temp_name(os.path.basename(path)))
        self._write_synced(tmp, data)
        os.replace(tmp, path)

    def _create_only(self, path: str, data: bytes) -> None:
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
        self.at.ops.fsync_dir(Path(os.path.dirname(path)))  # the commit itself is durable


#: How each kind of backend makes a checkpoint visible (the one place it is chosen).
VISIBILITY: dict[CommitKind, type[Visibility]] = {
    "rename": DirectoryRename,
    "create-only": CreateOnly,
    "check-then-write": CheckThenWrite,
}


def visibility_for(at: Location) -> Visibility:
    """The way a checkpoint becomes visible at ``at``, chosen from its backend."""
    return VISIBILITY[at.backend.commit](at)
