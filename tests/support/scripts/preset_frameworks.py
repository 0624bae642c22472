"""Each framework's own checkpointing on CPU, for the ``watch --preset`` tests.

``python preset_frameworks.py FRAMEWORK --dir DIR --steps N [--resume]`` trains a tiny model
for N steps (saving every 2) with the framework's own save, nothing of ckptsync; with
``--resume`` it first resumes with the framework's own resume. It prints ``resumed from step
S`` (S = the step the framework resumed at) and ``trained to step N``; ``dcp --check``
``dcp.load``s the newest step directory and prints ``dcp equal step S`` when it equals what
was saved. FRAMEWORK: hf-trainer, lightning, accelerate, dcp (the preset names).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch


def hf_trainer(out: Path, steps: int, resume: bool) -> None:
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=32,
                                       n_positions=16))
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids}
            for ids in torch.randint(0, 32, (64, 8), generator=g)]

    class Report(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
            if resume:
                print(f"resumed from step {state.global_step}", flush=True)

    args = TrainingArguments(output_dir=str(out), max_steps=steps, save_steps=2,
                             per_device_train_batch_size=2, report_to=[], use_cpu=True,
                             logging_strategy="no", save_total_limit=2, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[Report()])
    trainer.train(resume_from_checkpoint=True if resume else None)
    print(f"trained to step {trainer.state.global_step}", flush=True)


def lightning(out: Path, steps: int, resume: bool) -> None:
    import lightning.pytorch as pl

    class Model(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)

        def training_step(self, batch, i):  # type: ignore[no-untyped-def]
            return self.lin(batch[0]).pow(2).mean()

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def on_train_start(self) -> None:
            if resume:
                print(f"resumed from step {self.trainer.global_step}", flush=True)

    pl.seed_everything(0)
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=4)  # 2 steps/epoch
    trainer = pl.Trainer(default_root_dir=str(out), max_epochs=steps // 2, logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[pl.callbacks.ModelCheckpoint(save_last=True)])
    trainer.fit(Model(), data, ckpt_path="last" if resume else None)
    print(f"trained to step {trainer.global_step}", flush=True)


def accelerate(out: Path, steps: int, resume: bool) -> None:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    class Counter:
        step = 0

        def state_dict(self) -> dict[str, int]:
            return {"step": self.step}

        def load_state_dict(self, d: dict[str, int]) -> None:
            self.step = d["step"]

    acc = Accelerator(cpu=True, project_config=ProjectConfiguration(
        project_dir=str(out), automatic_checkpoint_naming=True, total_limit=2))
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    counter = Counter()
    acc.register_for_checkpointing(counter)
    if resume:
        acc.load_state()  # Accelerate's own resume: the highest checkpoint_N
        print(f"resumed from step {counter.step}", flush=True)
        names = sorted(os.listdir(out / "checkpoints"))
        acc.project_configuration.iteration = int(names[-1].rsplit("_", 1)[1]) + 1
    while counter.step < steps:
        loss = model(torch.randn(8, 4)).pow(2).mean()
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
        counter.step += 1
        if counter.step % 2 == 0:
            acc.save_state()
    print(f"trained to step {counter.step}", flush=True)


def _dcp_state(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(64, 32, generator=g), "step": torch.tensor(step)}


def dcp(out: Path, steps: int, check: bool) -> None:
    import torch.distributed.checkpoint as dcp

    if check:
        newest = max((p for p in out.iterdir() if p.name.startswith("step_")),
                     key=lambda p: int(p.name.split("_")[1]))
        step = int(newest.name.split("_")[1])
        state = {k: torch.zeros_like(v) for k, v in _dcp_state(step).items()}
        dcp.load(state, checkpoint_id=str(newest))
        want = _dcp_state(step)
        if all(torch.equal(state[k], want[k]) for k in want):
            print(f"dcp equal step {step}", flush=True)
        return
    for step in range(2, steps + 1, 2):
        dcp.save(_dcp_state(step), checkpoint_id=str(out / f"step_{step}"))
    print(f"trained to step {steps}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("framework", choices=("hf-trainer", "lightning", "accelerate", "dcp"))
    ap.add_argument("--dir", required=True, type=Path)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--resume", action="store_true", help="dcp: load and check instead")
    a = ap.parse_args()
    run = {"hf-trainer": hf_trainer, "lightning": lightning, "accelerate": accelerate,
           "dcp": dcp}[a.framework]
    run(a.dir, a.steps, a.resume)


if __name__ == "__main__":
    main()
