"""Where the CPU goes: client, server and kernel CPU seconds per GB, ckptsync vs its peers.

``python -m bench.cpu [--quick] [--runs N]`` starts SeaweedFS on 127.0.0.1 and alternates, on
the bench state: a local save (ckptsync, ``torch.save`` + fsync, ``dcp.async_save``), a save
until committed in S3 (ckptsync, ``torch.save`` + fsync + boto3 ``upload_file``), a push and a
pull of a committed checkpoint (ckptsync, boto3). Per contender it prints the median wall time
and the CPU seconds per GB used by this process (the client, ``getrusage``), by the server
(``/proc/<pid>/stat``) and by everything else on the machine (``/proc/stat`` minus both: the
kernel's writeback and loopback network threads). On a 2-core machine whose cores are all busy,
wall time is about (client + server + other) / 2: this table says which part a change must
shrink. Linux only (``/proc``).
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_durable import perturb
from bench.common import (
    FULL,
    QUICK,
    context,
    make_state,
    pid_cpu,
    state_dict,
    upload_processes,
)
from bench.peers import (
    DcpAsync,
    boto3_download_dir,
    boto3_upload_dir,
    rmtree,
    torch_save_fsync,
    torch_save_upload,
)


def _self_cpu() -> float:
    """This process's CPU and its Checkpointers' upload processes' (the client's)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime + sum(pid_cpu(p) for p in upload_processes())




def _machine_busy() -> float:
    """CPU seconds the whole machine spent busy (steal and iowait are not busy)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq = map(int, f.readline().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


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

        ours_local = Checkpointer(ctx.fresh_dir("cpu-local"), keep_last=1, rng=False)
        ours_s3 = Checkpointer(ctx.fresh_dir("cpu-durable"), remote=ctx.s3("cpu-durable"),
                               storage_options=ctx.storage_options, keep_last=1, rng=False)
        dcp = DcpAsync(async_staging=False)

        def saved(c: Any) -> None:
            c.save(1, model=model, optimizer=opt)
            c.wait()

        def torch_save_boto3() -> None:
            torch_save_upload(state_dict(model, opt), sink() / "ckpt.pt", client, ctx.bucket,
                              f"cpu-durable-boto3/{uuid.uuid4().hex}")

        def dcp_local() -> None:
            dcp.save(state_dict(model, opt), sink())
            dcp.wait()

        contenders: dict[str, Callable[[], object]] = {
            "local save: ckptsync": lambda: saved(ours_local),
            "local save: torch.save+fsync": lambda: torch_save_fsync(
                state_dict(model, opt), sink() / "ckpt.pt"),
            "local save: dcp.async_save": dcp_local,
            "save -> in S3: ckptsync": lambda: saved(ours_s3),
            "save -> in S3: torch.save+fsync+boto3": torch_save_boto3,
            "upload: ckptsync push": lambda: RemoteStore(
                ctx.s3("cpu-up", uuid.uuid4().hex), ctx.storage_options).push(ckpt),
            "upload: boto3 upload_file": lambda: boto3_upload_dir(
                client, ckpt.path, ctx.bucket, f"cpu-up-boto3/{uuid.uuid4().hex}"),
            "download: ckptsync pull (sha256+fsync)": lambda: RemoteStore(
                ctx.s3("cpu-dl"), ctx.storage_options).pull(None, LocalStore(sink())),
            "download: boto3 download_file": lambda: boto3_download_dir(
                client, ctx.bucket, "cpu-dl-boto3", sink()),
        }
        rows: dict[str, list[tuple[float, ...]]] = {k: [] for k in contenders}
        for run in range(args.runs + 1):
            for name, fn in contenders.items():
                if name.startswith(("local", "save")):
                    perturb(model, opt)  # every byte changes, as after a training step
                c0, s0, m0 = _self_cpu(), pid_cpu(server_pid), _machine_busy()
                t0 = time.perf_counter()
                fn()
                wall = time.perf_counter() - t0
                cli, srv = (_self_cpu() - c0) / gb, (pid_cpu(server_pid) - s0) / gb
                other = (_machine_busy() - m0) / gb - cli - srv
                if run:  # the first round is the warm-up
                    rows[name].append((wall, cli, srv, other))
        ours_local.close()
        ours_s3.close()
        dcp.close()
        print(f"\n== CPU per GB, {gb:.2f} GB checkpoint, medians of {args.runs} "
              f"({os.cpu_count()} CPUs, SeaweedFS on 127.0.0.1) ==")
        print(f"{'':40s} {'wall s':>7s} {'client':>7s} {'server':>7s} {'other':>7s} "
              f"{'total':>7s}   (CPU-s per GB)")
        for name, vals in rows.items():
            wall, cli, srv, other = (statistics.median(v[i] for v in vals) for i in range(4))
            print(f"{name:40s} {wall:7.2f} {cli:7.2f} {srv:7.2f} {other:7.2f} "
                  f"{cli + srv + other:7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
