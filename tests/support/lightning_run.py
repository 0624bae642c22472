"""A tiny deterministic Lightning run that checkpoints through ckptsync (for the tests).

``python -m tests.support.lightning_run --dir D --remote URL --epochs N [--resume]
[--kill-at-epoch K] [--out W] [--batch-sleep S] [--report-resume]``: trains on CPU with
``ModelCheckpoint(dirpath=D, save_last=True, save_top_k=2)``; ``--resume`` first pulls the
newest checkpoint into ``D`` and fits with ``ckpt_path="last"``; ``--kill-at-epoch K`` waits
for the uploads two batches into epoch K and SIGKILLs itself (a crash mid-epoch); ``--out``
saves the final weights; ``--batch-sleep`` paces the batches (a training step's time);
``--report-resume`` exits as soon as training starts, having printed the step it resumed at.
``slowfile://`` remotes (tests/support/slowfs.py) are known. Prints ``training started``
once the first batch may run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from ckptsync.integrations.lightning import CkptSyncCheckpointIO
from tests.support import slowfs


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
                                       torch.nn.Linear(16, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=1e-2)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)]

    def train_dataloader(self) -> DataLoader[Any]:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 8, generator=g)
        y = x.sum(1, keepdim=True).sin()
        return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


class KillMidEpoch(Callback):
    def __init__(self, io: CkptSyncCheckpointIO, epoch: int) -> None:
        self.io, self.epoch = io, epoch

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.current_epoch == self.epoch and trainer.global_step % 4 == 2:
            self.io.wait(120)  # what was saved is remote: the crash is what the test is about
            os.kill(os.getpid(), signal.SIGKILL)


class Report(Callback):
    def __init__(self, *, exit_at_start: bool = False, batch_sleep: float = 0.0) -> None:
        self.exit_at_start, self.batch_sleep = exit_at_start, batch_sleep

    def on_train_start(self, trainer: pl.Trainer, *args: Any) -> None:
        print(f"resumed from step {trainer.global_step}" if trainer.global_step
              else "started from step 0", flush=True)
        if self.exit_at_start:
            sys.stdout.flush()
            os._exit(0)
        print("training started", flush=True)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.batch_sleep:
            time.sleep(self.batch_sleep)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--remote", required=True)
    ap.add_argument("--storage-options", default="{}")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--kill-at-epoch", type=int)
    ap.add_argument("--out")
    ap.add_argument("--batch-sleep", type=float, default=0.0)
    ap.add_argument("--report-resume", action="store_true")
    a = ap.parse_args()
    slowfs.register()
    pl.seed_everything(0, workers=True)
    io = CkptSyncCheckpointIO(a.remote, storage_options=json.loads(a.storage_options))
    if a.resume:
        print(f"pulled {io.pull_latest(a.dir)}", flush=True)
    callbacks: list[Callback] = [
        ModelCheckpoint(dirpath=a.dir, save_last=True, save_top_k=2, monitor="train_loss",
                        filename="{epoch}-{step}"),
        Report(exit_at_start=a.report_resume, batch_sleep=a.batch_sleep)]
    if a.kill_at_epoch is not None:
        callbacks.append(KillMidEpoch(io, a.kill_at_epoch))
    trainer = pl.Trainer(max_epochs=a.epochs, accelerator="cpu", devices=1, deterministic=True,
                         plugins=[io], callbacks=callbacks, logger=False,
                         enable_progress_bar=False, enable_model_summary=False)
    model = Tiny()
    trainer.fit(model, ckpt_path="last" if a.resume else None)
    print(f"final step {trainer.global_step}", flush=True)
    if a.out:
        torch.save(model.state_dict(), a.out)


if __name__ == "__main__":
    main()
