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
an optimizer resumes onto another sharding); other objects through their ``state_dict()``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import weakref
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import FileSystem, FileSystemWriter
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ckptsync.client import ranks
from ckptsync.client.nodes import Nodes, adopt, ensure_uploader, nodes_of
from ckptsync.client.runinfo import run_meta
from ckptsync.client.snapshot import SaveHandle
from ckptsync.client.state import RNG_FILE, capture_rng, load_into, serialize, unwrap
from ckptsync.errors import CkptSyncError, ConfigError
from ckptsync.hashing import HashingWriter, WriteOps
from ckptsync.local import STAGING_PREFIX, LocalCheckpoint, Staging, storage_error
from ckptsync.manifest import FileEntry, Manifest, make_name
from ckptsync.parts import make_parts, part_of

if TYPE_CHECKING:
    from ckptsync.client.checkpointer import Checkpointer

__all__ = ["DCP_META", "is_dcp", "save_sharded"]

log = logging.getLogger("ckptsync")

DCP_META = "dcp"
"""Key in a manifest's ``meta`` marking a DCP checkpoint: ``{"world_size", "objects"}``."""


def is_dcp(manifest: Manifest | None) -> bool:
    """True for the manifest of a checkpoint written through DCP."""
    return manifest is not None and isinstance(manifest.meta.get(DCP_META), dict)


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
        return self.w._f.fileno()

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


# ---------------------------------------------------------------------- state dicts
def _states(objects: Mapping[str, Any]) -> dict[str, Any]:
    """Each object's state dict in DCP's form: FQN keys for modules and optimizers."""
    modules = [unwrap(o) for o in objects.values() if isinstance(unwrap(o), torch.nn.Module)]
    out: dict[str, Any] = {}
    for name, obj in objects.items():
        target = unwrap(obj)
        if isinstance(target, torch.nn.Module):
            out[name] = get_model_state_dict(target)
        elif isinstance(target, torch.optim.Optimizer):
            out[name] = get_optimizer_state_dict(_model_of(name, modules), target)
        elif hasattr(target, "state_dict") and callable(target.state_dict):
            out[name] = target.state_dict()
        elif isinstance(target, dict):
            out[name] = dict(target)
        else:
            raise ConfigError(f"cannot checkpoint {name!r}: a {type(obj).__name__} has no "
                              "state_dict(); pass a module, optimizer, or dict")
    return out


def _model_of(name: str, modules: list[torch.nn.Module]) -> torch.nn.Module:
    if len(modules) != 1:
        raise ConfigError(
            f"a sharded save or restore of optimizer {name!r} needs exactly one model among the "
            f"objects (DCP keys optimizer state by the model's parameter names); got "
            f"{len(modules)}: pass the model it optimizes, e.g. save(step, model=m, optim=o)")
    return modules[0]


def _load_states(objects: Mapping[str, Any], states: Mapping[str, Any]) -> None:
    modules = [unwrap(o) for o in objects.values() if isinstance(unwrap(o), torch.nn.Module)]
    for name, obj in objects.items():
        target = unwrap(obj)
        if isinstance(target, torch.nn.Module):
            set_model_state_dict(target, states[name])
        elif isinstance(target, torch.optim.Optimizer):
            set_optimizer_state_dict(_model_of(name, modules), target, states[name])
        else:
            load_into(name, obj, states[name])


# ---------------------------------------------------------------------- save
@dataclass
class _Session:
    """What one Checkpointer's sharded saves keep from save to save: the process group of
    the background thread's collectives, DCP's stager (its CPU buffers are reused: keyed by
    the source tensor's storage, so the steady state allocates nothing), and the nodes."""

    group: Any
    stager: DefaultStager
    nodes: Nodes

    def close(self) -> None:
        self.stager.close()
        if self.group is not None and dist.is_initialized():
            with contextlib.suppress(Exception):  # the job may be tearing down already
                dist.destroy_process_group(self.group)


_sessions: weakref.WeakKeyDictionary[Checkpointer, _Session] = weakref.WeakKeyDictionary()


