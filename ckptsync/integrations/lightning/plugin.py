"""The Lightning ``CheckpointIO`` plugin: each save is written once, committed in a private
spool, linked into place atomically and uploaded through one transfer queue (the package doc
of :mod:`ckptsync.integrations.lightning` says how)."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any, cast

from ckptsync.atomic import FileOps
from ckptsync.config import (
    ENV_PREFIX,
    remote_from_env,
    resolve_close_timeout,
    storage_options_from_env,
)
from ckptsync.errors import (
    CkptSyncError,
    ConfigError,
    NoCheckpointError,
)
from ckptsync.integrations.lightning.resume import (
    RULE,
    link,
    one_path,
    pull_file,
    pull_resume_set,
)
from ckptsync.local import PRIVATE_PREFIX, LocalCheckpoint, LocalStore
from ckptsync.manifest import MANIFEST_NAME, Manifest, make_name
from ckptsync.remote import RemoteStore
from ckptsync.transfer.queue import Attempt, Transfer, TransferFuture, TransferQueue
from ckptsync.transfer.retry import RetryPolicy
from ckptsync.zerocode.rules import WATCHED

__all__ = ["CkptSyncCheckpointIO"]

log = logging.getLogger("ckptsync.lightning")

SPOOL_DIR = f"{PRIVATE_PREFIX}lightning"
DEFAULT_TEARDOWN_TIMEOUT = 600.0
_CLOSE_ENV = f"{ENV_PREFIX}CLOSE_TIMEOUT"
_BASES = ("lightning.fabric.plugins", "lightning_fabric.plugins")
#: A failed upload is retried after 1, 2, 4, ... seconds, at most a minute apart.
RETRY = RetryPolicy(1.0, 60.0)


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


@dataclass(frozen=True)
class _Upload:
    """One saved version of a file, committed in the spool, to upload."""

    ckpt: LocalCheckpoint
    rel: str


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
        self._lock = threading.Lock()
        self._queue: TransferQueue | None = None  # started by the first upload
        self._removed: set[str] = set()
        self._protected: set[str] = set()
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
        link(self._ops, ckpt.file(rel), dest)
        if _global_rank() != 0:  # Lightning saves on global rank 0 only; be safe elsewhere
            spool.delete(name)
            return
        with self._lock:
            self._removed.discard(rel)
        self._submit(self._started(skip=name), _Upload(ckpt, rel))

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
            m = pull_file(self.store, self.root, rel)
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
        with self._lock:
            self._removed.add(rel)
            q = self._queue
        fut = q.discard(rel) if q is not None else None
        if fut is not None:
            self._drop(fut.transfer.item)

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
        got = pull_resume_set(self.store, root, partial(link, self._ops))
        if got is None:
            return None
        self._protected.update(m.name for m in got[1])
        return got[0]

    def wait(self, timeout: float | None = None, *, raise_error: bool = True) -> list[str]:
        """Block until every queued upload is committed remotely (or ``timeout``).

        Returns:
            The files not uploaded yet (empty when everything is remote).

        Raises:
            CkptSyncError: some are not uploaded and ``raise_error`` (the message names them
                and the last error).
        """
        with self._lock:
            q = self._queue
        missing: list[str] = []
        if q is not None and not q.wait_idle(timeout):
            missing = [f.transfer.item.rel for f in q.running()] + \
                [f.transfer.item.rel for f, _ in q.waiting()]
        if missing and raise_error:
            raise CkptSyncError(f"not uploaded to {self.store.url_of()} after {timeout}s: "
                                f"{', '.join(missing)}"
                                + (f"; last error: {self._last_error}" if self._last_error
                                   else ""))
        return missing

    # ------------------------------------------------------------------ the uploads
    def _started(self, skip: str) -> TransferQueue:
        """The upload queue, started on first use: first queued is what a previous process
        left in the spool (committed locally, maybe not remotely; not ``skip``, the save
        being queued now), oldest first, so that the newest version of each file wins."""
        with self._lock:
            if self._queue is not None:
                return self._queue
            q = self._queue = TransferQueue(1, name="ckptsync-lightning")
        assert self.root is not None
        for c in self._spool.list():
            rel = one_path(c.manifest)
            if rel is None or c.name == skip:
                continue
            if (self.root / rel).is_file():
                self._submit(q, _Upload(c, rel))
            else:  # Lightning deleted the file since: nothing to upload
                self._drop(_Upload(c, rel))
        return q

    def _submit(self, q: TransferQueue, up: _Upload) -> None:
        fut = q.submit(Transfer(up.rel, partial(self._upload, up), name=up.rel,
                                retry=partial(self._retry, up), failed=self._failed, item=up))
        fut.add_done_callback(self._superseded)

    def _stop(self) -> None:
        """Stop the uploads: queued ones stay in the spool (the next run's); one in flight
        is abandoned, never committed."""
        with self._lock:
            q, self._queue = self._queue, None
        if q is not None:
            q.close()
            q.abort()
            q.join()

    def _drop(self, up: _Upload) -> None:
        """Remove ``up``'s spool checkpoint (the trainer's hard link to it stays)."""
        try:
            LocalStore(up.ckpt.path.parent).delete(up.ckpt.name)
        except (CkptSyncError, OSError) as e:
            log.warning("could not remove %s from the spool: %s", up.ckpt.path, e)

    def _superseded(self, fut: TransferFuture[None]) -> None:
        if fut.outcome == "superseded":  # a newer version of the file replaced it
            self._drop(fut.transfer.item)

    def _retry(self, up: _Upload, exc: BaseException) -> RetryPolicy | None:
        """Every error is retried (a later attempt or a fixed remote may succeed), unless
        the spool copy itself is gone: nothing is left to upload."""
        return RETRY if (up.ckpt.path / MANIFEST_NAME).is_file() else None

    def _upload(self, up: _Upload, attempt: Attempt) -> None:
        """One attempt (in the queue's thread); a retry reads the remote first (the last
        attempt may have committed it)."""
        pushed = self.store.push(up.ckpt, stop=attempt.stop)
        log.info("uploaded %s (step %s) as %s", up.rel, pushed.step,
                 self.store.url_of(pushed.name))
        self._drop(up)
        self._pushed_any = True
        self._retire()

    def _failed(self, fut: TransferFuture[None], e: BaseException, delay: float | None) -> None:
        up: _Upload = fut.transfer.item
        error = f"{type(e).__name__}: {e}"
        self._last_error = f"{up.rel}: {error}"
        if delay is None and self._stopping():
            # Stopped mid-upload: never committed; tidy up now (it stays in the spool).
            with contextlib.suppress(CkptSyncError):
                self.store.abandon(up.ckpt.name)
            return
        log.warning("upload of %s to %s failed (attempt %d): %s%s", up.rel,
                    self.store.url_of(), fut.attempts, error,
                    f"; retrying in {delay:.1f}s" if delay is not None else "")

    def _stopping(self) -> bool:
        with self._lock:
            q = self._queue
        return q is None or q.stop.is_set()

    def _retire(self) -> None:
        """Make the remote follow the local directory: delete each file's versions older
        than its newest one and every version of a file Lightning removed. Only ckptsync
        checkpoints of :data:`RULE`, never the newest checkpoint, nor the one this process
        resumed from. A failure is logged; the next upload tries again."""
        with self._lock:
            removed = set(self._removed)
        try:
            ours = [(m, p) for m in self.store.list() if (p := one_path(m)) is not None]
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
