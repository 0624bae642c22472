"""The client API: :class:`Checkpointer`, the one entry point for training code.

Saving, waiting, closing and retention live here; choosing and loading the checkpoint to
resume from is :mod:`ckptsync.client.restore`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from ckptsync.client import ranks
from ckptsync.client.remote_open import KeyArg, open_remote
from ckptsync.client.restore import RestoreInfo, restore_replicated
from ckptsync.client.runinfo import dist_info, git_revision, run_meta, scalars
from ckptsync.client.snapshot import BackgroundWorker, SaveHandle
from ckptsync.client.state import (
    RNG_FILE,
    SnapshotBuffers,
    capture_rng,
    check_safe,
    is_sharded,
    state_of,
    to_jsonable,
)
from ckptsync.client.uploader import SyncStatus, Uploader
from ckptsync.client.writer import local_keys, write_checkpoint
from ckptsync.config import resolve_close_timeout
from ckptsync.errors import CkptSyncError, ConfigError, CorruptCheckpointError, RemoteError
from ckptsync.local import (
    RESUMED_FILE,
    FileOps,
    LocalCheckpoint,
    LocalStore,
    write_json_atomic,
)
from ckptsync.manifest import Manifest, make_name, parse_name
from ckptsync.retention import (
    BestRule,
    CheckpointInfo,
    RetentionPolicy,
    parse_best,
    select_for_deletion,
)

if TYPE_CHECKING:
    from ckptsync.remote import RemoteStore

__all__ = ["Checkpointer", "RestoreInfo", "SyncStatus"]

log = logging.getLogger("ckptsync")

RESERVED = frozenset({"metrics", "extra", "rng", "step", "ckptsync"})


class Checkpointer:
    """Crash-safe, asynchronous checkpoints of a training run, optionally synced to a remote.

    Args:
        directory: local checkpoint directory (created if missing). One directory holds one run.
        remote: optional fsspec URL (``s3://bucket/run``, ``gs://...``, ``gdrive://...``,
            ``file:///mnt/drive/run``). Saves are uploaded in the background; ``restore`` pulls
            the newest valid remote checkpoint when it is newer than the newest local one.
            Default: ``CKPTSYNC_REMOTE`` where set, as for the CLI (else no remote).
        storage_options: passed unchanged to fsspec for ``remote`` (default: the JSON object
            in ``CKPTSYNC_STORAGE_OPTIONS``, else none).
        keep_last, keep_best, keep_every: retention (applied locally and, with a remote,
            remotely). ``keep_best`` is ``"METRIC:min|max:K"`` or a :class:`BestRule`.
        rng: capture and restore python/numpy/torch/CUDA RNG states (default True).
        file_ops: local file system calls (a fault seam for tests).
        remote_store: a ready :class:`~ckptsync.remote.RemoteStore` instead of ``remote``.
        on_remote_error: ``"warn"`` (default): a failing remote never stops training; failures
            are logged, shown by :meth:`status`, and retried with back-off while saves go on
            locally. ``"raise"``: the next ``save``/``wait``/``close`` raises the
            :class:`~ckptsync.errors.RemoteError`.
        close_timeout: how long :meth:`close` and :meth:`wait` wait for a failing or stalled
            remote, in seconds (default ``CKPTSYNC_CLOSE_TIMEOUT``, else 60; ``math.inf``: for
            ever). A healthy upload that is still sending is always waited for.
        encryption_key: encrypt every file before it leaves the machine (AES-256-GCM): 32
            key bytes (raw, hex or base64), or a list for rotation (the first encrypts, each
            restores by key id). Default: ``CKPTSYNC_KEY`` / ``CKPTSYNC_KEY_FILE``, else none.
        encrypt_local: also write the local checkpoint files encrypted (same format, needs a
            key; digests cover the stored bytes, restore decrypts while loading, the upload
            sends them as they are). Default False: local files are plaintext.
        allow_plaintext: with a key (or an encrypted remote run, or ``encrypt_local``), also
            restore checkpoints that are plaintext or carry no keyed manifest MAC (written
            without a key, or by an older ckptsync), each with a warning: for migrating a run.
            Default False: such a checkpoint is invalid, and restore moves on to an encrypted
            one (a bucket writer could have planted it).

    The directory is one run (README, "Security"): its first push starts it on an empty
    remote, :meth:`restore` from a remote continues the remote's; a directory with neither is
    refused as a second writer (:class:`~ckptsync.errors.ConfigError` from the upload).

    Raises:
        LocalStorageError: the directory cannot be created or written.
        ConfigError: a bad retention rule, remote URL, ``on_remote_error`` or ``close_timeout``.

    Example::

        ckpt = Checkpointer("ckpts", remote="s3://bucket/run1", keep_last=3)
        info = ckpt.restore(model=model, optimizer=opt)
        start = info.step + 1 if info else 0
        for step in range(start, steps):
            ...
            if step % 100 == 0:
                ckpt.save(step, model=model, optimizer=opt, metrics={"loss": loss.item()})
        ckpt.close()
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        remote: str | None = None,
        *,
        storage_options: Mapping[str, Any] | None = None,
        keep_last: int | None = None,
        keep_best: str | BestRule | None = None,
        keep_every: int | None = None,
        rng: bool = True,
        file_ops: FileOps | None = None,
        remote_store: RemoteStore | None = None,
        on_remote_error: str = "warn",
        close_timeout: float | None = None,
        encryption_key: KeyArg = None,
        encrypt_local: bool = False,
        allow_plaintext: bool = False,
    ) -> None:
        self.rank, self.world_size = dist_info()
        self._uploader: Uploader | None = None
        self._closed = False
        err: Exception | None = None
        try:
            best = parse_best(keep_best) if isinstance(keep_best, str) else keep_best
            self.policy = RetentionPolicy(keep_last=keep_last, keep_best=best,
                                          keep_every=keep_every)
            self._construct(directory, remote, storage_options, file_ops, remote_store,
                            on_remote_error, close_timeout, encryption_key, encrypt_local,
                            allow_plaintext)
        except Exception as e:
            if self.world_size == 1:
                self._release_lock()
                raise
            err = e
        self.capture_rng = rng
        if self.world_size > 1:
            # Every rank learns how every rank's construction went (the lock and cleanup are
            # rank 0's alone): a rank that constructed while rank 0 failed would otherwise
            # wait at its first save for a rank 0 that never comes.
            try:
                ranks.agree(self.rank, self.world_size, err, None, "create the Checkpointer")
            except BaseException:
                self._release_lock()
                raise
        # Nothing below can fail, so a refused or failed construction (on any rank) leaves no
        # lock and no upload thread behind.
        if self.remote is not None and self.rank == 0:  # rank 0 alone writes, so uploads
            self._uploader = Uploader(self.remote, on_error=on_remote_error,
                                      after_push=self._after_push)

    def _construct(self, directory: str | os.PathLike[str], remote: str | None,
                   storage_options: Mapping[str, Any] | None, file_ops: FileOps | None,
                   remote_store: RemoteStore | None, on_remote_error: str,
                   close_timeout: float | None, encryption_key: KeyArg,
                   encrypt_local: bool, allow_plaintext: bool = False) -> None:
        """This rank's part of ``__init__``: everything that can fail."""
        self.close_timeout = resolve_close_timeout(close_timeout)
        if on_remote_error not in ("warn", "raise"):
            raise ConfigError(f"on_remote_error must be 'warn' or 'raise', got {on_remote_error!r}")
        self.on_remote_error = on_remote_error  # every uploader's (node leaders' too)
        self.store = LocalStore(directory, ops=file_ops)
        self._buffers = SnapshotBuffers()
        self._worker = BackgroundWorker()
        self._retention_lock = threading.Lock()  # the save and the upload thread both apply it
        self._resumed_from: str | None = None
        # The save whose outcome every rank has yet to learn (see _settle); None when none.
        self._dist_pending: Future[Any] | None = None
        self._git = git_revision()
        self.remote: RemoteStore | None = remote_store if remote_store is not None else (
            open_remote(remote, storage_options, self.store.directory, encryption_key,
                        allow_plaintext))
        if self.remote is not None:
            self.remote.bind_run(self.store.directory)  # its pushes are this directory's run
        self.encrypt_local = encrypt_local
        self.allow_plaintext = allow_plaintext
        self.keys = local_keys(encryption_key, encrypt_local, self.remote)
        if self.rank == 0:
            if not self.store.acquire_writer_lock():
                # A second writer's retention would delete the first one's checkpoints under
                # its feet (mid-upload), and its cleanup would take the other's saves.
                raise ConfigError(
                    f"another Checkpointer ({self.store.writer_lock_holder()}) is writing "
                    f"checkpoints in {self.store.directory}; one directory holds one run: "
                    "close() that one first (or let its process end), or use another directory"
                )
            self.store.cleanup()

    def _release_lock(self) -> None:
        if hasattr(self, "store"):
            self.store.release_writer_lock()

    # ------------------------------------------------------------------ save
    def save(
        self,
        step: int | None,
        *,
        metrics: Mapping[str, Any] | None = None,
        extra: Any = None,
        sharded: bool | None = None,
        **objects: Any,
    ) -> SaveHandle[Manifest | None]:
        """Checkpoint ``objects`` at ``step``; returns once tensors are snapshotted to CPU.

        Serialization, hashing, fsync, the local commit and any upload run in the background.
        A save while one is in flight first waits for it. A slow or failing remote never
        blocks or fails a save (unless ``on_remote_error="raise"``): at most one upload runs
        and one waits, the newest replacing the waiting one, and each save while the remote
        cannot keep up logs a warning saying how far behind it is.

        Under ``torch.distributed``, call it on every rank: rank 0 snapshots and writes, and
        ``save`` is collective (the ranks meet once, every rank whether or not it failed), so
        a failure on rank 0 (unsafe state, out of memory) raises on every rank: the same
        ckptsync error class, naming rank 0, or a :class:`CkptSyncError` naming rank 0's
        error; training that catches it on every rank can go on. Rank 0's commit outcome
        reaches every rank at the first, on each rank, of: the handle's ``wait()`` /
        ``result()``, the next ``save``, ``wait()``, ``close()`` or ``restore`` (call them on
        every rank). So every rank's handle returns rank 0's manifest only once the commit is
        durable, and raises on every rank if it failed; on ranks other than 0 ``done()`` stays
        False until then.

        Args:
            step: training step (non-negative int; None for step-less checkpoints).
            metrics: numbers (floats or 0-d tensors) stored in the manifest, used by keep_best.
            extra: JSON-able run arguments/config (a dict or ``argparse.Namespace``).
            sharded: write through ``torch.distributed.checkpoint``, every rank its own files
                (default: when a module or optimizer holds DTensors, as under FSDP2); see
                :mod:`ckptsync.client.sharded`. Returns once staged in CPU memory.
            **objects: objects with ``state_dict()`` (model, optimizer, GradScaler, scheduler,
                your own) or plain dicts of tensors and values.

        Raises:
            UnsafeStateError: a value cannot be stored without unsafe pickling (named).
            CkptSyncError: a previous background save failed (or, with
                ``on_remote_error="raise"``, a previous upload).
        """
        self._check_open()
        bad = RESERVED.intersection(objects)
        if bad:
            raise ConfigError(f"object names {sorted(bad)} are reserved; pick other names")
        if not objects:
            raise ConfigError("save() needs at least one object, e.g. save(step, model=model)")
        self._settle()  # back-pressure: the previous save is committed before buffers are reused
        # ---- sharded state: DCP, every rank writes (ckptsync/client/sharded.py)
        if sharded or (sharded is None and is_sharded(objects)):
            from ckptsync.client.sharded import save_sharded  # imports DCP: only when used

            if self.encrypt_local:
                raise ConfigError("encrypt_local=True does not cover sharded (DCP) checkpoints "
                                  "yet: save them without it, or unsharded")

            # (An upload error of rank 0's uploader is not raised here, on rank 0 alone, where
            # the other ranks would wait in DCP's collectives: wait() raises it on every rank.)
            return save_sharded(self, step, objects, scalars(metrics),
                                to_jsonable(extra) if extra is not None else {})
        name = make_name(step) if self.rank == 0 else ""
        err: Exception | None = None
        rng_state: dict[str, Any] | None = None
        trees: dict[str, Any] = {}
        try:
            if self._uploader is not None:
                self._uploader.raise_error()
                if self._uploader.lagging():
                    log.warning("%s", self._uploader.status().lag())
            metric_values = scalars(metrics)
            extra_json = to_jsonable(extra) if extra is not None else {}
            t0 = time.perf_counter()
            rng_state = capture_rng() if self.capture_rng else None
            if self.rank == 0:
                for obj_name, obj in objects.items():
                    tree = state_of(obj_name, obj)
                    check_safe(tree, obj_name)
                    trees[obj_name] = self._buffers.snapshot(obj_name, tree)
                stall = time.perf_counter() - t0
                meta = self._meta(objects, stall)
        except Exception as e:
            if self.world_size == 1:
                raise
            err = e
        if self.world_size > 1:
            # Every rank joins, failed or not: a failure anywhere raises on every rank, and
            # no rank is left in a collective the others never join.
            shared = ranks.agree(self.rank, self.world_size, err, (rng_state, name),
                                 f"save step {step}")
            rng_all: list[Any] = [r for r, _ in shared]
            name = shared[0][1]
        else:
            rng_all = [rng_state]
        if self.rank != 0:
            future: Future[Manifest | None] = Future()
            self._dist_pending = future
            return SaveHandle(future, name, settle=self._settle)

        if rng_all[0] is not None:
            trees_rng: dict[str, Any] | None = {"world_size": self.world_size, "ranks": rng_all}
        else:
            trees_rng = None

        def job() -> Manifest:
            return self._write(name, step, trees, trees_rng, metric_values, extra_json, meta)

        handle = self._worker.submit(job, name,
                                     settle=self._settle if self.world_size > 1 else None)
        if self.world_size > 1:
            self._dist_pending = handle._future
        return handle  # type: ignore[return-value]

    def _meta(self, objects: Mapping[str, Any], stall: float) -> dict[str, Any]:
        return run_meta(self.world_size, self._git, objects, stall)

    def _write(self, name: str, step: int | None, trees: dict[str, Any],
               rng: dict[str, Any] | None, metrics: dict[str, float], extra: dict[str, Any],
               meta: dict[str, Any]) -> Manifest:
        t0 = time.perf_counter()
        files = dict(trees)
        if rng is not None:
            files[RNG_FILE[:-3]] = rng
        # Only a checkpoint that a healthy remote will push at once is worth streaming.
        streaming = self._uploader is not None and self._uploader.ready_to_stream()
        ckpt, streams = write_checkpoint(
            self.store, name, files, remote=self.remote if streaming else None,
            seal=self.keys if self.encrypt_local else None,
            manifest={"step": step, "metrics": metrics, "meta": meta, "extra": extra})
        manifest = ckpt.manifest
        log.info("saved %s (step %s, %.1f MB) in %.2fs", ckpt.path, step,
                 manifest.total_size / 1e6, time.perf_counter() - t0)
        if self._uploader is not None:
            self._uploader.offer(ckpt, streams)
        self._apply_local_retention()
        return manifest

    def _after_push(self, manifest: Manifest) -> None:
        """In the upload thread, after ``manifest`` was committed remotely: retention."""
        assert self.remote is not None
        if self.policy.active:
            protect = [n for n in (self._resumed_from,) if n]
            self.remote.apply_retention(self.policy, protect=protect)
            self._apply_local_retention()  # the previous upload no longer needs its files

    def _apply_local_retention(self) -> None:
        """Local retention; it spares the checkpoint being uploaded and the one waiting (so
        the disk holds at most what the policy keeps plus those two, whatever the remote
        does) and the one this run resumed from."""
        if not self.policy.active:
            return
        with self._retention_lock:
            # Only usable checkpoints this tool wrote count: a broken one must neither protect
            # itself nor push a good one out (it is left for a human, as remote retention
            # leaves it), and anything else beside them is the user's.
            infos = [CheckpointInfo(c.name, c.step, c.manifest.sort_key(), c.manifest.metrics)
                     for c in self.store.list()
                     if parse_name(c.name) is not None and _usable(self.store, c)]
            # Listed first: a checkpoint committed after the listing is not deleted here.
            protect = self._uploader.protected() if self._uploader is not None else set()
            if self._resumed_from:
                protect.add(self._resumed_from)
            for doomed in select_for_deletion(infos, self.policy, protect=protect):
                self.store.delete(doomed)
                log.info("retention: deleted local checkpoint %s", doomed)

    # ------------------------------------------------------------------ wait / close
    def _settle(self) -> None:
        """Drain the in-flight save. Under torch.distributed, when a save is pending (on every
        rank alike: ``save`` set it on each), this is the collective that shares its outcome:
        rank 0's manifest completes every rank's handle, or its error raises on every rank.
        It runs at the first of the next ``save``, ``wait``, ``close`` or the handle's
        ``wait`` on each rank, so every rank joins it exactly once per save."""
        err: BaseException | None = None
        try:  # rank 0's replicated save; every rank's own sharded one (agreed on every rank)
            self._worker.drain()
        except BaseException as e:
            err = e
        pending, self._dist_pending = self._dist_pending, None
        if pending is None or self.world_size == 1:
            if err is not None:
                raise err
            return
        ranks.share_commit(self.rank, err, pending)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every save is committed locally and (with a remote) remotely.

        The local commit is always waited for. The remote is waited for while its upload
        makes progress; once ``timeout`` seconds (default ``close_timeout``) have passed with
        the remote failing or stalled, ``wait`` stops waiting for it (the upload goes on in the
        background) and returns False. Under ``torch.distributed`` this is collective: call it
        on every rank; every rank returns once every rank is done (True where every uploader
        caught up), and a failure on any rank (a node leader's upload) raises on every rank.

        Returns:
            True when the newest checkpoint is remote (or there is no remote).

        Raises:
            CkptSyncError: a background save failed (or, with ``on_remote_error="raise"``, an
                upload).
        """
        self._settle()
        caught_up = True
        err: Exception | None = None
        try:
            if self._uploader is not None:
                caught_up = self._uploader.wait_idle(self._timeout(timeout))
                self._uploader.raise_error()
                if not caught_up:
                    log.warning("stopped waiting for the remote: %s",
                                self._uploader.status().lag())
        except Exception as e:
            if self.world_size == 1:
                raise
            err = e
        if self.world_size > 1:
            # Every rank's: a node leader's uploader (sharded, several nodes) fails there.
            caught_up = all(ranks.agree(self.rank, self.world_size, err, caught_up,
                                        "sync to the remote"))
        return bool(caught_up)

    def _timeout(self, timeout: float | None) -> float:
        return self.close_timeout if timeout is None else resolve_close_timeout(timeout)

    def close(self, timeout: float | None = None) -> SyncStatus:
        """Commit the last save locally, wait (bounded, as :meth:`wait`) for the remote, then
        stop the background threads. An upload still unfinished is abandoned uncommitted;
        what is not remote is logged as an error, named in the returned status's
        ``not_remote`` (why: ``not_remote_why``), and stays in the local directory
        (``ckptsync push`` uploads it). A node's part of a multi-node checkpoint counts as
        remote only once the whole checkpoint is committed. Idempotent.

        Args:
            timeout: seconds to wait for a failing or stalled remote (default
                ``close_timeout``).

        Returns:
            :meth:`status` after closing.

        Raises:
            CkptSyncError: the last save failed (or, with ``on_remote_error="raise"``, an
                upload).
        """
        if self._closed:
            return self.status()
        try:
            self.wait(timeout)
        finally:
            self._shutdown()
        return self.status()

    def _close_alone(self) -> None:
        """:meth:`close` without its collectives: this rank's own background commit and
        upload (bounded by ``close_timeout``), then its threads and lock."""
        if self._closed:
            return
        pending, self._dist_pending = self._dist_pending, None
        if pending is not None and self.rank != 0:  # no rank will share rank 0's outcome now
            pending.set_exception(CkptSyncError(
                "closed after an error before rank 0's commit outcome reached this rank"))
        try:
            self._worker.drain()
            if self._uploader is not None:
                self._uploader.wait_idle(self.close_timeout)
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        self._closed = True
        self._worker.close()
        if self._uploader is not None:
            self._uploader.close()
        self.store.release_writer_lock()

    def status(self) -> SyncStatus:
        """Where the upload to the remote stands: the newest local and remote checkpoints,
        what is in flight and pending, the last error and how many uploads failed in a row,
        whether the remote is behind, and (after :meth:`close`) what was left off it."""
        if self._uploader is None:
            return SyncStatus()
        return self._uploader.status()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        """Leaving ``with`` normally is :meth:`close`. Leaving it by an exception keeps that
        exception and still finishes what was in flight; under ``torch.distributed`` it joins
        no collective (the other ranks may be anywhere: in a save, in a gradient all-reduce,
        or leaving by the same exception): rank 0 still waits for its own background commit
        and upload (bounded by ``close_timeout``), the other ranks just stop. So a rank that
        raises never hangs or garbles the process group; the others learn of it through your
        own code (or its process ending), and should leave their ``with`` by an exception
        too, since a normal ``close`` is collective and waits for every rank."""
        if exc_type is None:
            self.close()
            return
        try:
            self.close() if self.world_size == 1 else self._close_alone()
        except Exception as e:
            log.error("while closing after an error: %s", e)

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError(f"the checkpointer for {self.store.directory} is closed")

    # ------------------------------------------------------------------ listing
    def list(self) -> list[Manifest]:
        """Committed local checkpoints, oldest first (not verified)."""
        return [c.manifest for c in self.store.list()]

    def latest(self) -> Manifest | None:
        """The newest committed checkpoint, local or (with a remote) remote; not verified."""
        local = self.store.list()
        best = local[-1].manifest if local else None
        if self.remote is not None:
            rm = self.remote.newest_valid()
            if rm is not None and (best is None or rm.sort_key() > best.sort_key()):
                best = rm
        return best

    # ------------------------------------------------------------------ restore
    def restore(
        self, *, map_location: Any = "cpu", name: str | None = None,
        sharded: bool | None = None, **objects: Any
    ) -> RestoreInfo | None:
        """Load the newest usable checkpoint, local or remote, into ``objects``; None when
        there is none.

        Candidates are every committed checkpoint, local and (with a remote) remote, newest
        first; the same step held on both is tried locally first, then remotely. A local one
        is verified (every file's size and digest) before anything is loaded; a remote one is
        pulled, verified while it downloads. A candidate that lists no files or none for an
        object passed here, whose files do not verify, or that ``torch.load(weights_only=True)``
        refuses (nothing in a checkpoint can run code), is skipped for the next newest
        (nothing is loaded from it). When the one loaded is not the newest committed
        checkpoint, restore says so: a WARNING log, a line on stderr, and
        :attr:`RestoreInfo.fell_back` / :attr:`RestoreInfo.skipped`.
        A module's file is memory-mapped (copy-on-write: the checkpoint never changes), not
        read, since ``load_state_dict`` copies its tensors anyway.

        Args:
            map_location: passed to ``torch.load`` (default "cpu": a GPU checkpoint loads on a
                CPU-only machine).
            name: restore this checkpoint instead of the newest (no fallback).
            sharded: load a sharded (DCP) checkpoint through ``torch.distributed.checkpoint``
                into ``objects``, on any world size (default: when they hold DTensors).
            **objects: the objects to load into, by the names they were saved under.

        Raises:
            NoCheckpointError: ``name`` was given and does not exist.
            CorruptCheckpointError: every checkpoint present is unusable (nothing was loaded),
                or ``name`` is.
            ConfigError: an object is in no checkpoint (or, with ``name``, not in that one).
        """
        self._check_open()
        self.wait()
        if self.remote is not None:
            # This directory continues the remote's run: its saves are that run's pushes.
            try:
                self.remote.adopt_run()
            except RemoteError as e:  # the remote's own listing below says what is wrong
                log.warning("cannot read the run of %s: %s", self.remote.url, e)
        # ---- sharded state: DCP, every rank loads its shards (ckptsync/client/sharded.py)
        if sharded or (sharded is None and is_sharded(objects)):
            from ckptsync.client.sharded_restore import restore_sharded  # imports DCP: if used

            sinfo = restore_sharded(self, name, objects)
            if sinfo is not None:
                self._resumed_from = sinfo.name
                if self.rank == 0:
                    write_json_atomic(self.store.directory / RESUMED_FILE,
                                      {"name": sinfo.name, "pid": os.getpid()})
            return sinfo
        info = restore_replicated(self.store, self.remote, self.rank, self.world_size, name,
                                  map_location, objects, rng=self.capture_rng, keys=self.keys,
                                  keep_encrypted=self.encrypt_local,
                                  allow_plaintext=self.allow_plaintext)
        if info is not None:
            self._resumed_from = info.name
        return info


def _usable(store: LocalStore, ckpt: LocalCheckpoint) -> bool:
    """Counts for retention: usable and every file there with its size (no hashing)."""
    try:
        store.verify(ckpt, full=False)
    except CorruptCheckpointError as e:
        log.debug("retention leaves %s alone: %s", ckpt.name, e)
        return False
    return True
