"""Run the benchmark suite: ``python -m bench.run --quick|--full [--only stall,scale]``.

Starts one SeaweedFS server on 127.0.0.1, runs every benchmark (peers and ckptsync alternating
on the same state and server), prints one table per benchmark and writes the JSON to
``bench/results/``.
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

from bench.common import Table, context, renice, write_results

BENCHES = ["stall", "durable", "throughput", "resume", "memory", "train", "scale"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_true", help="small state, fewer runs (< 3 min)")
    mode.add_argument("--full", action="store_true", help="~1 GB state, >= 5 runs")
    ap.add_argument("--only", default=",".join(BENCHES), help="comma-separated benchmarks")
    ap.add_argument("--runs", type=int, default=None, help="override the number of runs")
    ap.add_argument("--server-nice", type=int, default=0, metavar="N",
                    help="run the S3 server at this nice value, for every contender alike: a "
                         "stand-in for a server whose CPU is not the trainer's (default 0)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    t0 = time.perf_counter()
    tables: list[Table] = []
    failures: dict[str, str] = {}
    with context(quick=args.quick, runs=args.runs) as ctx:
        if args.server_nice:
            renice(ctx.server.proc.pid, args.server_nice)
        print(f"ckptsync bench ({'quick' if args.quick else 'full'}): state "
              f"{ctx.size.nbytes / 1e9:.2f} GB, big {ctx.big.nbytes / 1e9:.2f} GB, "
              f"{ctx.runs} runs, SeaweedFS at {ctx.endpoint} (nice {args.server_nice}), "
              f"{os.cpu_count()} CPUs", flush=True)
        for name in args.only.split(","):
            mod = importlib.import_module(f"bench.bench_{name}")
            t1 = time.perf_counter()
            try:
                got = mod.run(ctx)
            except Exception as e:
                failures[name] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
                print(f"\n== {name}: FAILED: {failures[name]}", flush=True)
                continue
            for t in got:
                print(t.render(), flush=True)
            print(f"  ({name}: {time.perf_counter() - t1:.0f} s)", flush=True)
            tables.extend(got)
    meta = {"quick": args.quick, "runs": ctx.runs, "cpus": os.cpu_count(),
            "python": platform.python_version(), "host": platform.node(),
            "server_nice": args.server_nice, "failures": failures,
            "seconds": time.perf_counter() - t0}
    path = write_results(tables, args.quick, meta)
    print(f"\nresults: {path} ({time.perf_counter() - t0:.0f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
