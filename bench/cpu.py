"""Where the CPU goes: client and server CPU seconds per GB moved, ckptsync vs boto3.

``python -m bench.cpu [--quick] [--runs N]`` starts SeaweedFS on 127.0.0.1, commits one
checkpoint of the bench state, then alternates ckptsync push / boto3 upload_file and ckptsync
pull / boto3 download_file, and prints, per contender, the median MB/s and the CPU seconds per
GB used by this process (the client, from ``getrusage``) and by the server (from
``/proc/<pid>/stat``). On a 2-core machine where both are busy, throughput is about
2 cores / (client + server CPU per byte): this table says which side a change must shrink.
Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import FULL, QUICK, context, make_state
from bench.peers import boto3_download_dir, boto3_upload_dir, rmtree


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _pid_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="0.15 GB state instead of ~1 GB")
    ap.add_argument("--runs", type=int, default=3, help="measured runs after one warm-up")
    args = ap.parse_args()
    from ckptsync import Checkpointer
    from ckptsync.local import LocalStore
    from ckptsync.remote import RemoteStore

    with context(quick=args.quick, runs=args.runs) as ctx:
        model, opt = make_state(QUICK if args.quick else FULL)
        src = ctx.fresh_dir("cpu-src")
        with Checkpointer(src, rng=False) as c:
            c.save(1, model=model, optimizer=opt)
        del model, opt
        ckpt = LocalStore(src).list()[-1]
        gb = ckpt.manifest.total_size / 1e9
        server_pid = ctx.server.proc.pid
        client = ctx.boto3()
        RemoteStore(ctx.s3("cpu-dl"), ctx.storage_options).push(ckpt)
        boto3_upload_dir(client, ckpt.path, ctx.bucket, "cpu-dl-boto3")
        sinks: list[Path] = []

        def sink() -> Path:
            while sinks:
                rmtree(sinks.pop())
            d = ctx.fresh_dir("cpu-sink")
            sinks.append(d)
            return d

        contenders: dict[str, Callable[[], object]] = {
            "upload: ckptsync push": lambda: RemoteStore(
                ctx.s3("cpu-up", uuid.uuid4().hex), ctx.storage_options).push(ckpt),
            "upload: boto3 upload_file": lambda: boto3_upload_dir(
                client, ckpt.path, ctx.bucket, f"cpu-up-boto3/{uuid.uuid4().hex}"),
            "download: ckptsync pull (sha256+fsync)": lambda: RemoteStore(
                ctx.s3("cpu-dl"), ctx.storage_options).pull(None, LocalStore(sink())),
            "download: boto3 download_file": lambda: boto3_download_dir(
                client, ctx.bucket, "cpu-dl-boto3", sink()),
        }
        rows: dict[str, list[tuple[float, float, float]]] = {k: [] for k in contenders}
        for run in range(args.runs + 1):
            for name, fn in contenders.items():
                c0, s0, t0 = _self_cpu(), _pid_cpu(server_pid), time.perf_counter()
                fn()
                wall = time.perf_counter() - t0
                if run:  # the first round is the warm-up
                    rows[name].append((gb * 1e3 / wall, (_self_cpu() - c0) / gb,
                                       (_pid_cpu(server_pid) - s0) / gb))
        print(f"\n== CPU per GB, {gb:.2f} GB checkpoint, medians of {args.runs} "
              f"({os.cpu_count()} CPUs, SeaweedFS on 127.0.0.1) ==")
        print(f"{'':40s} {'MB/s':>8s} {'client CPU-s/GB':>16s} {'server CPU-s/GB':>16s}")
        for name, vals in rows.items():
            mbps, cli, srv = (statistics.median(v[i] for v in vals) for i in range(3))
            print(f"{name:40s} {mbps:8.0f} {cli:16.2f} {srv:16.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
