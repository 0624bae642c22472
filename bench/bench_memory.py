"""5. Memory: the daemon's peak RSS while uploading the big checkpoint; the client's extra
memory over 20 saves (it must not grow: buffers are reused)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

from bench.common import ROOT, Ctx, Table, Target, make_state

MBYTES = 1e6


def _child(args: list[str], ctx: Ctx) -> tuple[int, str]:
    """Run ``python -m bench.children ARGS``; return (peak RSS bytes, sampled every 10 ms
    from outside, stdout). (wait4's ru_maxrss would count the parent's pages at fork.)"""
    import tempfile
    import time

    import psutil

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-m", "bench.children", *args], cwd=ROOT,
                                env=ctx.env(), stdout=out, stderr=err)
        ps = psutil.Process(proc.pid)
        peak = 0
        while proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                peak = max(peak, ps.memory_info().rss)
            time.sleep(0.01)
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            raise RuntimeError(f"bench child {args[0]} failed: {err.read().decode()[-800:]}")
        return peak, out.read().decode()


def run(ctx: Ctx) -> list[Table]:
    from ckptsync import Checkpointer

    big = ctx.big
    src = ctx.fresh_dir("mem-big")
    model, opt = make_state(big)
    with Checkpointer(src, rng=False) as c:
        c.save(1, model=model, optimizer=opt)
    del model, opt
    from ckptsync.local import LocalStore

    ck = LocalStore(src).list()[-1]
    opts = json.dumps(ctx.storage_options)
    daemon_rows: dict[str, list[float]] = {}
    runs = 1 if ctx.quick else 3
    for _ in range(runs):
        url = ctx.s3("mem", os.urandom(4).hex())
        peak, _out = _child(["daemon", "--dir", str(src), "--url", url, "--options", opts,
                             "--once"], ctx)
        daemon_rows.setdefault("ckptsync daemon push", []).append(peak / MBYTES)
        for tool in ("boto3", "s3fs"):
            peak, _ = _child(["peer-upload", "--tool", tool, "--dir", str(ck.path), "--url",
                              ctx.s3("mem-peer", os.urandom(4).hex()), "--options", opts], ctx)
            daemon_rows.setdefault(f"{tool} uploader process", []).append(peak / MBYTES)
    daemon_rows["target (300 MB)"] = [300.0]
    import shutil

    shutil.rmtree(src, ignore_errors=True)
    daemon = Table(f"memory: uploader peak RSS, {ck.manifest.total_size / 1e9:.2f} GB checkpoint",
                   "MB", daemon_rows, baseline="boto3 uploader process",
                   targets=[Target("daemon <= 300 MB", "ckptsync daemon push",
                                   ["target (300 MB)"], 1.0)],
                   notes=["peak RSS of the whole process (sampled every 10 ms), interpreter "
                          "and libraries included; the daemon is `ckptsync watch --once`"])

    saves = 20 if not ctx.quick else 5
    client_rows: dict[str, list[float]] = {}
    growth: dict[str, float] = {}
    state = ctx.size.nbytes
    for tool in ("ckptsync", "torch.save", "dcp.async_save"):
        d = ctx.fresh_dir("mem-client")
        _, out = _child(["client", "--tool", tool, "--dir", str(d), "--width",
                         str(ctx.size.width), "--layers", str(ctx.size.layers),
                         "--saves", str(saves)], ctx)
        r = json.loads(out.strip().splitlines()[-1])
        client_rows[f"{tool} extra peak / state"] = [r["extra_peak"] / state]
        growth[tool] = (r["after"][-1] - r["after"][1]) / MBYTES
        shutil.rmtree(d, ignore_errors=True)
    client_rows["target (1.1x state)"] = [1.1]
    client = Table(f"memory: client extra RSS over {saves} saves, {state / 1e9:.2f} GB state",
                   "x state size", client_rows, baseline="torch.save extra peak / state",
                   targets=[Target("<= 1.1x state", "ckptsync extra peak / state",
                                   ["target (1.1x state)"], 1.0)],
                   notes=[f"RSS growth from save 2 to save {saves}: "
                          + ", ".join(f"{k} {v:+.1f} MB" for k, v in growth.items()),
                          "target for growth: constant (within noise)"])

    return [daemon, client]
