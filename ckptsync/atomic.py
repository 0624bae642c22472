"""Temporary names, atomic renames and directory fsyncs: the one seam of every local writer.

Every file ckptsync places whole on a local file system (a state file such as the resume
marker, a file a sharded restore fetches, an upload to a local-directory remote, a Lightning
``.ckpt``, a zero-code pull's journal) is written under a temporary name beside its final one,
fsynced, renamed over the final name, and its directory fsynced: a reader sees the old file or
the new one, never half of one, and a power cut after the rename keeps the new one. (A whole
checkpoint directory is placed the same way by :class:`ckptsync.local.Staging`.) The model
is orbax's ``atomicity``: a temporary path with ``create`` and ``finalize``.

- :func:`temp_name`: the one temporary-name scheme, ``.<name>.<kind>-<8 hex digits>``: hidden,
  unique per writer, and recognisable (:data:`TEMP_NAME`). ``kind`` is ``part`` for the data of
  a transfer (``gc`` collects a stale one from a remote after its grace period), else ``tmp``.
- :class:`FileOps`: every file system call a writer makes (open, write, fsync, mkdir, rename,
  replace, link, directory fsync): the fault seam the crash-order tests inject
  (``tests/support/faults.py``).
- :class:`TempFile`: one file under its temporary name, then :meth:`TempFile.finalize`\\ d
  into place; :func:`write_atomic` and :func:`link_into_place` are its two common uses.

Example::

    with TempFile(Path("out/state.json"), ops) as t:
        t.write(b"{}")               # finalized (fsync, rename, fsync of out/) on leaving
    link_into_place(Path("spool/ckpt/last.ckpt"), Path("out/last.ckpt"), ops)
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import Any, BinaryIO

from ckptsync.hashing import CHUNK, WriteOps

__all__ = ["KINDS", "TEMP_NAME", "FileOps", "TempFile", "link_into_place", "temp_name",
           "write_atomic"]

#: A name :func:`temp_name` made: ``name`` is the final file's name, ``kind`` part or tmp.
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<kind>part|tmp)-[0-9a-f]{8}$")
KINDS = ("part", "tmp")


def temp_name(name: str, kind: str = "tmp") -> str:
    """A fresh temporary name for a file to be renamed to ``name`` in the same directory.

    Raises:
        ValueError: ``kind`` is neither ``"part"`` nor ``"tmp"``.
    """
    if kind not in KINDS:
        raise ValueError(f"temporary-name kind must be one of {KINDS}, got {kind!r}")
    return f".{name}.{kind}-{secrets.token_hex(4)}"


class FileOps(WriteOps):
    """The file system calls ckptsync's local writers make: a :class:`HashingWriter`'s
    (opening, writing, writeback, fsync: :class:`~ckptsync.hashing.WriteOps`), and the
    directory and rename calls that make a file or a checkpoint visible and durable.
    Subclass to record calls or inject faults in tests."""

    def mkdir(self, path: Path) -> None:
        path.mkdir(parents=False, exist_ok=False)

    def rename(self, src: Path, dst: Path) -> None:
        os.rename(src, dst)

    def replace(self, src: Path, dst: Path) -> None:
        """Rename ``src`` over ``dst`` (atomic: ``dst`` is the old file or the new one)."""
        os.replace(src, dst)

    def replace_at(self, src: Path, dst_dir_fd: int, dst_name: str) -> None:
        """Rename ``src`` to ``dst_name`` in the directory open as ``dst_dir_fd``, replacing a
        file there (a rename never follows a symlink in its last component)."""
        os.replace(src, dst_name, dst_dir_fd=dst_dir_fd)

    def link(self, src: Path, dst: Path) -> None:
        """Hard-link ``src`` as ``dst`` (never following a symlink at ``src``)."""
        os.link(src, dst, follow_symlinks=False)

    def fsync_dir(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class TempFile:
    """The file ``final`` being written under a temporary name beside it.

    Fill it with :meth:`write` (or :meth:`link` / :meth:`copy`), then :meth:`finalize`: the
    data is fsynced, renamed over ``final`` and the directory fsynced; or :meth:`abort`: the
    temporary file goes, ``final`` is untouched. As a context manager it finalizes on a
    normal exit and aborts on an exception. Every call goes through ``ops``.

    Raises (each method):
        OSError: as the file system reports it (the caller names the path and the fix).
    """

    def __init__(self, final: Path, ops: FileOps | None = None, *, kind: str = "tmp") -> None:
        self.final = final
        self.ops = ops or FileOps()
        self.path = final.with_name(temp_name(final.name, kind))
        self._f: BinaryIO | None = None
        self._linked = False

    def write(self, data: Any) -> None:
        """Append ``data`` (bytes-like) to the temporary file, creating it on the first call."""
        if self._f is None:
            self._f = self.ops.open_write(self.path)
        rest = memoryview(data).cast("B")
        while len(rest):
            n = self.ops.write(self._f, rest)
            rest = rest[len(rest) if n is None else n:]

    def link(self, src: Path) -> bool:
        """Make the temporary file a hard link to ``src`` (no second write: ``src`` must be
        durable already). False where the file system refuses links (another file system, a
        FUSE mount): :meth:`copy` instead."""
        try:
            self.ops.link(src, self.path)
        except FileNotFoundError:
            raise
        except OSError:
            return False
        self._linked = True
        return True

    def copy(self, src: Path) -> None:
        """Fill the temporary file with a copy of ``src``."""
        with open(src, "rb") as f:
            while chunk := f.read(CHUNK):
                self.write(chunk)
        if self._f is None:  # an empty source
            self.write(b"")

    def finalize(self, *, durable: bool = True) -> Path:
        """Put the file in place. With ``durable`` (the default) its data is fsynced before
        the rename and its directory after it; without, only the rename is atomic."""
        if self._f is not None:
            f, self._f = self._f, None
            try:
                f.flush()
                if durable:
                    self.ops.fsync(f.fileno())
            finally:
                f.close()
        elif not self._linked:
            raise ValueError(f"{self.final}: nothing was written to put in place")
        # Ordering invariant: the data is on disk before the rename makes it the file, and the
        # rename is on disk (the directory's fsync) before this returns.
        self.ops.replace(self.path, self.final)
        if self._linked:  # a rename onto another link of the same file leaves both names
            self.path.unlink(missing_ok=True)
        if durable:
            self.ops.fsync_dir(self.final.parent)
        return self.final

    def abort(self) -> None:
        """Drop the temporary file (never ``final``)."""
        if self._f is not None:
            f, self._f = self._f, None
            f.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> TempFile:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            try:
                self.finalize()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()


def write_atomic(path: Path, data: bytes, ops: FileOps | None = None, *,
                 durable: bool = True) -> None:
    """Replace the file ``path`` with ``data``, whole or not at all (see :class:`TempFile`)."""
    t = TempFile(path, ops)
    try:
        t.write(data)
        t.finalize(durable=durable)
    except BaseException:
        t.abort()
        raise


def link_into_place(src: Path, dest: Path, ops: FileOps | None = None) -> None:
    """Make ``dest`` the file ``src`` (already fsynced), replacing whatever ``dest`` was: a
    hard link (its bytes written once) renamed over ``dest``, else a fsynced copy renamed
    over it; then ``dest``'s directory is fsynced."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    t = TempFile(dest, ops)
    try:
        if not t.link(src):
            t.copy(src)
        t.finalize()
    except BaseException:
        t.abort()
        raise
