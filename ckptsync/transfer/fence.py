"""The fence around a library's private API: :class:`Fence` and :class:`PrivateApiChanged`.

A backend (:mod:`ckptsync.remote.backends`) that calls s3fs's, botocore's or gcsfs's private
API does so inside :meth:`Fence.guard`: an ``AttributeError``, ``TypeError`` or
``ImportError`` there means the library changed. ONE warning per filesystem then names what
failed and the libraries' versions, :class:`PrivateApiChanged` is raised, and from then on
:meth:`Fence.failure` says what failed: that filesystem's transfers take the public fsspec
API (the transfer functions catch :class:`PrivateApiChanged` and go on that way). Other errors
are the backend's own and pass through the guard untouched.

Example::

    S3_FENCE = Fence(("s3fs", "botocore"), "transfers through this filesystem use the public "
                     "fsspec API from now on (large files go slower)")
    with S3_FENCE.guard(fs, "S3FileSystem._call_s3"):
        ...
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import threading
import weakref
from collections.abc import Iterator
from typing import Any

from ckptsync.errors import CkptSyncError

__all__ = ["Fence", "PrivateApiChanged"]

log = logging.getLogger(__name__)

#: What a changed library raises: a name gone (AttributeError, ImportError), a call whose
#: signature changed (TypeError).
CHANGED = (AttributeError, TypeError, ImportError)


class PrivateApiChanged(CkptSyncError):
    """A library no longer has (or no longer takes) a private API ckptsync uses.

    Never reaches the user: the transfer that meets it goes on through the public fsspec API.
    """

    def __init__(self, what: str) -> None:
        super().__init__(f"a library's private API changed: {what}")
        self.what = what


def version(dist: str) -> str:
    """The installed version of ``dist`` (``unknown`` when it is not installed)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class Fence:
    """The filesystems (by identity, not fsspec's token equality) on which the private API
    of ``libraries`` failed, and what failed; an entry goes with its filesystem.

    Args:
        libraries: the distributions whose versions the warning names.
        consequence: what the warning says happens from then on.
        logger: where the one warning per filesystem goes.
    """

    def __init__(self, libraries: tuple[str, ...], consequence: str,
                 logger: logging.Logger = log) -> None:
        self.libraries = libraries
        self.consequence = consequence
        self.log = logger
        self._lock = threading.Lock()
        self._what: dict[int, str] = {}

    def failure(self, fs: Any) -> str | None:
        """What private API failed on ``fs`` (its transfers now use the public API), or None."""
        with self._lock:
            return self._what.get(id(fs))

    def fall_back(self, fs: Any, what: str, why: str) -> bool:
        """Record ``what`` (a sentence: what went wrong) for ``fs`` (``why``: the error, or
        the remedy), warning the first time; True the first time, False after."""
        key = id(fs)
        with self._lock:
            if key in self._what:
                return False
            self._what[key] = what
        # Not weak-referenceable (TypeError): kept for the life of the process.
        with contextlib.suppress(TypeError):
            weakref.finalize(fs, self._forget, key)
        versions = " and ".join(f"{lib} {version(lib)}" for lib in self.libraries)
        self.log.warning("%s (%s: %s); %s", what, versions, why, self.consequence)
        return True

    def _forget(self, key: int) -> None:
        with self._lock:
            self._what.pop(key, None)

    @contextlib.contextmanager
    def guard(self, fs: Any, what: str) -> Iterator[None]:
        """Within the block, ``AttributeError``/``TypeError``/``ImportError`` mean that
        ``what`` changed: warn once for ``fs``, and raise :class:`PrivateApiChanged`."""
        try:
            yield
        except CHANGED as e:
            self.fall_back(fs, f"{what} is missing or no longer works",
                           f"{type(e).__name__}: {e}")
            raise PrivateApiChanged(what) from e
