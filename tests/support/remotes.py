"""A place a test writes checkpoints to (``Remote``: an fsspec URL plus storage options), as
the conftest's ``*_remote`` fixtures give it, and clearing fsspec's instance caches."""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pytest
from fsspec.core import split_protocol

BACKENDS = ["file", "memory", "seaweedfs", "moto", "gcs", "gdrive", "mounted_drive"]
#: The backends of the ``core`` tier (``make test``): a local directory and a real S3. The
#: others (``memory://``, moto, GCS, Drive, a mounted Drive) run in ``make test-full``
#: (tests/support/tiers.py).
CORE_BACKENDS = ("file", "seaweedfs")


def backend_params(names: list[str]) -> list[Any]:
    """``names`` as fixture or test parameters, each backend outside :data:`CORE_BACKENDS`
    in the ``full`` tier."""
    return [name if name in CORE_BACKENDS else pytest.param(name, marks=pytest.mark.full)
            for name in names]


@dataclass(frozen=True)
class Remote:
    """A place a test may write checkpoints to: an fsspec URL plus its storage options.

    ``wrong_credentials``: storage options that the backend rejects (None where the backend
    does not check credentials). ``missing_url``: a URL in a bucket/folder that does not exist.
    """

    url: str
    storage_options: dict[str, Any]
    name: str
    wrong_credentials: dict[str, Any] | None = None
    missing_url: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def fs(self) -> fsspec.AbstractFileSystem:
        """The fsspec filesystem for this remote, of the class ckptsync opens the URL with
        (Drive: ckptsync's own, :attr:`ckptsync.remote.Backend.filesystem`): fsspec's cached
        instance, so a store opened with the same options shares it, listing cache included."""
        return self._open()[0]

    @property
    def path(self) -> str:
        """The URL as the filesystem's own path (protocol stripped)."""
        return self._open()[1]

    def _open(self) -> tuple[Any, str]:
        from ckptsync.config import TransferConfig
        from ckptsync.remote import choose_backend
        from ckptsync.remote.boundary import open_fs

        scheme = (split_protocol(self.url)[0] or "file").split("::")[-1]
        backend = choose_backend(None, scheme, TransferConfig())
        return open_fs(self.url, self.storage_options, [], backend.filesystem)


def clear_fsspec_caches() -> None:
    """Forget every cached filesystem instance of each backend class the tests use."""
    from fsspec.implementations.local import LocalFileSystem
    from fsspec.implementations.memory import MemoryFileSystem

    classes: list[Any] = [LocalFileSystem, MemoryFileSystem]
    for module, name in (("s3fs", "S3FileSystem"), ("gcsfs", "GCSFileSystem"),
                         ("gdrive_fsspec", "GoogleDriveFileSystem"),
                         ("ckptsync.remote.gdrive", "DriveFileSystem")):
        with contextlib.suppress(ImportError):
            classes.append(getattr(importlib.import_module(module), name))
    for cls in classes:
        cls.clear_instance_cache()
