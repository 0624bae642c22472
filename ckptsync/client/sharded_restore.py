"""Restoring sharded (DCP) checkpoints: :func:`restore_sharded`, on every rank.

Rank 0 chooses the checkpoint (newest first; a local copy is verified there), every rank
learns its name. A rank whose directory holds the whole checkpoint loads it in place; a rank
that does not (a fresh machine, or a node holding only its part) pulls from the remote only
the files its own ``dcp.load`` will read, into a fetch directory under the store's private
``.ckptsync-fetch/`` (never a committed checkpoint: ``ls`` and retention do not see it):

1. ``.metadata`` (and ``rng.pt``), each verified against the manifest's digest as it streams;
2. DCP's load planner, set up exactly as ``dcp.load`` sets it up on this rank, says which
   storage items this rank reads; ``.metadata`` says which file holds each;
3. those files, verified the same way (a file another rank on this host already fetched and
   verified is not fetched again).

Every rank then says how it went in one collective: if any rank found a file corrupt or
missing, every rank moves to the next older checkpoint together (the warning names it and
why); any other failure is raised on every rank. ``dcp.load`` runs only once every rank has
its files, and copies what it reads into the caller's tensors, so the fetch directory is
removed after the load.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

from ckptsync.client import ranks
from ckptsync.client.dcp_state import DCP_META, dcp_states, is_dcp, load_dcp_states
from ckptsync.client.nodes import NodeDirectory, Nodes, nodes_of
from ckptsync.client.restore import RestoreInfo, Restorer, Skipped, say_fell_back
from ckptsync.client.state import RNG_FILE, restore_rng
from ckptsync.client.strategy import Context
from ckptsync.errors import CkptSyncError, CorruptCheckpointError, NoCheckpointError
from ckptsync.local import PRIVATE_PREFIX
from ckptsync.manifest import Manifest
from ckptsync.parts import part_of

__all__ = ["FETCH_DIR", "restore_sharded"]

log = logging.getLogger("ckptsync")

FETCH_DIR = f"{PRIVATE_PREFIX}fetch"
"""Under a store's directory: ``<name>/``, the files of checkpoint ``name`` this host's ranks
fetched for a sharded restore (removed once loaded)."""

METADATA = ".metadata"  # DCP's: which file holds each storage item


def _choices(ctx: Context, name: str | None, objects: Mapping[str, Any],
             skipped: Skipped) -> Iterator[str]:
    """Rank 0: the DCP checkpoints to try, newest first (a local copy verified here; a
    remote one is fetched by every rank); each one passed over is logged and added to
    ``skipped``."""
    restorer = Restorer(ctx.store, ctx.remote)
    if name is not None:
        try:
            local = ctx.store.get(name)
        except NoCheckpointError:
            if ctx.remote is None or ctx.remote.read_manifest(name) is None:
                raise
        else:
            ctx.store.verify(local)
        yield name
        return
    for cand in restorer.candidates():
        m = cand.manifest
        held = m.meta[DCP_META].get("objects", []) if m is not None and is_dcp(m) else []
        if cand.problem is not None:
            why = cand.problem
        elif not is_dcp(cand.manifest):
            why = "not a sharded (DCP) checkpoint"
        elif missing := sorted(set(objects) - set(held)):
            why = f"has no state for {missing}; it holds {sorted(held)}"
        else:
            try:
                if cand.local is not None:
                    ctx.store.verify(cand.local)
                yield cand.name
                continue  # every rank could not use it: skipped by restore_sharded
            except CorruptCheckpointError as e:
                why = str(e)
        log.warning("checkpoint %s cannot be restored here, trying an older one: %s",
                    cand.name, why)
        skipped.append((cand.name, why))


@dataclass(frozen=True)
class _Source:
    """Where this rank's ``dcp.load`` reads checkpoint ``manifest.name`` from."""

    path: Path
    manifest: Manifest
    fetched: bool  # path is a fetch directory (removed after the load), not a checkpoint


