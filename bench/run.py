"""Run the benchmark suite: ``python -m bench.run --quick|--full [--only stall,scale]``.

Runs every benchmark (peers and ckptsync alternating on the same state and server), each
against its own SeaweedFS server on 127.0.0.1 and in its own temporary directory, prints one
table per benchmark and writes the JSON to ``bench/results/``. A fresh server per benchmark:
at full size the suite writes more than 100 GB in all (uploads and local copies), more than
the disk may hold (a shared server failed with ``InternalError`` during the fifth benchmark
here), and no benchmark should run against a server another one has filled.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    FULL,
    FULL_BIG,
    QUICK,
    QUICK_BIG,
    TINY,
    DiskPeak,
    Table,
    context,
    default_runs,
    renice,
    write_results,
)

BENCHES = ["stall", "durable", "throughput", "resume", "memory", "train", "scale", "https",
           "link", "encrypt", "sharded"]
# ~0.15 GB and ~1 GB states; "tiny" (~2.4 MB, not in the defaults) shows a save's fixed costs.
SIZES = {"small": (QUICK, QUICK_BIG), "large": (FULL, FULL_BIG), "tiny": (TINY, TINY)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_true", help="small state, fewer runs (< 3 min)")
    mode.add_argument("--full", action="store_true", help="~1 GB state, >= 5 runs")
    ap.add_argument("--only", default=",".join(BENCHES), help="comma-separated benchmarks")
    ap.add_argument("--runs", type=int, default=None, help="override the number of runs")
    ap.add_argument("--sizes", default=None,
                    help="comma-separated state sizes: small (~0.15 GB), large (~1 GB), tiny "
                         "(~2.4 MB: fixed costs); "
                         "default: small with --quick, small,large with --full")
    ap.add_argument("--server-nice", type=int, default=0, metavar="N",
                    help="run the S3 server at this nice value, for every contender alike: a "
                         "stand-in for a server whose CPU is not the trainer's (default 0)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    t0 = time.perf_counter()
    tables: list[Table] = []
    failures: dict[str, str] = {}
    size_names = (args.sizes or ("small" if args.quick else "small,large")).split(",")
    runs = args.runs or default_runs(args.quick)
    print(f"ckptsync bench ({'quick' if args.quick else 'full'}): states "
          + ", ".join(f"{n} {SIZES[n][0].nbytes / 1e9:.2f} GB (big {SIZES[n][1].nbytes / 1e9:.2f})"
                      for n in size_names)
          + f", {runs} runs, a fresh SeaweedFS per benchmark and size (nice "
          f"{args.server_nice}), {os.cpu_count()} CPUs", flush=True)
    for name, size_name in [(b, z) for b in args.only.split(",") for z in size_names]:
        mod = importlib.import_module(f"bench.bench_{name}")
        t1 = time.perf_counter()
        with context(quick=args.quick, runs=runs, size=SIZES[size_name],
                     tls=getattr(mod, "TLS", False)) as ctx:
            if args.server_nice:
                renice(ctx.server.proc.pid, args.server_nice)
            disk = DiskPeak(ctx.tmp)
            try:
                got = mod.run(ctx)
            except Exception as e:
                failures[f"{name}/{size_name}"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
                print(f"\n== {name} ({size_name}): FAILED: {failures[f'{name}/{size_name}']}",
                      flush=True)
                continue
            finally:
                peak = disk.stop()
        for t in got:
            print(t.render(), flush=True)
        print(f"  ({name}, {size_name}: {time.perf_counter() - t1:.0f} s, peak disk use "
              f"{peak / 1e9:.1f} GB)", flush=True)
        tables.extend(got)
    meta = {"quick": args.quick, "runs": runs, "sizes": size_names, "cpus": os.cpu_count(),
            "python": platform.python_version(), "host": platform.node(),
            "server_nice": args.server_nice, "failures": failures,
            "seconds": time.perf_counter() - t0}
    path = write_results(tables, args.quick, meta)
    print(f"\nresults: {path} ({time.perf_counter() - t0:.0f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
