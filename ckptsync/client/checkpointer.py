"""The client API: :class:`Checkpointer`, the one entry point for training code.

The Checkpointer composes the parts of a run and picks, in one place (:meth:`_strategy`), how
each save and restore is done: replicated state (:mod:`ckptsync.client.replicated`) or
sharded state through DCP (:mod:`ckptsync.client.sharded`), both behind
:class:`~ckptsync.client.strategy.SaveStrategy`. Its parts: the local store, the remote,
the background saves (:mod:`ckptsync.client.saves`) and what becomes of each committed
checkpoint, uploads and retention (:mod:`ckptsync.client.sync`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ckptsync.client import ranks
from ckptsync.client.remote_open import KeyArg, fresh_start, open_remote
from ckptsync.client.replicated import Replicated
from ckptsync.client.restore import RestoreInfo
from ckptsync.client.runinfo import dist_info, git_revision
from ckptsync.client.saves import Saves
from ckptsync.client.snapshot import SaveHandle
from ckptsync.client.state import is_sharded
from ckptsync.client.strategy import Context, SaveStrategy
from ckptsync.client.sync import RunSync
from ckptsync.client.syncstatus import SyncStatus
from ckptsync.client.writer import local_keys
from ckptsync.config import resolve_close_timeout
from ckptsync.errors import ConfigError, RemoteError
from ckptsync.local import FileOps, LocalStore
from ckptsync.manifest import Manifest
from ckptsync.redact import redact_url
from ckptsync.retention import BestRule, RetentionPolicy, parse_best

if TYPE_CHECKING:
    from ckptsync.client.sharded import Sharded
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
        upload_process: upload from a niced process of its own, off the training loop's GIL
            and CPU (default for s3, gs, gdrive URLs; :mod:`ckptsync.remote.process`).

    The directory is one run (docs/security.md): its first push starts it on an empty
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
        upload_process: bool | None = None,
    ) -> None:
        self.rank, self.world_size = dist_info()
        self._closed = False
        err: Exception | None = None
        try:
            best = parse_best(keep_best) if isinstance(keep_best, str) else keep_best
            self.policy = RetentionPolicy(keep_last=keep_last, keep_best=best,
                                          keep_every=keep_every)
            self._construct(directory, remote, storage_options, file_ops, remote_store,
                            on_remote_error, close_timeout, encryption_key, encrypt_local, rng,
                            allow_plaintext, upload_process)
        except Exception as e:
            if self.world_size == 1:
                self._release_lock()
                raise
            err = e
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
        if self.rank == 0:  # rank 0 alone writes, so uploads (other node leaders: later)
            self._sync.start_uploads()

    def _construct(self, directory: str | os.PathLike[str], remote: str | None,
                   storage_options: Mapping[str, Any] | None, file_ops: FileOps | None,
                   remote_store: RemoteStore | None, on_remote_error: str,
                   close_timeout: float | None, encryption_key: KeyArg, encrypt_local: bool,
                   rng: bool, allow_plaintext: bool, upload_process: bool | None) -> None:
        """This rank's part of ``__init__``: everything that can fail."""
        self.close_timeout = resolve_close_timeout(close_timeout)
        if on_remote_error not in ("warn", "raise"):
            raise ConfigError(f"on_remote_error must be 'warn' or 'raise', got {on_remote_error!r}")
        self.on_remote_error = on_remote_error  # every uploader's (node leaders' too)
        self.store = LocalStore(directory, ops=file_ops)
        self.remote, process_spec = open_remote(remote, storage_options, self.store.directory,
                                                encryption_key, allow_plaintext, remote_store,
                                                upload_process)
        if self.remote is not None:
            self.remote.bind_run(self.store.directory)  # its pushes are this directory's run
        self.encrypt_local = encrypt_local
        self.allow_plaintext = allow_plaintext
        self.keys = local_keys(encryption_key, encrypt_local, self.remote)
        self._saves = Saves(self.rank, self.world_size)
        self._sync = RunSync(self.store, self.remote, self.policy, on_remote_error, process_spec)
        self._ctx = Context(self.rank, self.world_size, self.store, self.remote, self._saves,
                            self._sync, rng, git_revision(), self.keys, encrypt_local,
                            allow_plaintext)
        self._replicated = Replicated(self._ctx)
        self._sharded: Sharded | None = None  # imports DCP: made on first use
        if self.rank == 0:
            self.store.claim()

    def _release_lock(self) -> None:
        if hasattr(self, "store"):
            self.store.release_writer_lock()

    @property
    def capture_rng(self) -> bool:
        """Whether saves capture, and restores restore, the RNG states (``rng=``)."""
        return self._ctx.capture_rng

    def _strategy(self, sharded: bool | None, objects: Mapping[str, Any]) -> SaveStrategy:
        """The one place that picks how a save or restore is done: through DCP, every rank
        its own files, when ``sharded`` says so or (``sharded=None``) when the objects hold
        DTensors; else replicated, rank 0 alone writing."""
        if sharded or (sharded is None and is_sharded(objects)):
            if self._sharded is None:
                from ckptsync.client.sharded import Sharded  # imports DCP: only when used

                self._sharded = Sharded(self._ctx)
            return self._sharded
        return self._replicated

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
        self._saves.settle()  # back-pressure: the previous save is committed first
        return self._strategy(sharded, objects).save(step, objects, metrics, extra)

    # ------------------------------------------------------------------ wait / close
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
        self._saves.settle()
        caught_up = True
        err: Exception | None = None
        try:
            caught_up = self._sync.wait(self._timeout(timeout))
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
        try:
            self._saves.drain_alone()
            self._sync.wait_quietly(self.close_timeout)
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        self._closed = True
        self._saves.close()
        self._sync.close()
        self.store.release_writer_lock()

    def status(self) -> SyncStatus:
        """Where the upload to the remote stands: the newest local and remote checkpoints,
        what is in flight and pending, the last error and how many uploads failed in a row,
        whether the remote is behind, and (after :meth:`close`) what was left off it."""
        return self._sync.status()

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
        sharded: bool | None = None, fresh_ok: bool | None = None, **objects: Any
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
            fresh_ok: with a remote, whether a remote prefix that holds nothing at all may
                start a new run (None is returned, with a warning naming the runs beside it).
                Without it (default: ``CKPTSYNC_ALLOW_EMPTY=1``, else False) such a prefix,
                with no local checkpoint either, raises :class:`NoCheckpointError`: a typo
                in the URL must not train from step 0 under the wrong prefix. A run root
                that exists (its first save wrote its marker) is always a fresh start.
            **objects: the objects to load into, by the names they were saved under.

        Raises:
            NoCheckpointError: ``name`` was given and does not exist; or (not ``fresh_ok``)
                the remote prefix holds nothing at all and no local checkpoint exists
                (:class:`~ckptsync.remote.runs.NotARunError`, naming the runs beside it).
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
        info = self._strategy(sharded, objects).restore(name, objects, map_location)
        if info is not None:
            self._sync.resumed(info)  # retention keeps it while this run lives
        elif self.remote is not None:
            fresh_start(self.remote, fresh_ok)
        return info

    def __repr__(self) -> str:
        """One short line: the directory, the remote (credentials redacted), the newest
        local checkpoint's step."""
        remote = "None" if self.remote is None else repr(redact_url(self.remote.url))
        try:
            local = self.store.list()
            newest = (f"step {local[-1].step}" if local[-1].step is not None
                      else local[-1].name) if local else "none"
        except OSError as e:  # a repr never raises: say why it cannot tell
            newest = f"unknown ({e.strerror or e})"
        closed = ", closed" if self._closed else ""
        return (f"Checkpointer({str(self.store.directory)!r}, remote={remote}, "
                f"newest={newest!r}{closed})")
