"""The tiny GPT trainer as most people write it: its own ``torch.save``, no ckptsync at all.

Synced by ``ckptsync watch`` alone (zero-code mode); resumed after ``ckptsync pull`` with the
script's own ``--resume`` flag. See README.md beside this file for the recipe.

The checkpoint is one file, ``CKPT_DIR/ckpt.pt``, written the careful way (a temporary file,
then ``os.replace``), holding everything an exact resume needs: model, AdamW, the LR schedule,
the data sampler's position and the torch RNG (dropout). The model and data classes are the
ones of ``examples/train_tiny_lm.py`` (imported, not copied); the training loop below is what
matters here, and it never calls ckptsync.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from train_tiny_lm import DATA, CharTokenizer, RandomBatches, TinyGPT


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="tiny GPT with plain torch.save checkpoints")
    p.add_argument("--ckpt-dir", default="out/zero-code", help="where ckpt.pt is written")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--save-every", type=int, default=20)
    p.add_argument("--resume", action="store_true", help="load CKPT_DIR/ckpt.pt if it exists")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-file", default=None, help="append one JSON line per step")
    p.add_argument("--final-weights", default=None, help="torch.save the final weights here")
    p.add_argument("--sleep-per-step", type=float, default=0.0, help="seconds (for demos)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    text = DATA.read_text()
    tok = CharTokenizer(text)
    data = RandomBatches(tok.encode(text), 64, 16, seed=args.seed + 1)
    model = TinyGPT(tok.vocab_size, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    warmup = min(20, max(args.steps - 1, 1))
    scheduler = torch.optim.lr_scheduler.SequentialLR(
        optimizer,
        [torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=warmup),
         torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(args.steps - warmup, 1),
                                                    eta_min=3e-4)],
        milestones=[warmup],
    )

    ckpt_dir = Path(args.ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = ckpt_dir / "ckpt.pt"
    start = 1
    if args.resume and ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        data.load_state_dict(state["data"])
        torch.set_rng_state(state["torch_rng"])
        start = state["step"] + 1
        print(f"resumed from {ckpt_path} (step {state['step']})", flush=True)

    log = open(args.log_file, "a" if args.resume else "w") if args.log_file else None  # noqa: SIM115
    model.train()
    for step in range(start, args.steps + 1):
        x, y = data.next()
        logits = model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if log is not None:
            log.write(json.dumps({"step": step, "loss": loss.item()}) + "\n")
            log.flush()
        if step % args.save_every == 0:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "data": data.state_dict(),
                     "torch_rng": torch.get_rng_state(), "step": step}
            tmp = ckpt_path.with_suffix(".pt.tmp")
            torch.save(state, tmp)
            os.replace(tmp, ckpt_path)  # readers see the old file or the new one, never half
        if args.sleep_per_step:
            time.sleep(args.sleep_per_step)
    if log is not None:
        log.close()
    if args.final_weights:
        torch.save(model.state_dict(), args.final_weights)
    print(f"done at step {args.steps}", flush=True)


if __name__ == "__main__":
    main()
