"""Opening the :class:`Checkpointer`'s remote store: URL, storage options and keys, each from
its argument or, where not given, from the environment (as the CLI does)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptsync.config import remote_from_env, storage_options_from_env
from ckptsync.crypto import KeyRing

if TYPE_CHECKING:
    from ckptsync.remote import RemoteStore

__all__ = ["KeyArg", "open_remote"]

#: What ``Checkpointer(encryption_key=...)`` takes (see :meth:`KeyRing.of`).
KeyArg = bytes | str | Iterable[bytes | str] | KeyRing | None


def open_remote(remote: str | None, storage_options: Mapping[str, Any] | None,
                directory: Path, encryption_key: KeyArg,
                allow_plaintext: bool = False) -> RemoteStore | None:
    """The store for ``remote`` (default ``CKPTSYNC_REMOTE``), or None without one.

    Keys: ``encryption_key`` (bytes or hex/base64 text, or a list for rotation: the first
    encrypts new checkpoints, each decrypts by key id), else ``CKPTSYNC_KEY`` /
    ``CKPTSYNC_KEY_FILE``; none: no encryption. The store pushes as the run of ``directory``
    (:class:`~ckptsync.ownership.RunFile`).

    Raises:
        ConfigError: a bad URL, a remote inside ``directory``, a malformed key.
    """
    if remote is None:
        remote = remote_from_env()
    if remote is None:
        return None
    from ckptsync.ownership import RunFile, check_remote_outside, check_remote_url
    from ckptsync.remote import RemoteStore

    check_remote_outside(check_remote_url(remote, "remote="), directory, "remote=")
    options = storage_options_from_env() if storage_options is None else storage_options
    keys = KeyRing.of(encryption_key) if encryption_key is not None else KeyRing.from_env()
    return RemoteStore(remote, dict(options), keys=keys, run_file=RunFile(directory),
                       allow_plaintext=allow_plaintext)