def _session(ckpt: Checkpointer) -> _Session:
    """Collective the first time (every rank is in ``save``): the session of ``ckpt``."""
    sess = _sessions.get(ckpt)
    if sess is None:
        # The background thread's collectives need a group of their own: on the default one
        # they would interleave with the trainer's (FSDP's all-gathers) in another order on
        # each rank. Gloo: DCP's collectives are on CPU objects whatever the devices.
        group = (dist.new_group(backend="gloo")
                 if dist.is_available() and dist.is_initialized() else None)
        cuda = torch.cuda.is_available()
        # Pinned buffers where there is a GPU; a blocking copy, so every device the state
        # lives on has finished copying before save returns.
        stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                              use_async_staging=False,
                                              use_non_blocking_copy=False))
        sess = _Session(group, stager, nodes_of(ckpt))
        _sessions[ckpt] = sess
        ckpt._worker.at_close(sess.close)
    return sess


def _rank0_says(ckpt: Checkpointer, what: Any, group: Any = None) -> Any:
    """Rank 0's ``what`` on every rank."""
    box = [what]
    if ckpt.world_size > 1:
        dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def save_sharded(ckpt: Checkpointer, step: int | None, objects: Mapping[str, Any],
                 metrics: dict[str, float], extra: dict[str, Any]) -> SaveHandle[Manifest | None]:
    """:meth:`Checkpointer.save` of sharded state; call on every rank. Returns once this
    rank's state is copied into CPU buffers (the stall); DCP writes the files (hashed while
    written), and rank 0 commits, on a background thread. The handle's ``wait()`` (or the
    next ``save``, ``wait``, ``close``) returns on every rank only once the checkpoint is
    committed locally (every rank's files durable), or raises on every rank.

    Not DCP's ``async_save`` itself: that is this staging (DCP's ``DefaultStager``) plus
    ``dcp.save`` on a thread of its own that ends when DCP is done, while the commit (every
    rank's digests to rank 0, the manifest, the rename, every rank told the outcome) must
    follow on the same thread and group, with ckptsync's back-pressure and error delivery.

    On several nodes (:mod:`ckptsync.client.nodes`) each node's leader commits its node's
    part (:mod:`ckptsync.parts`) in its own directory and uploads it; the checkpoint exists
    remotely once every part is there.
    """
    t0 = time.perf_counter()
    sess = _session(ckpt)
    name: str | None = make_name(step) if ckpt.rank == 0 else None
    rng = capture_rng() if ckpt.capture_rng else None
    staged: dict[str, Any] = {}
    err: Exception | None = None
    try:
        staged = sess.stager.stage(_states(objects))  # type: ignore[assignment]
    except Exception as e:
        err = e
    stall = time.perf_counter() - t0
    # Every rank joins, staged or not: a rank that failed to stage (out of memory) raises
    # on every rank, and no background job waits for a rank that never starts one.
    name = _agree(ckpt, err, name, f"stage step {step}'s state in CPU memory")[0]
    assert name is not None
    names = sorted(objects)
    kinds = {k: type(v).__name__ for k, v in objects.items()}

    def job() -> Manifest | None:
        return _write(ckpt, sess, staged, _Save(step, name, names, kinds, metrics, extra,
                                                rng, stall))

    return ckpt._worker.submit(job, name)


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


