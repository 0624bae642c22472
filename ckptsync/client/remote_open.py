"""Opening the :class:`Checkpointer`'s remote store: URL, storage options and keys, each from
its argument or, where not given, from the environment (as the CLI does)."""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptsync.config import remote_from_env, storage_options_from_env
from ckptsync.crypto import KeyRing
from ckptsync.errors import ConfigError
from ckptsync.redact import redact_url

if TYPE_CHECKING:
    from ckptsync.remote import RemoteStore
    from ckptsync.remote.process import RemoteSpec

log = logging.getLogger("ckptsync")

__all__ = ["KeyArg", "fresh_start", "open_remote", "remote_spec", "upload_process_spec"]

#: What ``Checkpointer(encryption_key=...)`` takes (see :meth:`KeyRing.of`).
KeyArg = bytes | str | Iterable[bytes | str] | KeyRing | None


def remote_spec(remote: str | None, storage_options: Mapping[str, Any] | None,
                directory: Path, encryption_key: KeyArg,
                allow_plaintext: bool = False) -> RemoteSpec | None:
    """What :func:`open_remote` opens, or None without a remote."""
    if remote is None:
        remote = remote_from_env()
    if remote is None:
        return None
    from ckptsync.ownership import check_remote_outside, check_remote_url
    from ckptsync.remote.process import RemoteSpec

    check_remote_outside(check_remote_url(remote, "remote="), directory, "remote=")
    options = storage_options_from_env() if storage_options is None else storage_options
    keys = KeyRing.of(encryption_key) if encryption_key is not None else KeyRing.from_env()
    return RemoteSpec(remote, dict(options), keys, Path(directory), allow_plaintext)


def open_remote(remote: str | None, storage_options: Mapping[str, Any] | None,
                directory: Path, encryption_key: KeyArg, allow_plaintext: bool = False,
                remote_store: RemoteStore | None = None, upload_process: bool | None = None,
                ) -> tuple[RemoteStore | None, RemoteSpec | None]:
    """The store for ``remote`` (default ``CKPTSYNC_REMOTE``; ``remote_store`` where given),
    or None without one; and the spec its upload process opens its own from, or None where
    uploads run in a thread (:func:`upload_process_spec`).

    Keys: ``encryption_key`` (bytes or hex/base64 text, or a list for rotation: the first
    encrypts new checkpoints, each decrypts by key id), else ``CKPTSYNC_KEY`` /
    ``CKPTSYNC_KEY_FILE``; none: no encryption. The store pushes as the run of ``directory``
    (:class:`~ckptsync.ownership.RunFile`).

    Raises:
        ConfigError: a bad URL, a remote inside ``directory``, a malformed key.
    """
    if remote_store is not None:
        return remote_store, upload_process_spec(upload_process, None, remote_store)
    spec = remote_spec(remote, storage_options, directory, encryption_key, allow_plaintext)
    store = spec.open() if spec is not None else None
    return store, upload_process_spec(upload_process, spec, store)


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


def upload_process_spec(wanted: bool | None, spec: RemoteSpec | None,
                        remote: RemoteStore | None) -> RemoteSpec | None:
    """The spec the upload process opens its store from, or None: uploads in a thread.

    Raises:
        ConfigError: ``upload_process=True`` where no process can open the store.
    """
    from ckptsync.remote.process import upload_nice

    if remote is None or wanted is False:
        return None
    if spec is None:
        if wanted:
            raise ConfigError("upload_process=True needs remote= (a URL the upload process "
                              "opens): a remote_store= lives in this process only")
        return None
    if wanted is None and not remote.at.backend.upload_process:
        return None
    upload_nice()  # a bad CKPTSYNC_UPLOAD_NICE is refused here, not at the first push
    try:
        pickle.dumps(spec)
    except Exception as e:
        why = (f"its storage_options cannot be sent to another process ({type(e).__name__}: "
               f"{e})")
        if wanted:
            raise ConfigError(f"upload_process=True for {redact_url(spec.url)}: {why}; pass "
                              "plain values (strings, numbers, dicts) or "
                              "upload_process=False") from None
        log.info("uploading to %s in a thread of this process: %s", redact_url(spec.url), why)
        return None
    return spec
