"""1. Stall: how long ``save`` blocks the training loop (local durability in the background)."""

from __future__ import annotations

import time
from typing import Any

from bench.common import Ctx, Table, Target, make_state, measure, state_dict
from bench.peers import CopyFloor, DcpAsync, TorchSnapshot, rmtree, torch_save_fsync


def run(ctx: Ctx) -> list[Table]:
    from ckptsync import Checkpointer

    model, opt = make_state(ctx.size)
    sd = state_dict(model, opt)
    floor = CopyFloor(sd)
    ours = Checkpointer(ctx.fresh_dir("ours-stall"), keep_last=1, rng=True)
    dcp_reuse = DcpAsync(async_staging=False)
    dcp_async = DcpAsync(async_staging=True)
    dirs: list[Any] = []

    def fresh(prefix: str) -> Any:
        while len(dirs) > 4:
            rmtree(dirs.pop(0))
        d = ctx.fresh_dir(prefix)
        dirs.append(d)
        return d

    def ours_save() -> float:
        t0 = time.perf_counter()
        h = ours.save(1, model=model, optimizer=opt)
        t = time.perf_counter() - t0
        h.wait()
        return t

    def dcp_async_save(d: DcpAsync) -> float:
        t0 = time.perf_counter()
        d.save(state_dict(model, opt), fresh("dcp"))
        t = time.perf_counter() - t0
        d.wait()
        return t

    def ts_async() -> float:
        ts = TorchSnapshot()
        t0 = time.perf_counter()
        ts.async_take({"model": model, "optimizer": opt}, str(fresh("ts") / "snap"))
        t = time.perf_counter() - t0
        ts.wait()
        return t

    rows = measure({
        "copy floor (preallocated)": lambda: floor(),
        "ckptsync save": ours_save,
        "dcp.async_save (reused stager)": lambda: dcp_async_save(dcp_reuse),
        "dcp.async_save (async staging)": lambda: dcp_async_save(dcp_async),
        "torchsnapshot async_take": ts_async,
        "torch.save+fsync": lambda: torch_save_fsync(sd, fresh("ts") / "ckpt.pt"),
    }, ctx)
    ours.close()
    dcp_reuse.close()
    dcp_async.close()
    return [Table(
        f"stall: save() blocking time, {ctx.size.nbytes / 1e9:.2f} GB state", "s", rows,
        baseline="copy floor (preallocated)",
        targets=[
            Target("<= 1.2x copy floor", "ckptsync save", ["copy floor (preallocated)"], 1.2),
            Target("<= best DCP async", "ckptsync save",
                   ["dcp.async_save (reused stager)", "dcp.async_save (async staging)"], 1.0),
            Target(">= 8x shorter than torch.save+fsync", "ckptsync save",
                   ["torch.save+fsync"], 1 / 8),
        ],
        notes=["dcp async staging: stall counted until staging_completion (the next optimizer "
               "step must not run before it)"],
    )]