def _fetch_dir(ctx: Context, name: str) -> Path:
    return ctx.store.directory / FETCH_DIR / name


def _prepare(ctx: Context, name: str, states: dict[str, Any]) -> _Source:
    """This rank's source for ``name``: its whole local copy, or the files its load reads,
    fetched from the remote.

    Raises:
        CorruptCheckpointError: a file it needs is missing or damaged remotely.
        CkptSyncError: the checkpoint is not (wholly) here and there is no remote.
    """
    try:
        local = ctx.store.get(name)
    except NoCheckpointError:
        local = None
    if local is not None and part_of(local.manifest) is None:
        return _Source(local.path, local.manifest, False)
    if ctx.remote is None:
        part = part_of(local.manifest) if local is not None else None
        where = (f"holds only part {part.node} of {part.nodes} of it" if part is not None
                 else "does not hold it")
        raise CkptSyncError(
            f"checkpoint {name} was saved by several nodes and {ctx.store.directory} {where}; "
            "restoring it needs the remote its parts were uploaded to: pass remote=")
    m = ctx.remote.read_manifest(name)
    if m is None:
        url = ctx.remote.url_of(name)
        raise CorruptCheckpointError(f"{url}: no longer committed (deleted meanwhile?)",
                                     path=url)
    directory = _fetch_dir(ctx, name)
    small = [METADATA] + ([RNG_FILE] if ctx.capture_rng
                          and any(f.path == RNG_FILE for f in m.files) else [])
    got = ctx.remote.fetch_files(m, small, directory, ops=ctx.store.ops)
    needed = _files_read(directory, states, ctx.rank == 0)
    got += ctx.remote.fetch_files(m, needed, directory, ops=ctx.store.ops)
    total = sum(f.size for f in m.files)
    log.info("rank %d fetched %d of %d files (%s of %s) of %s", ctx.rank, len(got),
             len(m.files), _size(sum(f.size for f in got)), _size(total), name)
    return _Source(directory, m, True)


def _files_read(directory: Path, states: dict[str, Any], coordinator: bool) -> list[str]:
    """The DCP files this rank's ``dcp.load(states, ...)`` reads, from ``.metadata`` alone.

    Why DCP allows a per-rank pull: ``dcp.load`` plans on each rank with no data read
    (``DefaultLoadPlanner.set_up_planner(state_dict, metadata, is_coordinator)`` then
    ``create_local_plan()``); the plan's ``ReadItem``s are the items this rank's tensors
    (its shards, resharded to this world size) overlap, and ``metadata.storage_data``
    names the file of each. The global planning step of ``dcp.load`` passes the local plans
    through unchanged and ``FileSystemReader.read_data`` opens exactly those files
    (torch 2.13), so a rank never reads a file outside this set.
    """
    metadata = FileSystemReader(directory).read_metadata()
    planner = DefaultLoadPlanner()
    planner.set_up_planner(states, metadata, coordinator)
    plan = planner.create_local_plan()
    storage = metadata.storage_data
    return sorted({storage[item.storage_index].relative_path for item in plan.items})


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _remove(ctx: Context) -> None:
    """A node leader, once every rank is past the load (or the fetch) of a checkpoint: the
    fetch directory goes, with anything a crashed restore left there."""
    shutil.rmtree(ctx.store.directory / FETCH_DIR, ignore_errors=True)


