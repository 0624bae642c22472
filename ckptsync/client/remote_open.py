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

__all__ = ["KeyArg", "fresh_start", "open_remote"]

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


def fresh_start(store: RemoteStore, fresh_ok: bool | None) -> None:
    """Nothing was restored from ``store`` (nor locally): allow the fresh start, or raise.

    A run root that exists (its marker: a first save was pushed) is a fresh start. A prefix
    that holds nothing at all is one only where the user declared it (``fresh_ok``, else
    ``CKPTSYNC_ALLOW_EMPTY=1``): then said on stderr, with the runs beside it, since a typo
    would otherwise train from step 0 under the wrong prefix (DESIGN.md, "Errors").

    Raises:
        NotARunError: the prefix is not a run and a fresh start was not declared.
    """
    import os

    from ckptsync.output import notice
    from ckptsync.remote.runs import RunFinder, not_a_run

    finder = RunFinder.of(store)
    probe = finder.probe()
    if probe.kind == "run":
        return
    if fresh_ok is None:
        fresh_ok = os.environ.get("CKPTSYNC_ALLOW_EMPTY", "").strip().lower() in (
            "1", "true", "yes")
    beside = finder.runs_beside()
    if not fresh_ok:
        under = finder.runs_under() if probe.kind == "foreign" else []
        raise not_a_run(store.url_of(), [] if under else beside,
                        foreign=probe.kind == "foreign", under=under)
    notice(f"ckptsync: starting a new run: {store.url_of()} holds no ckptsync run yet"
           + (f" (runs beside it: {', '.join(beside)})" if beside else ""))
