"""Fault seams for the daemon tests: local fsspec filesystems that are slow or that warn.

``slowfile:///path`` is ``file:///path`` where every write to a file opened for writing first
sleeps ``$CKPTSYNC_TEST_SLOW_WRITE_S`` seconds, so an upload stays in flight long enough to be
killed at a random moment. ``warnfile:///path`` is ``file:///path`` whose listings issue
Python warnings as third-party libraries do: watchdog's real duplicate-callback warning and a
long ``RuntimeWarning`` (:data:`LONG_WARNING`). :func:`register` makes the protocols known to
fsspec; the daemon runs under ``run_daemon.py``, which registers them before starting
``ckptsync watch``.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


class _LocalUnderAnotherName(LocalFileSystem):
    """``file://`` under the protocol name of the subclass."""

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        path, prefix = str(path), f"{cls.protocol[0]}://"
        if path.startswith(prefix):
            path = path[len(prefix):]
        return super()._strip_protocol(path)


class SlowLocalFileSystem(_LocalUnderAnotherName):
    protocol = ("slowfile",)

    def _open(self, path: Any, mode: str = "rb", block_size: Any = None, **kwargs: Any) -> Any:
        f = super()._open(path, mode, block_size, **kwargs)
        if "w" in mode or "a" in mode or "x" in mode:
            delay = float(os.environ.get("CKPTSYNC_TEST_SLOW_WRITE_S", "0.02"))
            write = f.write

            def slow_write(data: Any) -> Any:
                time.sleep(delay)
                return write(data)

            f.write = slow_write
        return f


#: The text of the long warning ``warnfile://`` issues (a library's repr of its state).
LONG_WARNING = "a library warning whose text is a long repr: " + "x" * 5000


class _Callback:
    def __call__(self, *args: Any) -> None:
        pass

    def on_watch_deleted(self, wd: Any) -> None:
        pass


def _watchdog_rewatch_warning() -> None:
    """Make watchdog issue its own ``Callback with id ... already exists`` warning: register
    one callback id twice on a private inotify instance, as its recursive walk can."""
    from watchdog.observers.inotify_c import InotifyConstants, InotifyFD

    fd = InotifyFD()
    try:
        with tempfile.TemporaryDirectory() as d:
            for _ in range(2):
                fd.add_callback(os.fsencode(d), InotifyConstants.IN_CREATE, _Callback(), "seam")
    finally:
        fd.close()


class WarningLocalFileSystem(_LocalUnderAnotherName):
    protocol = ("warnfile",)

    def ls(self, path: Any, detail: bool = False, **kwargs: Any) -> Any:
        _watchdog_rewatch_warning()
        warnings.warn(LONG_WARNING, RuntimeWarning, stacklevel=2)
        return super().ls(path, detail=detail, **kwargs)


def register() -> None:
    fsspec.register_implementation("slowfile", SlowLocalFileSystem, clobber=True)
    fsspec.register_implementation("warnfile", WarningLocalFileSystem, clobber=True)
