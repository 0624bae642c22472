"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP).

DESIGN.md, "Distributed": sharded state (FSDP2 ``fully_shard``, tensor parallel: DTensors)
is written by DCP, each rank its own files, into the one checkpoint's staging directory.
ckptsync adds what DCP lacks: every file's BLAKE3 digest, computed while DCP writes it (DCP's
writer opens its files through a ``FileSystem`` object; ours hands it a
:class:`~ckptsync.hashing.HashingWriter`, so nothing is read back), one manifest listing every
rank's files, and the atomic commit. ``save`` returns once this rank's state is copied into
CPU buffers that DCP's stager reuses from save to save (the stall); the rest runs on
ckptsync's background thread, every collective over a gloo process group of its own (so it
never interleaves with the trainer's collectives on the default group):

1. each node's leader creates the staging directory (rank 0 named the checkpoint);
2. every rank runs ``dcp.save`` into it (DCP's own collectives plan the files; its
   coordinator, rank 0, writes ``.metadata`` after every rank's data files are written);
3. every rank sends rank 0 its files' ``(path, size, digest)``, its RNG state and any error;
4. rank 0 writes ``rng.pt`` and the manifest and commits (fsync, manifest, rename, fsync
   parent), then tells every rank how it went: a failure anywhere is raised on every rank,
   by the handle's ``wait()`` or the next ``save``/``wait``/``close``.

A rank that dies mid-save leaves a staging directory and no manifest: the checkpoint does not
exist, and the next Checkpointer removes the leftover. The manifest marks the checkpoint as
DCP in ``meta["dcp"]``; for ``ckptsync verify``, ``ls`` and the remote it is just files and
digests. ``restore`` (:mod:`ckptsync.client.sharded_restore`) loads through ``dcp.load``
into the caller's (sharded) objects, so a checkpoint saved by N ranks resumes on M: that is
DCP's resharding.

Models and optimizers go through DCP's ``get_state_dict`` helpers (fully-qualified names, so
an optimizer resumes onto another sharding, :mod:`ckptsync.client.dcp_state`); other objects
through their ``state_dict()``. :class:`Sharded` is the Checkpointer's strategy for all this
(:mod:`ckptsync.client.strategy`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import FileSystem, FileSystemWriter
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from ckptsync.client import ranks
from ckptsync.client.dcp_state import DCP_META, dcp_states
from ckptsync.client.nodes import NodeDirectory, Nodes, nodes_of
from ckptsync.client.restore import RestoreInfo
from ckptsync.client.runinfo import run_meta, scalars
from ckptsync.client.snapshot import SaveHandle
from ckptsync.client.state import RNG_FILE, capture_rng, serialize, to_jsonable
from ckptsync.client.strategy import Context
from ckptsync.errors import CkptSyncError, ConfigError
from ckptsync.hashing import HashingWriter, WriteOps
from ckptsync.local import (
    RESUMED_FILE,
    STAGING_PREFIX,
    LocalCheckpoint,
    Staging,
    storage_error,
    write_json_atomic,
)
from ckptsync.manifest import FileEntry, Manifest, make_name
from ckptsync.parts import make_parts, part_of

__all__ = ["Sharded"]

log = logging.getLogger("ckptsync")

# ---------------------------------------------------------------------- hashing DCP's files
class _Stream(io.RawIOBase):
    """What DCP writes a file through: a :class:`HashingWriter` (hashed while written,
    fsynced on close) with the ``fileno``/``tell`` DCP asks for."""

    def __init__(self, w: HashingWriter) -> None:
        super().__init__()
        self.w = w

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        try:
            return self.w.write(b)
        except OSError as e:  # DCP reports it on every rank: name the file and the fix
            raise storage_error(e, self.w.path, "write") from e

    def tell(self) -> int:
        return self.w.size

    def fileno(self) -> int:
        return self.w.fileno()

    def close(self) -> None:
        self.w.close()  # flush + fsync (idempotent)
        super().close()


class _HashingFileSystem(FileSystem):
    """DCP's local ``FileSystem`` whose writes go through :class:`HashingWriter`; records
    each file's manifest entry, relative to ``root``, once it is closed (and fsynced)."""

    def __init__(self, root: Path, ops: WriteOps) -> None:
        self.root = root
        self.ops = ops
        self.entries: dict[str, FileEntry] = {}

    @contextlib.contextmanager
    def create_stream(self, path: Any, mode: str) -> Generator[io.IOBase, None, None]:
        if "w" not in mode:
            with super().create_stream(path, mode) as s:
                yield s
            return
        relpath = Path(path).relative_to(self.root).as_posix()
        try:
            w = HashingWriter(Path(path), self.ops)
        except OSError as e:
            raise storage_error(e, Path(path), "create") from e
        try:
            yield _Stream(w)
            w.close()
        except BaseException:
            w.abort()
            raise
        self.entries[relpath] = w.entry(relpath)

    def rename(self, path: Any, new_path: Any) -> None:
        # DCP writes .metadata as .metadata.tmp, then renames it.
        super().rename(path, new_path)
        old = Path(path).relative_to(self.root).as_posix()
        new = Path(new_path).relative_to(self.root).as_posix()
        entry = self.entries.pop(old)
        self.entries[new] = FileEntry(new, entry.size, entry.algo, entry.digest)


class _Writer(FileSystemWriter):
    def __init__(self, fs: _HashingFileSystem) -> None:
        # sync_files=False: every file is fsynced by its HashingWriter on close (DCP would
        # fall back to a machine-wide os.sync() for a stream without a usable fileno).
        super().__init__(fs.root, sync_files=False, overwrite=False)
        self.fs = fs


# ---------------------------------------------------------------------- the strategy
@dataclass
class _Session:
    """What a checkpointer's sharded saves keep from save to save: the process group of the
    background thread's collectives, DCP's stager (its CPU buffers are reused: keyed by the
    source tensor's storage, so the steady state allocates nothing), and the nodes."""

    group: Any
    stager: DefaultStager
    nodes: Nodes

    def close(self) -> None:
        self.stager.close()
        if self.group is not None and dist.is_initialized():
            with contextlib.suppress(Exception):  # the job may be tearing down already
                dist.destroy_process_group(self.group)


@dataclass(frozen=True)
class _Save:
    step: int | None
    name: str
    objects: list[str]
    kinds: dict[str, str]  # object name -> type name, for the manifest's meta
    metrics: dict[str, float]
    extra: dict[str, Any]
    rng: Any
    stall: float


class Sharded:
    """:class:`~ckptsync.client.strategy.SaveStrategy` of sharded state: every rank writes
    its own files through DCP into the one checkpoint; the restore is
    :func:`ckptsync.client.sharded_restore.restore_sharded`."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.node_dir = NodeDirectory(ctx.store, ctx.rank)
        self._session: _Session | None = None

    def _session_now(self) -> _Session:
        """Collective the first time (every rank is in ``save``): this checkpointer's
        session, closed with its background worker."""
        if self._session is None:
            ctx = self.ctx
            # The background thread's collectives need a group of their own: on the default
            # one they would interleave with the trainer's (FSDP's all-gathers) in another
            # order on each rank. Gloo: DCP's collectives are on CPU objects whatever the
            # devices.
            group = (dist.new_group(backend="gloo")
                     if dist.is_available() and dist.is_initialized() else None)
            cuda = torch.cuda.is_available()
            # Pinned buffers where there is a GPU; a blocking copy, so every device the state
            # lives on has finished copying before save returns.
            stager = DefaultStager(StagingOptions(use_pinned_memory=cuda,
                                                  use_shared_memory=False,
                                                  use_async_staging=False,
                                                  use_non_blocking_copy=False))
            self._session = _Session(group, stager,
                                     nodes_of(ctx.store, ctx.rank, ctx.world_size))
            ctx.saves.at_close(self._session.close)
        return self._session

    def save(self, step: int | None, objects: Mapping[str, Any],
             metrics: Mapping[str, Any] | None, extra: Any) -> SaveHandle[Manifest | None]:
        """:meth:`Checkpointer.save` of sharded state; call on every rank. Returns once this
        rank's state is copied into CPU buffers (the stall); DCP writes the files (hashed
        while written), and rank 0 commits, on a background thread. The handle's ``wait()``
        (or the next ``save``, ``wait``, ``close``) returns on every rank only once the
        checkpoint is committed locally (every rank's files durable), or raises on every
        rank.

        Not DCP's ``async_save`` itself: that is this staging (DCP's ``DefaultStager``) plus
        ``dcp.save`` on a thread of its own that ends when DCP is done, while the commit
        (every rank's digests to rank 0, the manifest, the rename, every rank told the
        outcome) must follow on the same thread and group, with ckptsync's back-pressure and
        error delivery.

        On several nodes (:mod:`ckptsync.client.nodes`) each node's leader commits its node's
        part (:mod:`ckptsync.parts`) in its own directory and uploads it; the checkpoint
        exists remotely once every part is there.

        Raises:
            ConfigError: ``encrypt_local`` (not supported for sharded checkpoints yet).
        """
        ctx = self.ctx
        if ctx.encrypt_local:
            raise ConfigError("encrypt_local=True does not cover sharded (DCP) checkpoints "
                              "yet: save them without it, or unsharded")
        # (An upload error of rank 0's uploader is not raised here, on rank 0 alone, where
        # the other ranks would wait in DCP's collectives: wait() raises it on every rank.)
        metric_values = scalars(metrics)
        extra_json = to_jsonable(extra) if extra is not None else {}
        t0 = time.perf_counter()
        sess = self._session_now()
        name: str | None = make_name(step) if ctx.rank == 0 else None
        rng = capture_rng() if ctx.capture_rng else None
        staged: dict[str, Any] = {}
        err: Exception | None = None
        try:
            staged = sess.stager.stage(dcp_states(objects))  # type: ignore[assignment]
        except Exception as e:
            err = e
        stall = time.perf_counter() - t0
        # Every rank joins, staged or not: a rank that failed to stage (out of memory) raises
        # on every rank, and no background job waits for a rank that never starts one.
        name = ranks.agree(ctx.rank, ctx.world_size, err, name,
                           f"stage step {step}'s state in CPU memory")[0]
        assert name is not None
        save = _Save(step, name, sorted(objects), {k: type(v).__name__ for k, v in objects.items()},
                     metric_values, extra_json, rng, stall)
        return ctx.saves.submit(lambda: self._write(sess, staged, save), name, shared=False)

    def restore(self, name: str | None, objects: Mapping[str, Any],
                map_location: Any) -> RestoreInfo | None:
        """:meth:`Checkpointer.restore` of sharded state, on any world size (DCP's
        resharding); ``map_location`` does not apply (DCP loads into the objects' own
        tensors). Rank 0 records the checkpoint resumed from, as a replicated restore does."""
        from ckptsync.client.sharded_restore import restore_sharded

        info = restore_sharded(self.ctx, self.node_dir, name, objects)
        if info is not None and self.ctx.rank == 0:
            write_json_atomic(self.ctx.store.directory / RESUMED_FILE,
                              {"name": info.name, "pid": os.getpid()}, self.ctx.store.ops)
        return info

    def _write(self, sess: _Session, staged: dict[str, Any], s: _Save) -> Manifest | None:
        """The background half of a sharded save, on every rank; every collective over
        ``sess.group``, joined by every rank whether or not it failed.

        1. each node's leader creates the staging directory; every rank learns how it went;
        2. every rank runs ``dcp.save`` into it (DCP's own collectives plan the files; its
           coordinator, rank 0, writes ``.metadata`` after every rank's data files);
        3. every rank sends rank 0 its files' ``(path, size, digest)``, its RNG state, any
           error;
        4. rank 0 writes ``rng.pt`` and the manifests; each node's leader commits; every rank
           learns how it went: a failure anywhere is raised on every rank.
        """
        ctx = self.ctx
        rank, world, nodes, group = ctx.rank, ctx.world_size, sess.nodes, sess.group
        staging = None
        err: BaseException | None = None
        if nodes.leader:
            try:
                self.node_dir.adopt(nodes)
                staging = ctx.store.staging(s.name)
            except Exception as e:
                err = e
        try:
            ranks.agree(rank, world, err, None, "create the checkpoint's staging directory",
                        group)
        except BaseException:
            if staging is not None:
                staging.abort()
            raise
        root = ctx.store.directory / f"{STAGING_PREFIX}{s.name}"
        fs = _HashingFileSystem(root, ctx.store.ops)
        mine: str | None = None
        try:
            # DCP's collectives report a failure on any rank to every rank
            # (CheckpointException). Replicated state (optimizer step counters, param groups,
            # unsharded tensors) is written once, in rank 0's file, not spread over every
            # rank's: the other files hold only their rank's shards, so a resume from the
            # remote pulls, per rank, the files its shards are in plus rank 0's
            # (sharded_restore), not every file.
            dcp.save(staged, storage_writer=_Writer(fs), process_group=group,
                     planner=DefaultSavePlanner(dedup_save_to_lowest_rank=True))
        except CheckpointException as e:  # a BaseException; alike on every rank DCP reached
            mine = "; ".join(f"rank {r}: {ranks.describe(x)}"
                             for r, (x, _) in e.failures.items())
        except Exception as e:
            mine = f"rank {rank}: {ranks.describe(e)}"
        report = (sorted(fs.entries.values(), key=lambda e: e.path), s.rng, mine)
        gathered: list[Any] | None = [None] * world if rank == 0 else None
        try:
            if world > 1:
                dist.gather_object(report, gathered, dst=0, group=group)
            else:
                gathered = [report]
        except BaseException:
            if staging is not None:  # a rank is gone: nothing of this save may stay
                staging.abort()
            raise
        manifests: list[Manifest] | None = None
        failed: str | None = None
        if rank == 0:
            assert gathered is not None and staging is not None
            try:
                manifests = self._manifests(staging, gathered, nodes, s)
            except BaseException as e:
                failed = ranks.describe(e)
        manifests, failed = ranks.from_rank0(world, (manifests, failed), group)
        if failed is not None:  # every rank knows: the same error everywhere, no collective
            if staging is not None:
                staging.abort()
            raise CkptSyncError(f"sharded save of {s.name} failed, nothing was committed: "
                                f"{failed}")
        assert manifests is not None
        committed: LocalCheckpoint | None = None
        if staging is not None:
            try:
                # Every rank's files were fsynced before it reported: the manifest, written by
                # the commit, comes last.
                committed = staging.commit(manifests[nodes.mine])
            except BaseException as e:
                err = e
            finally:
                if committed is None:
                    staging.abort()
        try:
            ranks.agree(rank, world, err, None, "commit its node's part of the checkpoint",
                        group)
        except BaseException:
            if committed is not None:  # another node failed: this part can never be whole
                ctx.store.delete(committed.name)
            raise
        manifest: Manifest | None = manifests[0]
        if committed is not None:
            m = committed.manifest
            log.info("saved sharded %s (step %s, %d ranks, %.1f MB%s)", committed.path, s.step,
                     world, m.total_size / 1e6,
                     "" if nodes.count == 1 else f", part {nodes.mine} of {nodes.count} nodes")
            if nodes.count > 1:  # every node's leader uploads its part
                ctx.sync.start_uploads()
            ctx.sync.committed(committed)
        if manifest is not None and nodes.count > 1:
            part = part_of(manifest)
            manifest = part.whole if part is not None else manifest
        return manifest

    def _manifests(self, staging: Staging, gathered: list[Any], nodes: Nodes,
                   s: _Save) -> list[Manifest]:
        """Rank 0: the manifest each node commits (one node: the whole checkpoint's; several:
        each node's part, :func:`~ckptsync.parts.make_parts`). Writes ``rng.pt`` (node 0)."""
        ctx = self.ctx
        errors = list(dict.fromkeys(g[2] for g in gathered if g[2] is not None))  # deduplicated
        if errors:
            raise CkptSyncError("; ".join(errors))
        by_node: list[list[FileEntry]] = [[] for _ in range(nodes.count)]
        for r, g in enumerate(gathered):
            by_node[nodes.of[r]].extend(g[0])
        if s.rng is not None:
            w = staging.open(RNG_FILE)
            serialize({"world_size": ctx.world_size, "ranks": [g[1] for g in gathered]}, w)
            by_node[0].append(staging.close_file(RNG_FILE))
        meta = run_meta(ctx.world_size, ctx.git, {}, s.stall)  # the save blocked so long
        meta["objects"] = s.kinds
        meta[DCP_META] = {"world_size": ctx.world_size, "objects": s.objects}
        if nodes.count > 1:
            meta[DCP_META]["nodes"] = nodes.count
        whole = Manifest.new(step=s.step, files=[e for files in by_node for e in files],
                             name=s.name, metrics=s.metrics, meta=meta, extra=s.extra)
        return [whole] if nodes.count == 1 else make_parts(whole, by_node)
