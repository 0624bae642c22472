"""Files downloaded into a plain directory, not a checkpoint: :class:`FileDrop` (a rank's
sharded restore fetches the files its own load reads, beside other ranks doing the same)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from ckptsync.atomic import temp_name
from ckptsync.hashing import HashingWriter, WriteOps
from ckptsync.local import storage_error
from ckptsync.manifest import WRITE_ALGO, FileEntry

__all__ = ["FileDrop"]


class FileDrop:
    """Where :meth:`~ckptsync.remote.fetch.Fetcher.fetch_files` downloads: the ``open``,
    ``close_file`` and ``discard`` a download task writes through (as a
    :class:`~ckptsync.local.Staging`), each file under a temporary name of its own, renamed
    into place by :meth:`publish` once verified (two processes may fetch one file: each its
    own temporary, the same verified bytes)."""

    def __init__(self, directory: Path, ops: WriteOps) -> None:
        self.directory = directory
        self.ops = ops
        self._open: dict[str, HashingWriter] = {}
        self._lock = threading.Lock()

    def _target(self, relpath: str) -> Path:
        return self.directory.joinpath(*relpath.split("/"))

    def open(self, relpath: str, algo: str = WRITE_ALGO) -> HashingWriter:
        target = self._target(relpath)
        tmp = target.with_name(temp_name(target.name, "part"))
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            w = HashingWriter(tmp, self.ops, algo)
        except OSError as e:
            raise storage_error(e, tmp, "create") from e
        with self._lock:
            self._open[relpath] = w
        return w

    def close_file(self, relpath: str) -> FileEntry:
        w = self._open[relpath]  # kept until published or discarded
        try:
            w.close()
        except OSError as e:
            raise storage_error(e, w.path, "write") from e
        return w.entry(relpath)

    def discard(self, relpath: str) -> None:
        with self._lock:
            w = self._open.pop(relpath, None)
        if w is not None:
            if not w.closed:
                w.abort()
            w.path.unlink(missing_ok=True)

    def publish(self, relpath: str) -> None:
        with self._lock:
            w = self._open.pop(relpath)
        try:
            os.replace(w.path, self._target(relpath))
        except OSError as e:
            raise storage_error(e, self._target(relpath), "rename into place") from e

    def abort(self) -> None:
        for relpath in list(self._open):
            self.discard(relpath)
