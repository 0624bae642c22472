"""A trainer that knows nothing of ckptsync: it checkpoints with plain ``torch.save``.

Three ways of writing a checkpoint, as real trainers do (``--mode``):

``rename``   ``ckpt.pt.tmp`` then ``os.replace`` onto ``ckpt.pt``
``inplace``  ``open("ckpt.pt", "wb")`` rewritten in place
``dirs``     ``checkpoint-<step>/model.pt`` then a ``DONE`` marker; keeps the newest two dirs

``--resume`` continues from the newest checkpoint it finds (its own logic, no ckptsync).
``--slow S`` sleeps S seconds per 16 KiB written, so that a test can kill it mid-write.
Prints ``resumed N`` / ``fresh``, then ``writing N`` and ``saved N`` around each save.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

PIECE = 16 * 1024


class SlowWriter:
    """A file wrapper that writes in small pieces with a pause before each."""

    def __init__(self, f: Any, slow: float) -> None:
        self.f = f
        self.slow = slow

    def write(self, data: Any) -> int:
        mv = memoryview(data).cast("B")
        for i in range(0, len(mv), PIECE):
            if self.slow:
                time.sleep(self.slow)
            self.f.write(mv[i : i + PIECE])
        return len(mv)

    def flush(self) -> None:
        self.f.flush()


def state_at(step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(step)
    return {"step": step, "w": torch.randn(64 * 1024, generator=g)}


def save(out: Path, mode: str, step: int, slow: float) -> None:
    state = state_at(step)
    if mode == "rename":
        tmp = out / "ckpt.pt.tmp"
        with open(tmp, "wb") as f:
            torch.save(state, SlowWriter(f, slow))
        os.replace(tmp, out / "ckpt.pt")
    elif mode == "inplace":
        with open(out / "ckpt.pt", "wb") as f:
            torch.save(state, SlowWriter(f, slow))
    else:
        d = out / f"checkpoint-{step:04d}"
        d.mkdir()
        with open(d / "model.pt", "wb") as f:
            torch.save(state, SlowWriter(f, slow))
        (d / "DONE").write_text(f"{step}\n")
        for old in sorted(out.glob("checkpoint-*"))[:-2]:
            shutil.rmtree(old)


def resume(out: Path, mode: str) -> int | None:
    if mode == "dirs":
        done = sorted(d for d in out.glob("checkpoint-*") if (d / "DONE").exists())
        path = done[-1] / "model.pt" if done else None
    else:
        path = out / "ckpt.pt" if (out / "ckpt.pt").exists() else None
    if path is None:
        return None
    state = torch.load(path, weights_only=True)
    assert torch.equal(state["w"], state_at(state["step"])["w"]), "checkpoint content is wrong"
    return int(state["step"])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--mode", choices=("rename", "inplace", "dirs"), required=True)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--slow", type=float, default=0.0)
    p.add_argument("--pause", type=float, default=0.0, help="seconds between saves")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    start = 1
    if a.resume:
        last = resume(out, a.mode)
        print("fresh" if last is None else f"resumed {last}", flush=True)
        start = 1 if last is None else last + 1
    for step in range(start, a.steps + 1):
        print(f"writing {step}", flush=True)
        save(out, a.mode, step, a.slow)
        print(f"saved {step}", flush=True)
        time.sleep(a.pause)


if __name__ == "__main__":
    main()
