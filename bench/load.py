"""How a restore loads files: read vs memory-mapped, until training has taken its first step.

``python -m bench.load [--quick] [--runs N]`` saves the bench state (model and AdamW, one file
each, as ckptsync writes them) and alternates three ways of loading it into a fresh model and
optimizer, each followed by one training step (what a resumed run does next, so that a cost
moved into the first step is counted):

- read: ``torch.load`` of both files (what ckptsync did before, and the resume baseline);
- map the module: ``mmap=True`` for the model's file only (what ``Checkpointer.restore`` does);
- map both: the optimizer's moments stay mapped, and its first step copies them a page at a
  time (copy-on-write), which is why ckptsync does not map files whose tensors are kept.

The files are in the page cache, as right after a pull. Prints medians (min-max) and ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import FULL, QUICK, make_state, state_dict
from bench.peers import torch_save_fsync

WAYS = {"read": (False, False), "map the module": (True, False), "map both": (True, True)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=9)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    size = QUICK if args.quick else FULL
    model, opt = make_state(size)
    x = torch.randn(64, size.width)
    with tempfile.TemporaryDirectory(prefix="ckptsync-bench-load-") as tmp:
        files = {}
        for k, v in state_dict(model, opt).items():
            files[k] = Path(tmp) / f"{k}.pt"
            torch_save_fsync(v, files[k])
        nbytes = sum(p.stat().st_size for p in files.values())

        def run(map_model: bool, map_opt: bool) -> tuple[float, float]:
            t0 = time.perf_counter()
            sd_model = torch.load(files["model"], weights_only=True, mmap=map_model)
            sd_opt = torch.load(files["optimizer"], weights_only=True, mmap=map_opt)
            model.load_state_dict(sd_model)
            opt.load_state_dict(sd_opt)
            t1 = time.perf_counter()
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
            return t1 - t0, time.perf_counter() - t0

        times: dict[str, list[tuple[float, float]]] = {w: [] for w in WAYS}
        for i in range(args.runs + 1):
            for way, (mm, mo) in WAYS.items():
                r = run(mm, mo)
                if i:  # the first round warms up
                    times[way].append(r)

    print(f"load {nbytes / 1e9:.2f} GB (model + AdamW) from the page cache, then one step; "
          f"median of {args.runs} (min-max)")
    base = statistics.median(s for _, s in times["read"])
    print(f"{'':16} {'load s':>22} {'load + first step s':>24} {'vs read':>8}")
    for way, rs in times.items():
        loads, steps = [a for a, _ in rs], [b for _, b in rs]
        print(f"{way:16} {statistics.median(loads):8.3f} ({min(loads):.3f}-{max(loads):.3f})"
              f"   {statistics.median(steps):8.3f} ({min(steps):.3f}-{max(steps):.3f})"
              f"   {statistics.median(steps) / base:6.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
