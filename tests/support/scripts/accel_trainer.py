"""A tiny Accelerate training loop on CPU, synced by ckptsync.integrations.accelerate.

``--project DIR --remote URL --steps N --save-every K``: resumes from the remote when it holds
a checkpoint (prints ``resumed from step S``), saves every K steps (``saved S DIR``), prints
``watcher PID`` once the daemon runs (``--stall-after S``: then hangs, to be killed) and
writes the final weights to ``DIR/final.pt``. Each step's batch is a function of the step and
dropout draws from the RNG that Accelerate saves, so a resumed run ends with the same weights
as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

from ckptsync.integrations.accelerate import CkptSync


class Counter:
    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, d: dict[str, int]) -> None:
        self.step = int(d["step"])


class Extra:
    """A second registered object: its file (custom_checkpoint_1.pkl) is written last."""

    def __init__(self) -> None:
        self.scale = 1

    def state_dict(self) -> dict[str, int]:
        return {"scale": self.scale}

    def load_state_dict(self, d: dict[str, int]) -> None:
        self.scale = int(d["scale"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--project", required=True)
    ap.add_argument("--remote", required=True)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--save-every", type=int, default=2)
    ap.add_argument("--total-limit", type=int, default=None)
    ap.add_argument("--stall-after", type=int, default=None,
                    help="after the save at this step, hang (to be killed mid-run)")
    args = ap.parse_args()
    opts = json.loads(os.environ.get("TEST_STORAGE_OPTIONS", "{}"))

    torch.manual_seed(0)
    acc = Accelerator(cpu=True, project_config=ProjectConfiguration(
        project_dir=args.project, automatic_checkpoint_naming=True,
        total_limit=args.total_limit))
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.3),
                                torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = acc.prepare(model, opt)
    counter = Counter()
    acc.register_for_checkpointing(counter, Extra())
    sync = CkptSync(acc, args.remote, storage_options=opts, settle=0.2, interval=0.5)
    if sync.load_state() is not None:
        print(f"resumed from step {counter.step}", flush=True)
    while counter.step < args.steps:
        g = torch.Generator().manual_seed(1000 + counter.step)
        x = torch.randn(16, 8, generator=g)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
        counter.step += 1
        if counter.step % args.save_every == 0:
            path = sync.save_state()
            print(f"saved {counter.step} {os.path.basename(path)}", flush=True)
            if sync.watcher is not None:
                print(f"watcher {sync.watcher.pid}", flush=True)
            if counter.step == args.stall_after:
                time.sleep(3600)
    sync.close(timeout=120)
    torch.save(acc.unwrap_model(model).state_dict(), os.path.join(args.project, "final.pt"))
    print("done", flush=True)


if __name__ == "__main__":
    main()
