"""Atomic local checkpoints: staging, fsync, rename, listing, verifying, deleting.

Layout of a local checkpoint directory::

    <directory>/
        .staging-<name>/          being written; never read; removed on start-up
        <name>/ckptsync.json      committed: the manifest is written last, then the rename
        <name>/<files...>

Commit (DESIGN.md, "Local side"): write every file into a hidden staging directory on the same
filesystem, fsync each file, write and fsync the manifest, fsync the staging directory, rename
it into place, fsync the parent. A crash at any instant leaves the previous state or the new
checkpoint, never a half one: readers only look at non-hidden directories holding a manifest.

File system calls go through :class:`~ckptsync.atomic.FileOps` (re-exported here) so that
tests can inject faults (a full disk on the Nth write) without patching this module. Files are
written through a :class:`~ckptsync.hashing.HashingWriter`, which computes the digests the
manifest records; ``HashingWriter``, ``hash_file`` and ``open_verified`` are re-exported from
:mod:`ckptsync.hashing`.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import weakref
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ckptsync.atomic import FileOps, write_atomic
from ckptsync.errors import (
    ConfigError,
    CorruptCheckpointError,
    LocalStorageError,
    ManifestError,
    NoCheckpointError,
)
from ckptsync.hashing import (
    CHUNK,
    WRITEBACK_BYTES,
    HashingWriter,
    hash_file,
    open_verified,
)
from ckptsync.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    WRITE_ALGO,
    FileEntry,
    Manifest,
    check_relpath,
    manifest_too_large,
    parse_name,
    unusable_reason,
)

__all__ = [
    "CHUNK",
    "WRITEBACK_BYTES",
    "FileOps",
    "HashingWriter",
    "LocalCheckpoint",
    "LocalStore",
    "hash_file",
    "open_verified",
]

log = logging.getLogger("ckptsync.local")

STAGING_PREFIX = ".staging-"
TRASH_PREFIX = ".deleting-"
# Written by a Checkpointer that resumed: {"name", "pid"}. The daemon never deletes that
# checkpoint remotely while the pid lives (DESIGN.md, retention).
RESUMED_FILE = ".ckptsync-resumed.json"
# flock'ed by the one Checkpointer writing the directory; holds {"pid", "host", "started"}.
# The daemon has its own lock (.ckptsync-watch/lock): it reads a directory a trainer writes.
WRITER_LOCK = ".ckptsync-writer.lock"
#: Names ckptsync keeps for itself in a watched directory: never a trainer's file.
PRIVATE_PREFIX = ".ckptsync-"
#: The watch daemon's private directory inside the watched directory (spool, status, lock).
WATCH_DIR = f"{PRIVATE_PREFIX}watch"


def write_json_atomic(path: Path, obj: Any, ops: FileOps | None = None, *,
                      durable: bool = True) -> None:
    """Write ``obj`` as JSON at ``path``, whole or not at all (:func:`ckptsync.atomic.
    write_atomic`: temporary name, fsync, rename, directory fsync; without ``durable``, for a
    file rewritten often that a crash may roll back, the rename alone)."""
    write_atomic(path, (json.dumps(obj, indent=1) + "\n").encode(), ops, durable=durable)


def storage_error(e: OSError, path: Path, action: str) -> LocalStorageError:
    if e.errno == errno.ENOSPC or e.errno == errno.EDQUOT:
        hint = "free disk space or point the checkpointer at a larger volume"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "make the directory writable or choose another one"
    else:
        hint = "check the file system"
    return LocalStorageError(e.errno or 0, f"cannot {action} {path}: {e.strerror or e}; {hint}")


@dataclass(frozen=True)
class LocalCheckpoint:
    """A committed local checkpoint: its directory and parsed manifest."""

    path: Path
    manifest: Manifest

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def step(self) -> int | None:
        return self.manifest.step

    def file(self, relpath: str) -> Path:
        return self.path.joinpath(*check_relpath(relpath, where=str(self.path)).split("/"))


class Staging:
    """A checkpoint being written. Files are created with :meth:`open`; :meth:`commit`
    writes the manifest last and renames the directory into place."""

    def __init__(self, store: LocalStore, name: str) -> None:
        self.store = store
        self.name = name
        self.path = store.directory / f"{STAGING_PREFIX}{name}"
        self.entries: list[FileEntry] = []
        self._open: dict[str, HashingWriter] = {}
        try:
            store.ops.mkdir(self.path)
        except OSError as e:
            raise storage_error(e, self.path, "create staging directory") from e

    def open(self, relpath: str, algo: str = WRITE_ALGO) -> HashingWriter:
        """A writer for ``relpath`` inside the checkpoint, hashing with ``algo``; call
        :meth:`close_file`."""
        check_relpath(relpath, where=str(self.path))
        target = self.path.joinpath(*relpath.split("/"))
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            w = HashingWriter(target, self.store.ops, algo)
        except OSError as e:
            raise storage_error(e, target, "create") from e
        self._open[relpath] = w
        return w

    def close_file(self, relpath: str) -> FileEntry:
        w = self._open.pop(relpath)
        try:
            w.close()
        except OSError as e:
            raise storage_error(e, w.path, "write") from e
        entry = w.entry(relpath)
        self.entries.append(entry)
        return entry

    def link_file(self, relpath: str, src: Path) -> Path | None:
        """Hard-link ``src`` as ``relpath`` (no copy: the checkpoint shares ``src``'s inode).

        Returns the link, or None where the file system refuses one (another file system:
        EXDEV; EPERM, EMLINK, no links at all): the caller copies instead. The caller hashes
        the link's content and records it with :meth:`add_entry`.
        """
        check_relpath(relpath, where=str(self.path))
        target = self.path.joinpath(*relpath.split("/"))
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise storage_error(e, target, "create") from e
        try:
            self.store.ops.link(src, target)
        except FileNotFoundError:
            raise  # the source went away: the caller's business, not a refused link
        except OSError as e:
            log.debug("cannot hard-link %s to %s (%s): copying instead", src, target, e)
            return None
        return target

    def add_entry(self, entry: FileEntry) -> FileEntry:
        """Record a file placed by :meth:`link_file`, hashed by the caller."""
        check_relpath(entry.path, where=str(self.path))
        self.entries.append(entry)
        return entry

    def write_file(self, relpath: str, chunks: Any) -> FileEntry:
        """Write an iterable of byte chunks (or one bytes object) as ``relpath``."""
        w = self.open(relpath)
        try:
            if isinstance(chunks, (bytes, bytearray, memoryview)):
                chunks = [chunks]
            for c in chunks:
                w.write(c)
        except OSError as e:
            w.abort()
            self._open.pop(relpath, None)
            raise storage_error(e, w.path, "write") from e
        except BaseException:
            w.abort()
            self._open.pop(relpath, None)
            raise
        return self.close_file(relpath)

    def discard(self, relpath: str) -> None:
        """Forget ``relpath`` (open or closed) and delete its file, so that it can be written
        again (a download that turned out damaged in transit)."""
        w = self._open.pop(relpath, None)
        if w is not None:
            w.abort()
        for e in [e for e in self.entries if e.path == relpath]:
            self.entries.remove(e)  # in place: other threads append their files meanwhile
        self.path.joinpath(*relpath.split("/")).unlink(missing_ok=True)

    def commit(self, manifest: Manifest) -> LocalCheckpoint:
        """Write the manifest last, fsync, rename into place, fsync the parent."""
        if manifest.name != self.name:
            raise ValueError(f"manifest name {manifest.name} != staging name {self.name}")
        ops = self.store.ops
        final = self.store.directory / self.name
        try:
            with HashingWriter(self.path / MANIFEST_NAME, ops) as w:
                w.write(manifest.to_json())
            # Ordering invariant: files fsynced, manifest fsynced, directory fsynced, then the
            # rename makes the checkpoint visible, then the parent's fsync makes it durable.
            ops.fsync_dir(self.path)
            ops.rename(self.path, final)
            ops.fsync_dir(self.store.directory)
        except OSError as e:
            raise storage_error(e, final, "commit checkpoint") from e
        return LocalCheckpoint(final, manifest)

    def abort(self) -> None:
        for w in self._open.values():
            w.abort()
        self._open.clear()
        shutil.rmtree(self.path, ignore_errors=True)


class LocalStore:
    """Committed checkpoints in one local directory.

    Args:
        directory: created if missing. Leftover staging directories from a crash are removed.
        ops: file system calls (a fault seam for tests).

    Raises:
        LocalStorageError: the directory cannot be created or written.
    """

    def __init__(self, directory: str | os.PathLike[str], ops: FileOps | None = None) -> None:
        self.directory = Path(directory).expanduser().absolute()
        self.ops = ops or FileOps()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise storage_error(e, self.directory, "create checkpoint directory") from e
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise LocalStorageError(
                f"checkpoint directory {self.directory} is not writable; "
                "make it writable or choose another one"
            )

    def acquire_writer_lock(self) -> bool:
        """Hold an advisory lock marking this store as the directory's one writer, and write
        who holds it (pid, host, start time) into the lock file for :meth:`writer_lock_holder`.

        Returns False (and takes nothing) if another open store, in this process or another,
        holds it. The lock is released by :meth:`release_writer_lock`, when this store is
        garbage-collected, or when the process ends, however it ends.
        """
        path = self.directory / WRITER_LOCK
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise storage_error(e, path, "create lock file") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            log.warning("cannot lock %s (%s): a second writer in this directory would not be "
                        "refused", path, e.strerror or e)
            return True
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._writer_lock = weakref.finalize(self, os.close, fd)
        return True

    def writer_lock_holder(self) -> str:
        """Who holds the writer lock, as its holder wrote it: ``"pid N on HOST since T"``."""
        try:
            info = json.loads((self.directory / WRITER_LOCK).read_text())
            return f"pid {int(info['pid'])} on {info['host']} since {info['started']}"
        except (OSError, ValueError, TypeError, KeyError):
            return "a process that did not say who it is"

    def claim(self, whose: str = "", fix: str = "close() that one first (or let its process "
              "end), or use another directory") -> None:
        """Become the directory's one writer (:meth:`acquire_writer_lock`), then remove crashed
        saves' leftovers (:meth:`cleanup`). A second writer's retention would delete the first
        one's checkpoints under its feet (mid-upload), and its cleanup would take its saves:
        raises ConfigError naming the holder, the directory (``whose`` it is) and ``fix``."""
        if not self.acquire_writer_lock():
            raise ConfigError(
                f"another Checkpointer ({self.writer_lock_holder()}) is writing checkpoints in "
                f"{self.directory}{whose}; one directory holds one run: {fix}")
        self.cleanup()

    def release_writer_lock(self) -> None:
        release = getattr(self, "_writer_lock", None)
        if release is not None:
            release()  # closes the file: the flock goes with it (once; later calls do nothing)

    def cleanup(self) -> list[str]:
        """Remove leftovers of crashed saves and deletions; return their names.

        Only ckptsync's own: ``.staging-<name>`` and ``.deleting-<name>`` directories (not
        symlinks) whose ``<name>`` parses as a checkpoint name. Only call while holding the
        writer lock: another writer's staging directory is not a leftover.
        """
        removed = []
        for p in self.directory.iterdir():
            if _is_own_leftover(p):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
        if removed:
            log.info("removed %d unfinished checkpoint(s) in %s: %s",
                     len(removed), self.directory, ", ".join(removed))
        return removed

    def staging(self, name: str) -> Staging:
        return Staging(self, name)

    def read_manifest(self, name: str) -> Manifest:
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise NoCheckpointError(f"{name!r} is not a checkpoint name in {self.directory}")
        path = self.directory / name / MANIFEST_NAME
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > MAX_MANIFEST_BYTES:
                    raise manifest_too_large(str(path), size)
                data = f.read(MAX_MANIFEST_BYTES + 1)  # bounded even if it grows meanwhile
        except FileNotFoundError as e:
            raise NoCheckpointError(f"no committed checkpoint at {path.parent}") from e
        m = Manifest.from_json(data, where=str(path))
        if m.name != name:
            raise ManifestError(f"{path}: manifest names {m.name!r}, but lives in {name!r}")
        return m

    def list(self, bad: list[tuple[str, str]] | None = None) -> list[LocalCheckpoint]:
        """Committed checkpoints, oldest first. Unreadable manifests are logged and skipped
        (and, given ``bad``, appended to it as ``(name, problem)``), one deleted while it is
        listed is skipped, and so are symlinks (a checkpoint is a directory of this store,
        never a link to somewhere else that retention could delete through)."""
        out = []
        for p in self.directory.iterdir():
            if p.name.startswith(".") or p.is_symlink() or not (p / MANIFEST_NAME).is_file():
                continue
            try:
                out.append(LocalCheckpoint(p, self.read_manifest(p.name)))
            except NoCheckpointError:
                continue  # deleted since it was listed (say, by a trainer's retention)
            except ManifestError as e:
                log.warning("skipping checkpoint with a bad manifest: %s", e)
                if bad is not None:
                    bad.append((p.name, str(e)))
        out.sort(key=lambda c: c.manifest.sort_key())
        return out

    def get(self, name: str) -> LocalCheckpoint:
        return LocalCheckpoint(self.directory / name, self.read_manifest(name))

    def verify(self, ckpt: LocalCheckpoint, *, full: bool = True) -> None:
        """Check that the checkpoint is usable (:func:`~ckptsync.manifest.unusable_reason`) and
        every listed file exists with its size (and, if ``full``, its digest).

        Raises:
            CorruptCheckpointError: naming the first file that does not match.
        """
        reason = unusable_reason(ckpt.manifest)
        if reason is not None:
            raise CorruptCheckpointError(f"{ckpt.path}: {reason}", path=str(ckpt.path))
        for entry in ckpt.manifest.files:
            path = ckpt.file(entry.path)
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise CorruptCheckpointError(
                    f"{path}: file listed in the manifest is missing", path=str(path)
                ) from None
            if size != entry.size:
                raise CorruptCheckpointError(
                    f"{path}: size {size} != {entry.size} in the manifest (truncated?)",
                    path=str(path),
                )
            if full:
                _, digest = hash_file(path, algo=entry.algo)
                if digest != entry.digest:
                    raise CorruptCheckpointError(
                        f"{path}: {entry.algo} digest does not match the manifest (the file "
                        "was altered)",
                        path=str(path),
                    )

    def delete(self, name: str) -> None:
        """Delete a checkpoint: the manifest first (it stops existing), then the files.

        Raises:
            ManifestError: ``name`` is not a ckptsync checkpoint name, or is a symlink (nothing
                is deleted: ckptsync deletes only what it wrote, never through a link).
        """
        if parse_name(name) is None:
            raise ManifestError(f"refusing to delete {self.directory / name}: {name!r} is not "
                                "a ckptsync checkpoint name, and ckptsync deletes only what it "
                                "wrote")
        path = self.directory / name
        if path.is_symlink():
            raise ManifestError(f"refusing to delete {path}: it is a symlink, not a checkpoint "
                                "directory of this store")
        if not path.exists():
            return
        # Move aside first so a crash midway leaves a hidden leftover, never a half checkpoint.
        trash = self.directory / f"{TRASH_PREFIX}{name}"
        (path / MANIFEST_NAME).unlink(missing_ok=True)
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)


def _is_own_leftover(p: Path) -> bool:
    """A staging or trash directory that ckptsync made: prefix + a checkpoint name."""
    for prefix in (STAGING_PREFIX, TRASH_PREFIX):
        if p.name.startswith(prefix):
            return parse_name(p.name[len(prefix):]) is not None and p.is_dir() \
                and not p.is_symlink()
    return False