def _write(ckpt: Checkpointer, sess: _Session, staged: dict[str, Any], s: _Save
           ) -> Manifest | None:
    """The background half of a sharded save, on every rank; every collective over
    ``sess.group``, joined by every rank whether or not it failed.

    1. each node's leader creates the staging directory; every rank learns how it went;
    2. every rank runs ``dcp.save`` into it (DCP's own collectives plan the files; its
       coordinator, rank 0, writes ``.metadata`` after every rank's data files);
    3. every rank sends rank 0 its files' ``(path, size, digest)``, its RNG state, any error;
    4. rank 0 writes ``rng.pt`` and the manifests; each node's leader commits; every rank
       learns how it went: a failure anywhere is raised on every rank.
    """
    rank, world, nodes, group = ckpt.rank, ckpt.world_size, sess.nodes, sess.group
    staging = None
    err: BaseException | None = None
    if nodes.leader:
        try:
            adopt(ckpt, nodes)
            staging = ckpt.store.staging(s.name)
        except Exception as e:
            err = e
    try:
        _agree(ckpt, err, None, "create the checkpoint's staging directory", group)
    except BaseException:
        if staging is not None:
            staging.abort()
        raise
    root = ckpt.store.directory / f"{STAGING_PREFIX}{s.name}"
    fs = _HashingFileSystem(root, ckpt.store.ops)
    mine: str | None = None
    try:
        # DCP's collectives report a failure on any rank to every rank (CheckpointException).
        # Replicated state (optimizer step counters, param groups, unsharded tensors) is
        # written once, in rank 0's file, not spread over every rank's: the other files hold
        # only their rank's shards, so a resume from the remote pulls, per rank, the files
        # its shards are in plus rank 0's (sharded_restore), not every file.
        dcp.save(staged, storage_writer=_Writer(fs), process_group=group,
                 planner=DefaultSavePlanner(dedup_save_to_lowest_rank=True))
    except CheckpointException as e:  # a BaseException; alike on every rank DCP reached
        mine = "; ".join(f"rank {r}: {_describe(x)}" for r, (x, _) in e.failures.items())
    except Exception as e:
        mine = f"rank {rank}: {_describe(e)}"
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
            manifests = _manifests(ckpt, staging, gathered, nodes, s)
        except BaseException as e:
            failed = _describe(e)
    manifests, failed = _rank0_says(ckpt, (manifests, failed), group)
    if failed is not None:  # every rank knows: the same error everywhere, no collective
        if staging is not None:
            staging.abort()
        raise CkptSyncError(f"sharded save of {s.name} failed, nothing was committed: {failed}")
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
        _agree(ckpt, err, None, "commit its node's part of the checkpoint", group)
    except BaseException:
        if committed is not None:  # another node failed: this part can never be whole
            ckpt.store.delete(committed.name)
        raise
    manifest: Manifest | None = manifests[0]
    if committed is not None:
        m = committed.manifest
        log.info("saved sharded %s (step %s, %d ranks, %.1f MB%s)", committed.path, s.step,
                 world, m.total_size / 1e6,
                 "" if nodes.count == 1 else f", part {nodes.mine} of {nodes.count} nodes")
        if nodes.count > 1:
            ensure_uploader(ckpt)
        if ckpt._uploader is not None:
            ckpt._uploader.offer(committed, {})
        ckpt._apply_local_retention()
    if manifest is not None and nodes.count > 1:
        part = part_of(manifest)
        manifest = part.whole if part is not None else manifest
    return manifest


def _agree(ckpt: Checkpointer, err: BaseException | None, payload: Any, what: str,
           group: Any = None) -> list[Any]:
    """Every rank's ``payload``; raise ``err`` here and a failure on every other rank (a
    collective over ``group``)."""
    if ckpt.world_size > 1:
        return ranks.agree(ckpt.rank, ckpt.world_size, err, payload, what, group)
    if err is not None:
        raise err
    return [payload]


def _manifests(ckpt: Checkpointer, staging: Staging, gathered: list[Any], nodes: Nodes,
               s: _Save) -> list[Manifest]:
    """Rank 0: the manifest each node commits (one node: the whole checkpoint's; several:
    each node's part, :func:`~ckptsync.parts.make_parts`). Writes ``rng.pt`` (node 0)."""
    errors = list(dict.fromkeys(g[2] for g in gathered if g[2] is not None))  # deduplicated
    if errors:
        raise CkptSyncError("; ".join(errors))
    by_node: list[list[FileEntry]] = [[] for _ in range(nodes.count)]
    for r, g in enumerate(gathered):
        by_node[nodes.of[r]].extend(g[0])
    if s.rng is not None:
        w = staging.open(RNG_FILE)
        serialize({"world_size": ckpt.world_size, "ranks": [g[1] for g in gathered]}, w)
        by_node[0].append(staging.close_file(RNG_FILE))
    meta = run_meta(ckpt.world_size, ckpt._git, {}, s.stall)  # the save blocked so long
    meta["objects"] = s.kinds
    meta[DCP_META] = {"world_size": ckpt.world_size, "objects": s.objects}
    if nodes.count > 1:
        meta[DCP_META]["nodes"] = nodes.count
    whole = Manifest.new(step=s.step, files=[e for files in by_node for e in files],
                         name=s.name, metrics=s.metrics, meta=meta, extra=s.extra)
    return [whole] if nodes.count == 1 else make_parts(whole, by_node)
