"""FSDP2 training with sharded ckptsync checkpoints, on CPU with gloo (copy it for GPUs/NCCL).

Each rank writes its own shard files through torch.distributed.checkpoint; ckptsync hashes
them while they are written, lists every rank's files in one manifest and commits the
checkpoint once all of them are durable. Resume works on another number of processes.
The lines that use ckptsync are marked ``# ckptsync``.

    cd examples/distributed
    torchrun --standalone --nproc_per_node 2 train_fsdp.py --ckpt-dir ckpts --steps 20
    # ... killed at any moment ...
    torchrun --standalone --nproc_per_node 2 train_fsdp.py --ckpt-dir ckpts --steps 40
    # or on another world size (DCP reshards):
    torchrun --standalone --nproc_per_node 1 train_fsdp.py --ckpt-dir ckpts --steps 60
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from ckptsync import Checkpointer  # ckptsync

GLOBAL_BATCH = 16


def build(world: int) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(),
                          nn.Linear(64, 4))
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of the step's global batch (the same data whatever the world size)."""
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(GLOBAL_BATCH, 32, generator=g), torch.randn(GLOBAL_BATCH, 4, generator=g)
    n = GLOBAL_BATCH // world
    return x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt-dir", required=True)
    ap.add_argument("--remote", default=None, help="fsspec URL, e.g. s3://bucket/run")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--save-every", type=int, default=5)
    args = ap.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # "nccl" on GPUs
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build(world)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    ckpt = Checkpointer(args.ckpt_dir, remote=args.remote, keep_last=3)  # ckptsync
    # ckptsync: every rank, any world size; fresh_ok: a remote that holds nothing yet is a new run
    info = ckpt.restore(model=model, optimizer=opt, fresh_ok=True)
    start = info.step + 1 if info else 0
    for step in range(start, args.steps):
        x, y = batch(step, rank, world)
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        if rank == 0:
            print(f"step {step} loss {total.item() / world:.6f}", flush=True)
        if step % args.save_every == 0 or step == args.steps - 1:
            ckpt.save(step, model=model, optimizer=opt)  # ckptsync: every rank writes its shards
    ckpt.close()  # ckptsync
    dist.barrier()  # gloo: no rank tears down while a peer still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
