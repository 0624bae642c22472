"""Lightning: a ``CheckpointIO`` plugin that saves atomically and uploads in the background.

Example::

    from ckptsync.integrations.lightning import CkptSyncCheckpointIO

    io = CkptSyncCheckpointIO("s3://bucket/run1")
    io.pull_latest("ckpts")              # a fresh machine: bring back the newest last.ckpt
    trainer = pl.Trainer(plugins=[io],
                         callbacks=[ModelCheckpoint(dirpath="ckpts", save_last=True)])
    trainer.fit(model, ckpt_path="last")

Remote layout: the ``lightning`` preset's (:func:`ckptsync.zerocode.presets.preset_rule`), one
zero-code checkpoint per saved ``.ckpt`` file: its manifest's step is the checkpoint's
``global_step`` and its one file sits at its path relative to the checkpoint directory, so
``ckptsync pull REMOTE ckpts`` restores it where Lightning resumes from, exactly as for a
remote that ``ckptsync watch ckpts REMOTE --preset lightning`` filled.

Each save writes the dict Lightning hands with ``torch.save`` (plain Lightning loads it) into
a private spool checkpoint inside the checkpoint directory, hashing while writing, fsyncs it,
commits it, and hard-links it into place with a rename: the file appears whole or not at all,
its bytes are written once. A background thread pushes the spool checkpoints (the newest
version of a file supersedes a queued older one) and then retires, remotely, the versions a
newer one replaced and those of files Lightning deleted (``save_top_k``). Only ckptsync
checkpoints of this rule are ever deleted, never the newest one, nor the one this process
resumed from.

Lightning itself is imported lazily (``lightning``, else ``pytorch_lightning``): importing
this module does not import it, and a missing framework is a :class:`ConfigError` naming the
``ckptsync[lightning]`` extra.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

from ckptsync.atomic import FileOps, link_into_place
from ckptsync.config import (
    ENV_PREFIX,
    remote_from_env,
    resolve_close_timeout,
    storage_options_from_env,
)
from ckptsync.errors import (
    CkptSyncError,
    ConfigError,
    CorruptCheckpointError,
    NoCheckpointError,
)
from ckptsync.local import PRIVATE_PREFIX, LocalCheckpoint, LocalStore, storage_error
from ckptsync.manifest import Manifest, make_name
from ckptsync.remote import RemoteStore
from ckptsync.transfer import backoff
from ckptsync.zerocode.contentstep import torch_save_step
from ckptsync.zerocode.presets import preset_rule
from ckptsync.zerocode.restore import restore_watched
from ckptsync.zerocode.rules import WATCHED, is_watched

__all__ = ["RULE", "CkptSyncCheckpointIO", "pull_latest"]

log = logging.getLogger("ckptsync.lightning")

#: The watch rule every uploaded ``.ckpt`` is a version of (the ``lightning`` preset).
RULE = preset_rule("lightning")
SPOOL_DIR = f"{PRIVATE_PREFIX}lightning"
DEFAULT_TEARDOWN_TIMEOUT = 600.0
_CLOSE_ENV = f"{ENV_PREFIX}CLOSE_TIMEOUT"
_BASES = ("lightning.fabric.plugins", "lightning_fabric.plugins")


def _register() -> None:
    """Make :class:`CkptSyncCheckpointIO` a ``CheckpointIO`` of every Lightning namespace
    installed (``CheckpointIO`` is an ABC: a virtual subclass passes Lightning's
    ``isinstance`` checks without importing Lightning at module import)."""
    import importlib

    found = False
    for mod in _BASES:
        try:
            base = importlib.import_module(mod).CheckpointIO
        except ImportError:
            continue
        base.register(CkptSyncCheckpointIO)
        found = True
    if not found:
        raise ConfigError("ckptsync.integrations.lightning needs Lightning: pip install "
                          "'ckptsync[lightning]' (or lightning / pytorch_lightning)")


def _pl_load() -> Callable[..., Any]:
    try:
        from lightning.fabric.utilities.cloud_io import _load
    except ImportError:
        from lightning_fabric.utilities.cloud_io import _load
    return _load


def _global_rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    with contextlib.suppress(ValueError):
        return int(os.environ.get("RANK", "0"))
    return 0


def _ours(m: Manifest) -> str | None:
    """The one path of a version of :data:`RULE`, or None for any other checkpoint."""
    paths = m.source.get("paths")
    if is_watched(m) and m.source.get("rule") == RULE and isinstance(paths, list) \
            and len(paths) == 1 and isinstance(paths[0], str):
        return paths[0]
    return None


def _paths(m: Manifest) -> list[str]:
    """The files of a version of :data:`RULE` (one, as this plugin uploads; any number, as
    ``ckptsync watch --preset lightning`` does), [] for any other checkpoint."""
    paths = m.source.get("paths")
    if is_watched(m) and m.source.get("rule") == RULE and isinstance(paths, list) \
            and all(isinstance(p, str) for p in paths):
        return list(paths)
    return []


def _resume_path(m: Manifest, rel: str | None) -> str:
    """The file of version ``m`` to resume from: ``rel``, else a ``last*.ckpt``, else the
    newest by name."""
    paths = _paths(m)
    if rel is not None and rel in paths:
        return rel
    last = [p for p in paths if p.rsplit("/", 1)[-1].startswith("last")]
    return (last or sorted(paths))[-1]


def _pull_file(store: RemoteStore, root: Path, rel: str | None) -> Manifest | None:
    """Restore the newest valid version of ``rel`` (None: of any file of :data:`RULE`) into
    ``root``, unless the local file already holds that step or a newer one. Falls back to
    older versions when the newest does not verify. Returns the version restored (or the
    one the local file matches), None when the remote holds none."""
    versions = [m for m in store.list() if (ps := _paths(m)) and rel in (None, *ps)]
    if not versions:
        return None
    newest = versions[-1]
    local = root / _resume_path(newest, rel)
    if local.is_file():
        step = torch_save_step(local)
        if step is not None and newest.step is not None and step >= newest.step:
            log.info("%s already holds step %d (remote: %d): not pulled", local, step,
                     newest.step)
            return newest
    why = ""
    for m in reversed(versions):
        try:
            restore_watched(store, root, m.name, rules=[RULE])
            return m
        except (CorruptCheckpointError, NoCheckpointError) as e:
            log.warning("remote %s is not usable, trying an older version: %s", m.name, e)
            why = why or f" (the newest: {e})"
    raise NoCheckpointError(f"no valid version of {rel or RULE!r} in {store.url_of()}{why}")


def pull_latest(remote: str, dirpath: str | os.PathLike[str], *,
                storage_options: Mapping[str, Any] | None = None) -> Path | None:
    """Restore the newest checkpoint file the remote holds into ``dirpath``, so that
    ``trainer.fit(model, ckpt_path="last")`` finds it on a fresh machine.

    Call it before ``fit`` (Lightning resolves ``"last"`` by listing ``dirpath``). With
    ``ModelCheckpoint(save_last=True)`` the newest file is ``last.ckpt`` (saved after the
    top-k file of the same step). A local file already at that step or newer is kept.

    Returns:
        The restored (or already present) file, or None when the remote holds none.

    Raises:
        NoCheckpointError: the remote holds versions, none of them valid.
        RemoteError, LocalStorageError: as :func:`ckptsync.zerocode.restore.restore_watched`.

    Example::

        pull_latest("s3://bucket/run1", "ckpts")
        trainer.fit(model, ckpt_path="last")
    """
    root = Path(dirpath).expanduser().absolute()
    m = _pull_file(RemoteStore(remote, storage_options), root, None)
    return None if m is None else root / _resume_path(m, None)


@dataclass
class _Pending:
    ckpt: LocalCheckpoint
    rel: str
    attempts: int = 0
    retry_at: float = 0.0
    error: str = ""


class CkptSyncCheckpointIO:
    """A Lightning ``CheckpointIO``: atomic local ``.ckpt`` files, uploaded in the background.

    Args:
        remote: fsspec URL of the run's remote root (one prefix per run; default
            ``CKPTSYNC_REMOTE``).
        storage_options: fsspec options for ``remote`` (default ``CKPTSYNC_STORAGE_OPTIONS``).
        root: the directory the remote paths are relative to (default: the directory of the
            first checkpoint saved or loaded, i.e. ``ModelCheckpoint``'s ``dirpath``).
        teardown_timeout: seconds :meth:`teardown` waits for the uploads (default
            ``CKPTSYNC_CLOSE_TIMEOUT``, else 600).
        file_ops: local file system calls (a fault seam for tests).

    Raises:
        ConfigError: Lightning is not installed, or no remote is given.

    Example::

        trainer = pl.Trainer(plugins=[CkptSyncCheckpointIO("s3://bucket/run1")], ...)
    """

    def __init__(self, remote: str | None = None, *,
                 storage_options: Mapping[str, Any] | None = None,
                 root: str | os.PathLike[str] | None = None,
                 teardown_timeout: float | None = None,
                 file_ops: FileOps | None = None) -> None:
        _register()
        url = remote if remote is not None else remote_from_env()
        if not url:
            raise ConfigError("CkptSyncCheckpointIO needs a remote: pass remote='s3://bucket/run' "
                              "or set CKPTSYNC_REMOTE")
        options = storage_options if storage_options is not None else storage_options_from_env()
        self.store = RemoteStore(url, options)
        self.root = None if root is None else Path(root).expanduser().absolute()
        if teardown_timeout is None:
            teardown_timeout = (resolve_close_timeout(None) if os.environ.get(_CLOSE_ENV)
                                else DEFAULT_TEARDOWN_TIMEOUT)
        self.teardown_timeout = teardown_timeout
        self._cv = threading.Condition()
        self._queue: deque[_Pending] = deque()
        self._busy: _Pending | None = None
        self._removed: set[str] = set()
        self._protected: set[str] = set()
        self._abort = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_error = ""
        self._spool_store: LocalStore | None = None
        self._ops = file_ops or FileOps()
        self._pushed_any = False

    # ------------------------------------------------------------------ paths
    def _rel(self, path: Path) -> str:
        if self.root is None:
            self.root = path.parent
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            raise ConfigError(
                f"checkpoint {path} is outside {self.root}, the directory ckptsync syncs: pass "
                "CkptSyncCheckpointIO(..., root=DIR) with a DIR that holds every checkpoint "
                "directory") from None

    @property
    def _spool(self) -> LocalStore:
        """The spool (created on first use): checkpoints committed locally, to upload. A
        killed run's unfinished saves are removed, unless another process holds the spool."""
        assert self.root is not None
        if self._spool_store is None or self._spool_store.directory.parent != self.root:
            spool = LocalStore(self.root / SPOOL_DIR, ops=self._ops)
            if spool.acquire_writer_lock():
                spool.cleanup()
            else:
                log.warning("another process (%s) saves Lightning checkpoints into %s with "
                            "ckptsync: both upload to their own remotes, keep them apart",
                            spool.writer_lock_holder(), self.root)
            self._spool_store = spool
        return self._spool_store

    # ------------------------------------------------------------------ CheckpointIO
    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike[str],
                        storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` atomically at ``path`` (``torch.save``), then queue its upload.

        Returns once the file is durable locally; never waits on the network.

        Raises:
            TypeError: ``storage_options`` given (as Lightning's ``TorchCheckpointIO``).
            ConfigError: ``path`` lies outside the synced directory (see ``root``).
            LocalStorageError: the file cannot be written (no space, ...); nothing replaced.
        """
        import torch

        if storage_options is not None:
            raise TypeError("CkptSyncCheckpointIO.save_checkpoint takes no storage_options: "
                            "pass them to CkptSyncCheckpointIO(storage_options=...)")
        dest = Path(path).expanduser().absolute()
        rel = self._rel(dest)
        step = checkpoint.get("global_step")
        step = step if isinstance(step, int) and not isinstance(step, bool) else None
        spool = self._spool
        name = make_name(step)
        staging = spool.staging(name)
        try:
            w = staging.open(rel)
            torch.save(checkpoint, cast(IO[bytes], w))  # hashed while written
            staging.close_file(rel)
            ckpt = staging.commit(Manifest.new(
                step=step, files=staging.entries, name=name,
                source={"kind": WATCHED, "rule": RULE, "paths": [rel]}))
        except BaseException:
            staging.abort()
            raise
        try:
            link_into_place(ckpt.file(rel), dest, self._ops)
        except OSError as e:
            raise storage_error(e, dest, "save checkpoint") from e
        if _global_rank() != 0:  # Lightning saves on global rank 0 only; be safe elsewhere
            spool.delete(name)
            return
        with self._cv:
            self._removed.discard(rel)
            self._queue.append(_Pending(ckpt, rel))
            self._start()
            self._cv.notify_all()

    def load_checkpoint(self, path: str | os.PathLike[str], map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """Load ``path``; when it is missing, first pull its newest valid remote version.

        Raises:
            NoCheckpointError: (a ``FileNotFoundError``) neither local nor remote.
        """
        dest = Path(path).expanduser().absolute()
        if not dest.is_file():
            rel = self._rel(dest)
            assert self.root is not None
            m = _pull_file(self.store, self.root, rel)
            if m is None:
                raise NoCheckpointError(f"checkpoint {dest} is missing, and "
                                        f"{self.store.url_of()} holds no version of {rel}")
            self._protected.add(m.name)
            log.info("pulled %s (step %s) from %s", rel, m.step, self.store.url_of(m.name))
        return dict(_pl_load()(dest, map_location=map_location, weights_only=weights_only))

    def remove_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Delete ``path`` locally; its remote versions are retired after the next upload
        (never the newest checkpoint), and a queued upload of it is dropped."""
        dest = Path(path).expanduser().absolute()
        rel = self._rel(dest)
        dest.unlink(missing_ok=True)
        with self._cv:
            self._removed.add(rel)
            for p in [p for p in self._queue if p.rel == rel]:
                self._queue.remove(p)
                self._drop(p)
            self._cv.notify_all()

    def teardown(self) -> None:
        """Wait (at most ``teardown_timeout``) for the uploads; log an error and warn, naming
        each file, when some are not remote. Never raises: Lightning calls it on the way out
        of a failed run too."""
        missing = self.wait(self.teardown_timeout, raise_error=False)
        self._stop()
        if not missing and self._pushed_any:
            # The run is over and its newest files are remote: the version it resumed from
            # is no longer protected (this run's uploads superseded it).
            self._protected.clear()
            self._retire()
        if missing:
            msg = (f"ckptsync: {len(missing)} checkpoint file(s) under {self.root} are NOT in "
                   f"{self.store.url_of()}: {', '.join(missing)}"
                   + (f" (last error: {self._last_error})" if self._last_error else "")
                   + f"; they stay in {self.root}/{SPOOL_DIR}, and the next run with this "
                   "plugin on this directory uploads them, or run: ckptsync push")
            log.error(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)

    # ------------------------------------------------------------------ public helpers
    def pull_latest(self, dirpath: str | os.PathLike[str]) -> Path | None:
        """:func:`pull_latest` into ``dirpath`` (which becomes ``root`` when unset), and keep
        the version resumed from while this process runs. Call before ``trainer.fit``."""
        root = Path(dirpath).expanduser().absolute()
        if self.root is None:
            self.root = root
        m = _pull_file(self.store, root, None)
        if m is None:
            return None
        self._protected.add(m.name)
        return root / _resume_path(m, None)

    def wait(self, timeout: float | None = None, *, raise_error: bool = True) -> list[str]:
        """Block until every queued upload is committed remotely (or ``timeout``).

        Returns:
            The files not uploaded yet (empty when everything is remote).

        Raises:
            CkptSyncError: some are not uploaded and ``raise_error`` (the message names them
                and the last error).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while self._queue or self._busy is not None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cv.wait(left if left is None else min(left, 1.0))
            missing = [p.rel for p in ([self._busy] if self._busy else []) + list(self._queue)]
        if missing and raise_error:
            raise CkptSyncError(f"not uploaded to {self.store.url_of()} after {timeout}s: "
                                f"{', '.join(missing)}"
                                + (f"; last error: {self._last_error}" if self._last_error
                                   else ""))
        return missing

    # ------------------------------------------------------------------ the uploader
    def _start(self) -> None:
        """Start the upload thread (under ``_cv``); first queue what a previous process left
        in the spool (committed locally, maybe not remotely)."""
        if self._thread is not None and self._thread.is_alive():
            return
        assert self.root is not None
        queued = {p.ckpt.name for p in self._queue}
        for c in reversed(self._spool.list()):
            rel = _ours(c.manifest)
            if c.name in queued or rel is None:
                continue
            if (self.root / rel).is_file():
                self._queue.appendleft(_Pending(c, rel))
            else:  # Lightning deleted the file since: nothing to upload
                self._drop(_Pending(c, rel))
        self._abort.clear()
        self._thread = threading.Thread(target=self._run, name="ckptsync-lightning",
                                        daemon=True)
        self._thread.start()

    def _stop(self) -> None:
        with self._cv:
            self._abort.set()
            self._cv.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        self._thread = None

    def _drop(self, p: _Pending) -> None:
        """Remove ``p``'s spool checkpoint (the trainer's hard link to it stays)."""
        try:
            LocalStore(p.ckpt.path.parent).delete(p.ckpt.name)
        except (CkptSyncError, OSError) as e:
            log.warning("could not remove %s from the spool: %s", p.ckpt.path, e)

    def _next(self) -> _Pending | None:
        """The oldest pending upload not waiting for a retry; an older version of a file
        that has a newer one queued is dropped (superseded). Under ``_cv``."""
        now = time.monotonic()
        newest: dict[str, _Pending] = {}
        for p in self._queue:
            newest[p.rel] = p
        for p in [p for p in self._queue if newest[p.rel] is not p]:
            self._queue.remove(p)
            self._drop(p)
        for p in self._queue:
            if p.retry_at <= now:
                self._queue.remove(p)
                return p
        return None

    def _run(self) -> None:
        while True:
            with self._cv:
                p = None
                while p is None and not self._abort.is_set():
                    p = self._next()
                    if p is None:
                        self._cv.wait(0.5)
                if p is None or self._abort.is_set():
                    if p is not None:
                        self._queue.appendleft(p)  # stays in the spool: the next run's
                    return
                self._busy = p
            try:
                pushed = self.store.push(p.ckpt, stop=self._abort)
            except Exception as e:  # reported, retried: the next scan or a fixed remote may do
                p.attempts += 1
                p.error = f"{type(e).__name__}: {e}"
                self._last_error = f"{p.rel}: {p.error}"
                log.warning("upload of %s to %s failed (attempt %d): %s", p.rel,
                            self.store.url_of(), p.attempts, p.error)
                p.retry_at = time.monotonic() + backoff(p.attempts, 1.0, 60.0)
                if self._abort.is_set():  # stopped mid-upload: never committed; tidy up now
                    with contextlib.suppress(CkptSyncError):
                        self.store.abandon(p.ckpt.name)
                with self._cv:
                    self._busy = None
                    self._queue.appendleft(p)  # kept in the spool: retried, or next run's
                    self._cv.notify_all()
                continue
            log.info("uploaded %s (step %s) as %s", p.rel, pushed.step,
                     self.store.url_of(pushed.name))
            self._drop(p)
            self._pushed_any = True
            self._retire()
            with self._cv:
                self._busy = None
                self._cv.notify_all()

    def _retire(self) -> None:
        """Make the remote follow the local directory: delete each file's versions older
        than its newest one and every version of a file Lightning removed. Only ckptsync
        checkpoints of :data:`RULE`, never the newest checkpoint, nor the one this process
        resumed from. A failure is logged; the next upload tries again."""
        with self._cv:
            removed = set(self._removed)
        try:
            ours = [(m, p) for m in self.store.list() if (p := _ours(m)) is not None]
            if not ours:
                return
            newest = max((m for m, _ in ours), key=Manifest.sort_key).name
            per_path: dict[str, str] = {}
            for m, path in sorted(ours, key=lambda mp: mp[0].sort_key()):
                per_path[path] = m.name
            for m, path in ours:
                if m.name in self._protected or m.name == newest:
                    continue
                if path in removed or per_path[path] != m.name:
                    self.store.delete(m.name)
                    log.info("retired %s (%s) from %s", m.name, path, self.store.url_of())
        except CkptSyncError as e:
            log.warning("could not retire old versions in %s (retried after the next upload):"
                        " %s", self.store.url_of(), e)
