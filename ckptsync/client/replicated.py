"""Replicated state, saved by rank 0 alone: the default :class:`SaveStrategy`.

Every rank holds the same state (one process, or DDP's replicas). ``save`` snapshots it into
reusable CPU buffers on rank 0 (the stall), and every rank's RNG state, then rank 0 writes
and commits the checkpoint in the background (:func:`~ckptsync.client.writer.write_checkpoint`)
while every rank's handle waits for that outcome (:class:`~ckptsync.client.saves.Saves`).
``restore`` is :func:`~ckptsync.client.restore.restore_replicated`: rank 0 chooses, every
rank loads.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from ckptsync.client import ranks
from ckptsync.client.restore import RestoreInfo, restore_replicated
from ckptsync.client.runinfo import run_meta, scalars
from ckptsync.client.snapshot import SaveHandle
from ckptsync.client.state import (
    RNG_FILE,
    SnapshotBuffers,
    capture_rng,
    check_safe,
    state_of,
    to_jsonable,
)
from ckptsync.client.strategy import Context
from ckptsync.client.writer import write_checkpoint
from ckptsync.manifest import Manifest, make_name

__all__ = ["Replicated"]

log = logging.getLogger("ckptsync")


class Replicated:
    """:class:`~ckptsync.client.strategy.SaveStrategy` of replicated state (rank 0 writes)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._buffers = SnapshotBuffers()  # reused from save to save (rank 0)

    def save(self, step: int | None, objects: Mapping[str, Any],
             metrics: Mapping[str, Any] | None, extra: Any) -> SaveHandle[Manifest | None]:
        ctx = self.ctx
        name = make_name(step) if ctx.rank == 0 else ""
        err: Exception | None = None
        rng_state: dict[str, Any] | None = None
        trees: dict[str, Any] = {}
        try:
            ctx.sync.before_save()
            metric_values = scalars(metrics)
            extra_json = to_jsonable(extra) if extra is not None else {}
            t0 = time.perf_counter()
            rng_state = capture_rng() if ctx.capture_rng else None
            if ctx.rank == 0:
                for obj_name, obj in objects.items():
                    tree = state_of(obj_name, obj)
                    check_safe(tree, obj_name)
                    trees[obj_name] = self._buffers.snapshot(obj_name, tree)
                stall = time.perf_counter() - t0
                meta = run_meta(ctx.world_size, ctx.git, objects, stall)
        except Exception as e:
            if ctx.world_size == 1:
                raise
            err = e
        # Every rank joins, failed or not: a failure anywhere raises on every rank, and no
        # rank is left in a collective the others never join.
        shared = ranks.agree(ctx.rank, ctx.world_size, err, (rng_state, name),
                             f"save step {step}")
        rng_all: list[Any] = [r for r, _ in shared]
        name = shared[0][1]
        if ctx.rank != 0:
            return ctx.saves.awaiting_rank0(name)
        trees_rng = ({"world_size": ctx.world_size, "ranks": rng_all}
                     if rng_all[0] is not None else None)

        def job() -> Manifest:
            return self._write(name, step, trees, trees_rng, metric_values, extra_json, meta)

        return ctx.saves.submit(job, name, shared=True)

    def _write(self, name: str, step: int | None, trees: dict[str, Any],
               rng: dict[str, Any] | None, metrics: dict[str, float], extra: dict[str, Any],
               meta: dict[str, Any]) -> Manifest:
        """Rank 0, in the background: write and commit the checkpoint, then hand it on."""
        ctx = self.ctx
        t0 = time.perf_counter()
        files = dict(trees)
        if rng is not None:
            files[RNG_FILE[:-3]] = rng
        # Only a checkpoint that a healthy remote will push at once is worth streaming.
        streaming = ctx.sync.ready_to_stream()
        ckpt, streams = write_checkpoint(
            ctx.store, name, files, remote=ctx.remote if streaming else None,
            seal=ctx.keys if ctx.encrypt_local else None,
            manifest={"step": step, "metrics": metrics, "meta": meta, "extra": extra})
        manifest = ckpt.manifest
        log.info("saved %s (step %s, %.1f MB) in %.2fs", ckpt.path, step,
                 manifest.total_size / 1e6, time.perf_counter() - t0)
        ctx.sync.committed(ckpt, streams)
        return manifest

    def restore(self, name: str | None, objects: Mapping[str, Any],
                map_location: Any) -> RestoreInfo | None:
        ctx = self.ctx
        return restore_replicated(ctx.store, ctx.remote, ctx.rank, ctx.world_size, name,
                                  map_location, objects, rng=ctx.capture_rng, keys=ctx.keys,
                                  keep_encrypted=ctx.encrypt_local,
                                  allow_plaintext=ctx.allow_plaintext)
