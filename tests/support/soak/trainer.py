"""The soak trainer: a deterministic run that checkpoints every step with ``Checkpointer``.

``python trainer.py DIR --steps N --expect FILE [--remote URL] [--storage-options JSON]``

Resumes from the newest usable checkpoint (local or remote), then for each step: updates a
small model deterministically from the step number, appends ``{"step", "digest"}`` of its
state to ``FILE`` (before the save, so that a kill never loses an expected digest), saves with
``keep_last=2``. A resumed run repeats the exact trajectory, so two lines for one step must
agree. Prints ``resumed N`` / ``fresh``, then ``done N``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time

import torch

from ckptsync import Checkpointer


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def new_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(64, 64)


def advance(model: torch.nn.Module, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.9).add_(torch.randn(p.shape, generator=g), alpha=0.1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("directory")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--expect", required=True)
    ap.add_argument("--remote")
    ap.add_argument("--storage-options", default="{}")
    ap.add_argument("--step-sleep", type=float, default=0.05)
    a = ap.parse_args()
    torch.set_num_threads(1)
    model = new_model()
    ck = Checkpointer(a.directory, remote=a.remote, keep_last=2, close_timeout=30,
                      storage_options=json.loads(a.storage_options) if a.remote else None)
    info = ck.restore(model=model, fresh_ok=True)  # the first run of a soak starts fresh
    start = info.step if info is not None and info.step is not None else 0
    print(f"resumed {start}" if info else "fresh", flush=True)
    with open(a.expect, "a") as out:
        for step in range(start + 1, a.steps + 1):
            advance(model, step)
            out.write(json.dumps({"step": step, "digest": digest(model)}) + "\n")
            out.flush()
            ck.save(step, model=model)
            time.sleep(a.step_sleep)
    ck.close()
    print(f"done {a.steps}", flush=True)


if __name__ == "__main__":
    main()
