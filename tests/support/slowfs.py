"""A fault seam for the daemon tests: a local fsspec filesystem whose writes are slow.

``slowfile:///path`` is ``file:///path`` where every write to a file opened for writing first
sleeps ``$CKPTSYNC_TEST_SLOW_WRITE_S`` seconds, so an upload stays in flight long enough to be
killed at a random moment. :func:`register` makes the protocol known to fsspec; the daemon
runs under ``run_daemon.py``, which registers it before starting ``ckptsync watch``.
"""

from __future__ import annotations

import os
import time
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


class SlowLocalFileSystem(LocalFileSystem):
    protocol = ("slowfile",)

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        path = str(path)
        if path.startswith("slowfile://"):
            path = path[len("slowfile://"):]
        return super()._strip_protocol(path)

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


def register() -> None:
    fsspec.register_implementation("slowfile", SlowLocalFileSystem, clobber=True)
