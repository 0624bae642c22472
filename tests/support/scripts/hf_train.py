"""A tiny, deterministic Hugging Face ``Trainer`` run on CPU, synced by ``CkptSyncCallback``.

``python hf_train.py OUT REMOTE|- [--pull] [--kill-at STEP] [--save-limit N] [--width W]``:
trains a small MLP (dropout on, so the RNG state matters) on a fixed random regression set,
3 epochs of 5 steps, saving every ``--save-steps``. ``--pull`` first pulls the newest remote
checkpoint and resumes from it (prints ``resumed from step N`` or ``fresh start``);
``--kill-at`` SIGKILLs this process at the end of that step (a crash mid-run),
``--kill-daemon-at`` the upload daemon right after that step's save; at the end the
final weights go to ``OUT/final.pt``. No download, no network but the remote.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from ckptsync.daemon import read_status
from ckptsync.integrations.transformers import (
    CkptSyncCallback,
    pull_latest_checkpoint,
)


class TinyRegressor(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Dropout(0.2),
                                 nn.Linear(width, 1))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.net(x).squeeze(-1)
        return {"loss": nn.functional.mse_loss(out, labels), "logits": out}


def dataset() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    xs = torch.randn(20, 8, generator=g)
    ys = xs.sum(-1) + 0.1 * torch.randn(20, generator=g)
    return [{"x": x, "labels": y} for x, y in zip(xs, ys, strict=True)]


class KillAt(TrainerCallback):  # type: ignore[misc]
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: object, state: object, control: object, **kw: object) -> None:
        if getattr(state, "global_step", None) == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class KillDaemonAt(TrainerCallback):
    """SIGKILL the upload daemon right after the save of ``step`` (a fault seam)."""

    def __init__(self, out: str, step: int) -> None:
        self.out, self.step = out, step

    def on_save(self, args: object, state: object, control: object, **kw: object) -> None:
        if getattr(state, "global_step", None) == self.step:
            st = read_status(self.out)
            assert st is not None
            os.kill(st["pid"], signal.SIGKILL)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("remote")
    p.add_argument("--pull", action="store_true")
    p.add_argument("--kill-at", type=int)
    p.add_argument("--kill-daemon-at", type=int)
    p.add_argument("--save-steps", type=int, default=4)
    p.add_argument("--save-limit", type=int)
    p.add_argument("--keep-last", type=int)
    p.add_argument("--width", type=int, default=16)
    a = p.parse_args()
    remote = None if a.remote == "-" else a.remote  # "-": CKPTSYNC_REMOTE, as the CLI
    resume = None
    if a.pull:
        step = pull_latest_checkpoint(remote, a.out)
        print(f"resumed from step {step}" if step else "fresh start", flush=True)
        resume = step is not None
    torch.manual_seed(0)
    model = TinyRegressor(a.width)
    args = TrainingArguments(
        a.out, num_train_epochs=3, per_device_train_batch_size=4, learning_rate=1e-2,
        save_strategy="steps", save_steps=a.save_steps, save_total_limit=a.save_limit,
        logging_strategy="no", report_to="none", use_cpu=True, seed=0, data_seed=0,
        dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False)
    callbacks: list[TrainerCallback] = [CkptSyncCallback(remote, keep_last=a.keep_last,
                                                         on_error="raise")]
    if a.kill_at is not None:
        callbacks.append(KillAt(a.kill_at))
    if a.kill_daemon_at is not None:
        callbacks.append(KillDaemonAt(a.out, a.kill_daemon_at))
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume or None)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()},
               os.path.join(a.out, "final.pt"))
    print(f"done at step {trainer.state.global_step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