def restore_sharded(ctx: Context, directory: NodeDirectory, name: str | None,
                    objects: Mapping[str, Any]) -> RestoreInfo | None:
    """:meth:`Checkpointer.restore` of sharded state; call on every rank. Rank 0 chooses the
    checkpoint; every rank gets the files its own load reads (in place, or fetched from the
    remote); every rank agrees they are all there, then loads through ``dcp.load``, on
    whatever world size this run has. ``directory``: this rank's hold on its node's
    directory (a node leader other than rank 0 adopts it here)."""
    nodes: Nodes = nodes_of(ctx.store, ctx.rank, ctx.world_size)
    skipped: Skipped = []
    choices = _choices(ctx, name, objects, skipped) if ctx.rank == 0 else iter(())
    states = dcp_states(objects)
    first: BaseException | None = None
    try:
        directory.adopt(nodes)  # a node leader other than rank 0: a crashed save's leftovers
    except BaseException as e:
        first = e  # raised on every rank by the first agreement below
    while True:
        pick: str | None = None
        err: str | None = None
        if ctx.rank == 0:
            try:
                pick = next(choices, None)
            except CkptSyncError as e:
                err = ranks.describe(e)
        pick, err, passed = ranks.from_rank0(ctx.world_size, (pick, err, skipped))
        if err is not None:
            raise CkptSyncError(f"rank 0 could not choose a checkpoint to restore: {err}")
        if pick is None:
            if passed:
                raise CorruptCheckpointError(
                    f"no sharded checkpoint in {ctx.store.directory} can be restored "
                    f"({'; '.join(f'{n}: {w}' for n, w in passed)}); nothing was loaded")
            log.info("no checkpoint in %s: starting fresh", ctx.store.directory)
            return None
        source: _Source | None = None
        failed, first = first, None
        corrupt: str | None = None
        try:
            if failed is None:
                source = _prepare(ctx, pick, states)
        except CorruptCheckpointError as e:
            corrupt = str(e)
        except BaseException as e:
            failed = e
        try:
            reports = ranks.agree(ctx.rank, ctx.world_size, failed, corrupt,
                                  f"fetch checkpoint {pick}'s files")
        except BaseException:
            if nodes.leader:
                _remove(ctx)
            raise
        bad = [f"rank {r}: {w}" if ctx.world_size > 1 else w
               for r, w in enumerate(reports) if w is not None]
        if not bad:
            assert source is not None
            break
        why = "; ".join(bad)
        if nodes.leader:
            _remove(ctx)
        if name is not None:
            raise CorruptCheckpointError(f"checkpoint {pick} cannot be restored: {why}; "
                                         "nothing was loaded")
        log.warning("checkpoint %s cannot be restored here, trying an older one: %s",
                    pick, why)
        if ctx.rank == 0:
            skipped.append((pick, why))
    try:
        _load(ctx, source, states, objects)
    finally:
        if source.fetched and nodes.leader:
            _remove(ctx)
    m = source.manifest
    pulled_from = ctx.remote.url_of() if source.fetched and ctx.remote is not None else None
    info = RestoreInfo(m.name, m.step, source.path, m, dict(m.metrics), dict(m.extra),
                       states, tuple(passed), pulled_from)
    if ctx.rank == 0 and info.fell_back:
        say_fell_back(info)
    log.info("%s (sharded, on %d ranks)", info.summary(), ctx.world_size)
    return info


def _load(ctx: Context, source: _Source, states: dict[str, Any],
          objects: Mapping[str, Any]) -> None:
    """Every rank: ``dcp.load`` from ``source`` into ``objects`` and this rank's RNG; then
    one collective, so that no rank's fetch directory is removed while a peer on its host
    still reads it, and a failure on one rank is raised on every rank."""
    err: BaseException | None = None
    try:
        dcp.load(states, storage_reader=FileSystemReader(source.path))
        load_dcp_states(objects, states)
        rng_path = source.path / RNG_FILE
        if ctx.capture_rng and rng_path.is_file():
            rngs = torch.load(rng_path, weights_only=True)
            per_rank = rngs.get("ranks", [])
            if rngs.get("world_size") == ctx.world_size and per_rank[ctx.rank] is not None:
                restore_rng(per_rank[ctx.rank])
            else:
                log.warning("checkpoint %s was saved by %s ranks, this run has %d: RNG not "
                            "restored", source.manifest.name, rngs.get("world_size"),
                            ctx.world_size)
    except BaseException as e:
        err = e
    ranks.agree(ctx.rank, ctx.world_size, err, None, f"load checkpoint {source.manifest.name}")
