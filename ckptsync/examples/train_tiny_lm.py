"""Train a tiny MiniMind-style GPT on a bundled text corpus, with exact resume via ckptsync.

This is an ordinary PyTorch training script. The lines that use ckptsync are marked
``# ckptsync``; everything else is what you would write anyway. Remove them and add a
``torch.save`` and you have the plain script back.

    python -m ckptsync.examples.train_tiny_lm --ckpt-dir ckpts --steps 200 --save-every 20
    # ... killed at any moment (Colab timeout, spot VM pre-emption, kill -9) ...
    python -m ckptsync.examples.train_tiny_lm --ckpt-dir ckpts --steps 200 --save-every 20 --resume

The resumed run continues bit for bit where the uninterrupted one would have been: model,
AdamW moments, the warmup+cosine schedule, the data sampler's position and the dropout RNG
are all restored. On CPU it is deterministic (one thread, deterministic algorithms).

It ships inside the package (with its corpus, ``data/tiny_corpus.txt``) because ``ckptsync demo``
runs it; ``examples/train_tiny_lm.py`` of a source checkout runs this same module.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ckptsync import Checkpointer  # ckptsync

#: The corpus, package data beside this module (regenerate with examples/data/make_corpus.py).
DATA = Path(__file__).with_name("data") / "tiny_corpus.txt"


# --------------------------------------------------------------------------- data
class CharTokenizer:
    """One token per character of the corpus."""

    def __init__(self, text: str) -> None:
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.index[c] for c in text], dtype=torch.long)

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)


class RandomBatches:
    """Random windows of the token stream, drawn from its own generator.

    Its position in the random stream is part of the training state: ``state_dict()`` lets a
    resumed run draw exactly the batches the uninterrupted run would have drawn.
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int, batch_size: int, seed: int) -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.batches_drawn = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        high = len(self.tokens) - self.seq_len - 1
        starts = torch.randint(0, high, (self.batch_size,), generator=self.generator)
        x = torch.stack([self.tokens[s : s + self.seq_len] for s in starts.tolist()])
        y = torch.stack([self.tokens[s + 1 : s + 1 + self.seq_len] for s in starts.tolist()])
        self.batches_drawn += 1
        return x, y

    def state_dict(self) -> dict[str, object]:
        return {"generator": self.generator.get_state(), "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.generator.set_state(state["generator"])  # type: ignore[arg-type]
        self.batches_drawn = int(state["batches_drawn"])  # type: ignore[call-overload]


# --------------------------------------------------------------------------- model
class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.attn_drop = nn.Dropout(dropout)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_heads, c // self.n_heads).transpose(1, 2)
                   for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        y = self.attn_drop(att) @ v
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_drop(self.proj(y))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.norm2 = nn.RMSNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model, bias=False),
            nn.SiLU(),
            nn.Linear(4 * d_model, d_model, bias=False),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyGPT(nn.Module):
    """Token + position embeddings, pre-norm transformer blocks, RMSNorm, tied output head."""

    def __init__(self, vocab_size: int, seq_len: int, d_model: int = 64, n_layers: int = 2,
                 n_heads: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, dropout) for _ in range(n_layers))
        self.norm = nn.RMSNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.tok.weight  # tied
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.drop(self.tok(idx) + self.pos(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


# --------------------------------------------------------------------------- training
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt-dir", default="out/tiny-lm-ckpts", help="local checkpoint directory")
    p.add_argument("--remote", default=None, help="fsspec URL to sync checkpoints to (optional)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--save-every", type=int, default=20)
    p.add_argument("--resume", action="store_true", help="resume from the newest checkpoint")
    p.add_argument("--allow-empty", action="store_true",
                   help="with --resume and --remote: a remote that holds nothing yet is a new "
                        "run (without it, such a prefix, a typo?, is an error)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--keep-last", type=int, default=None)
    p.add_argument("--log-file", default=None, help="append one JSON line per step")
    p.add_argument("--final-weights", default=None, help="torch.save the final weights here")
    p.add_argument("--sleep-per-step", type=float, default=0.0, help="seconds (for demos)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--demo", action="store_true", help="train with the defaults and report")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # bit-exact on CPU: no thread-count dependent reductions
    torch.use_deterministic_algorithms(True)
    device = torch.device(args.device)

    text = DATA.read_text()
    tok = CharTokenizer(text)
    data = RandomBatches(tok.encode(text), args.seq_len, args.batch_size, seed=args.seed + 1)
    model = TinyGPT(tok.vocab_size, args.seq_len, args.d_model, args.n_layers,
                    dropout=args.dropout).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    warmup = min(args.warmup, max(args.steps - 1, 1))
    scheduler = torch.optim.lr_scheduler.SequentialLR(
        optimizer,
        [torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=warmup),
         torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(args.steps - warmup, 1),
                                                    eta_min=args.lr / 10)],
        milestones=[warmup],
    )
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")

    ckpt = Checkpointer(args.ckpt_dir, remote=args.remote,  # ckptsync
                        keep_last=args.keep_last)  # ckptsync
    start = 1
    if args.resume:
        info = ckpt.restore(model=model, optimizer=optimizer, scheduler=scheduler,  # ckptsync
                            scaler=scaler, data=data, fresh_ok=args.allow_empty)  # ckptsync
        if info is not None:
            start = (info.step or 0) + 1  # this trainer always saves with a step
            print(f"resumed from {info.name} (step {info.step})", flush=True)

    log = open(args.log_file, "a" if args.resume else "w") if args.log_file else None  # noqa: SIM115
    t0 = time.perf_counter()
    model.train()
    for step in range(start, args.steps + 1):
        x, y = data.next()
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.view(-1))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()

        if log is not None:
            log.write(json.dumps({"step": step, "loss": loss.item()}) + "\n")
            log.flush()
        if step % 50 == 0 or step == args.steps:
            print(f"step {step:5d}  loss {loss.item():.4f}  "
                  f"lr {scheduler.get_last_lr()[0]:.2e}", flush=True)
        if step % args.save_every == 0:
            ckpt.save(step, model=model, optimizer=optimizer, scheduler=scheduler,  # ckptsync
                      scaler=scaler, data=data,  # ckptsync
                      metrics={"loss": loss.item()}, extra=vars(args))  # ckptsync
        if args.sleep_per_step:
            time.sleep(args.sleep_per_step)

    ckpt.close()  # ckptsync: wait until the last checkpoint is durable (and uploaded)
    if log is not None:
        log.close()
    if args.final_weights:
        torch.save(model.state_dict(), args.final_weights)
    print(f"done: {args.steps - start + 1} steps in {time.perf_counter() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()
