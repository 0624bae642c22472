"""4. Resume on a fresh machine: empty local directory -> state loaded (and, ours, verified)."""

from __future__ import annotations

import time
from typing import Any

import torch

from bench.common import Ctx, Table, Target, make_state, measure, over, state_dict
from bench.peers import boto3_config, rmtree, torch_save_upload


def run(ctx: Ctx) -> list[Table]:
    from ckptsync import Checkpointer

    model, opt = make_state(ctx.size)
    url = ctx.s3("resume-ours")
    with Checkpointer(ctx.fresh_dir("resume-src"), remote=url,
                      storage_options=ctx.storage_options) as c:
        c.save(7, model=model, optimizer=opt)
    path = ctx.fresh_dir("resume-peer") / "ckpt.pt"
    client = ctx.boto3()
    torch_save_upload(state_dict(model, opt), path, client, ctx.bucket, "resume-boto3/ckpt.pt")
    rmtree(path.parent)
    stale: list[Any] = []

    def fresh(prefix: str) -> Any:
        while stale:
            rmtree(stale.pop())
        d = ctx.fresh_dir(prefix)
        stale.append(d)
        return d

    def ours() -> float:
        d = fresh("resume-ours")
        t0 = time.perf_counter()
        with Checkpointer(d, remote=url, storage_options=ctx.storage_options) as c:
            info = c.restore(model=model, optimizer=opt)
        t = time.perf_counter() - t0
        assert info is not None and info.step == 7
        return t

    def boto3_load() -> float:
        d = fresh("resume-boto3")
        t0 = time.perf_counter()
        client.download_file(ctx.bucket, "resume-boto3/ckpt.pt", str(d / "ckpt.pt"),
                             Config=boto3_config())
        sd = torch.load(d / "ckpt.pt", weights_only=True)
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optimizer"])
        return time.perf_counter() - t0

    cpu: dict[str, list[float]] = {}
    rows = measure({"ckptsync restore (fresh dir)": ours,
                    "boto3 download_file+torch.load": boto3_load}, ctx,
                   gb=ctx.size.nbytes / 1e9, cpu=cpu)
    return [Table(f"resume on a fresh machine{over(ctx)}, {ctx.size.nbytes / 1e9:.2f} GB state",
                  "s", rows, cpu=cpu,
                  baseline="boto3 download_file+torch.load",
                  targets=[Target("<= 1.2x baseline", "ckptsync restore (fresh dir)",
                                  ["boto3 download_file+torch.load"], 1.2)],
                  notes=["ours: newest-valid lookup, ranged parallel download, sha256 verified, "
                         "fsync, local commit, load; baseline: download + load only"])]
