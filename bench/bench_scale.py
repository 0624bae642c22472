"""7. Scale: resume latency with 1, 100, 1000 remote checkpoints; bytes sent when 90% of the
files are unchanged since the previous checkpoint."""

from __future__ import annotations

import os
import time
from typing import Any

import blake3

from bench.common import Ctx, Table, Target, measure


def _fill(ctx: Ctx, url: str, n: int) -> None:
    """``n`` committed checkpoints (1 KiB file + manifest each), written straight to S3."""
    from ckptsync.manifest import FileEntry, Manifest

    fs = ctx.s3fs()
    blobs: dict[str, bytes] = {}
    last: Any = None
    for step in range(n):
        data = os.urandom(1024)
        m = Manifest.new(step=step, files=[FileEntry("x.bin", 1024, "blake3",
                                                     blake3.blake3(data).hexdigest())])
        root = url[len("s3://"):]
        blobs[f"{root}/{m.name}/x.bin"] = data
        blobs[f"{root}/{m.name}/ckptsync.json"] = m.to_json()
        last = m
    fs.pipe(blobs, batch_size=64)
    import json

    fs.pipe_file(f"{url[len('s3://'):]}/LATEST",
                 json.dumps({"name": last.name, "step": last.step}).encode())


def run(ctx: Ctx) -> list[Table]:
    from ckptsync.local import LocalStore
    from ckptsync.remote import RemoteStore

    rows: dict[str, list[float]] = {}
    for n in (1, 100, 1000):
        url = ctx.s3(f"scale-{n}")
        _fill(ctx, url, n)

        def resume(url: str = url, n: int = n) -> float:
            d = ctx.fresh_dir("scale")
            t0 = time.perf_counter()
            ck = RemoteStore(url, ctx.storage_options).pull(None, LocalStore(d))
            t = time.perf_counter() - t0
            assert ck.step == n - 1
            return t

        rows.update({f"resume, {n} checkpoints": v
                     for v in measure({"x": resume}, ctx).values()})
    lat = Table("scale: resume latency vs remote checkpoint count (1 KiB checkpoints)", "s",
                rows, baseline="resume, 1 checkpoints",
                targets=[Target("1000 checkpoints <= 3x one checkpoint (no list-and-read-all)",
                                "resume, 1000 checkpoints", ["resume, 1 checkpoints"], 3.0)])

    # Dedup: 20 files; each new checkpoint changes 2 of them.
    total = ctx.size.nbytes // 4
    nfiles, per = 20, total // 20
    src = LocalStore(ctx.fresh_dir("dedup"))
    url = ctx.s3("scale-dedup")
    files = {f"f{i:02d}.bin": os.urandom(per) for i in range(nfiles)}
    fractions: list[float] = []
    times: list[float] = []
    from ckptsync.manifest import Manifest, make_name

    for step in range(ctx.runs + 1):
        if step:
            for i in range(2):
                files[f"f{(2 * step + i) % nfiles:02d}.bin"] = os.urandom(per)
        name = make_name(step)
        st = src.staging(name)
        for rel, data in files.items():
            w = st.open(rel)
            w.write(data)
            st.close_file(rel)
        ck = st.commit(Manifest.new(step=step, files=st.entries, name=name))
        store = RemoteStore(url, ctx.storage_options)
        t0 = time.perf_counter()
        store.push(ck)
        dt = time.perf_counter() - t0
        if step:  # the first push has nothing to copy from
            fractions.append(100.0 * store.stats["bytes_uploaded"] / ck.manifest.total_size)
            times.append(dt)
        src.delete(ck.name)
    ded = Table(f"scale: bytes uploaded when 90% of files are unchanged ({total / 1e9:.2f} GB, "
                "20 files)", "% of full size", {"ckptsync push (server-side copy)": fractions},
                targets=[Target("<= 15% of the full size", "ckptsync push (server-side copy)",
                                ["full size"], 0.15)],
                notes=[f"push time with dedup: median {sorted(times)[len(times) // 2]:.2f} s"])
    ded.rows["full size"] = [100.0] * len(fractions)
    return [lat, ded]
