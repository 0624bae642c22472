"""The ckptsync error tree.

Every error a user can meet derives from :class:`CkptSyncError` and says what happened, to
which path, and what to do. Backend (fsspec, OS) exceptions are translated once, at the
boundary that called the backend, and kept as ``__cause__``.
"""

from __future__ import annotations

__all__ = [
    "CkptSyncError",
    "ConfigError",
    "CorruptCheckpointError",
    "EncryptionKeyError",
    "LocalStorageError",
    "ManifestError",
    "NoCheckpointError",
    "RemoteError",
    "UnknownKeyError",
    "UnsafeStateError",
    "UnsupportedFormatError",
]


class CkptSyncError(Exception):
    """Base class of every error raised by ckptsync."""


class ConfigError(CkptSyncError, ValueError):
    """Bad configuration or arguments: an unknown URL scheme, a missing optional package,
    a malformed retention rule."""


class EncryptionKeyError(ConfigError):
    """A checkpoint is encrypted with a key that was not given (a missing or wrong key).

    Never a :class:`CorruptCheckpointError`: restore does not fall back to an older checkpoint
    because of it (that would resume from the wrong place); it raises. ``key_id`` is the
    id the checkpoint needs, ``name`` the checkpoint.
    """

    def __init__(self, message: str, *, key_id: str, name: str) -> None:
        super().__init__(message)
        self.key_id = key_id
        self.name = name


class UnsafeStateError(CkptSyncError, TypeError):
    """State handed to ``save`` that cannot be stored without unsafe pickling.

    Raised at save time, so that it is never discovered at resume.
    """


class CorruptCheckpointError(CkptSyncError):
    """A checkpoint whose files do not match its manifest (missing, truncated, altered)."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class ManifestError(CorruptCheckpointError):
    """A manifest that does not parse or breaks the format's rules (unsafe paths, bad sizes)."""


class UnsupportedFormatError(ManifestError):
    """A manifest written by a newer, incompatible ckptsync (unknown major format)."""


class UnknownKeyError(CorruptCheckpointError):
    """A checkpoint names a key id that no key given has, and nothing authenticated (the
    run's root marker, under a MAC one of the keys verifies) vouches for it: its manifest was
    altered. Skipped like a corrupt checkpoint, so that a bucket writer cannot block every
    restore by forging a key id; when nothing else can be restored, restore raises
    :class:`EncryptionKeyError` naming it. ``key_id`` and ``name`` as there."""

    def __init__(self, message: str, *, path: str | None = None, key_id: str,
                 name: str) -> None:
        super().__init__(message, path=path)
        self.key_id = key_id
        self.name = name


class NoCheckpointError(CkptSyncError, FileNotFoundError):
    """No valid checkpoint where one was required."""


class LocalStorageError(CkptSyncError, OSError):
    """The local filesystem refused a write: no space, no permission, read-only."""


class RemoteError(CkptSyncError):
    """Remote storage failed. ``retryable`` says whether trying again may help; ``denied``
    that the remote refused the credentials or denied access (the CLI's exit 3).

    The backend's exception is kept as ``__cause__``.
    """

    def __init__(self, message: str, *, url: str | None = None, retryable: bool = False,
                 denied: bool = False) -> None:
        super().__init__(message)
        self.url = url
        self.retryable = retryable
        self.denied = denied
