"""One rank of a sharded (FSDP2, gloo, CPU) job for tests/e2e/test_sharded.py.

Run as ``python tests/support/sharded_worker.py MODE DIR OUT [REMOTE]`` with torchrun's
environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Modes:

- ``save``: train 3 steps, save step 3 (every write held until that rank's save returned),
  train 2 more (their losses are the reference) while it is written, write the full
  (gathered) state at step 3 to ``OUT/expected.pt`` and a JSON report per rank;
- ``restore``: build the model with other weights, restore, write the full state to
  ``OUT/restored.pt``, train 2 steps (their losses) and report (with a remote: the name of
  every remote path this rank reached, ``remote_files``);
- ``kill``: save step 1, then save step 2 while rank 1 SIGKILLs itself at its first write;
- ``stall``: save step 1 (and wait for its upload), then save step 2 while rank 1 stalls in
  its first write, saying so in ``OUT/rank1-stalled``, until the test SIGKILLs it; the
  others record the error their save raised and exit 3;
- ``fail``: save step 1, then step 2 while rank 1's first write fails (ENOSPC); the next
  ``save`` (step 3) raises on every rank (recorded), then step 4 is saved and closed;
- ``nodes-remotefail``: two nodes, ``on_remote_error="raise"``, node 1's remote refuses
  every call: save step 1, ``wait()`` (its error recorded);
- ``nodes-save``, ``nodes-restore``: ``save``, ``restore`` with each rank a simulated node of
  its own (directory ``DIR/node<rank>``, its own uploader); with ``CKPT_TEST_GATE`` set,
  rank 1's remote stalls at its first call until that file exists (a slow node's upload).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import fsspec
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from ckptsync import Checkpointer
from ckptsync.config import storage_options_from_env
from ckptsync.local import FileOps
from ckptsync.remote import RemoteStore
from tests.support.faults import FaultFS

HOLD_S = 120  # a held write gives up: a save that never returns fails, it does not hang


class _KillAtFirstWrite(FileOps):
    armed = False
    stall_marker: Path | None = None  # stall (say so here) instead of dying
    fail_next = False  # the next write raises ENOSPC (a full disk on this rank)
    hold: Path | None = None  # every write waits until this file exists (bounded)

    def write(self, f: Any, data: Any) -> int:
        if self.hold is not None:
            deadline = time.monotonic() + HOLD_S
            while not self.hold.exists():
                if time.monotonic() > deadline:
                    raise OSError(errno.ETIMEDOUT, "held write never released: save() did "
                                  "not return before its files were written")
                time.sleep(0.05)
        if self.fail_next:
            self.fail_next = False
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        if self.armed and self.stall_marker is not None:
            self.stall_marker.write_text("")
            while True:  # a disk that stopped answering, until the test kills this rank
                time.sleep(1)
        if self.armed:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().write(f, data)


#: Printed last, after the process group is destroyed (tests/e2e/test_sharded.py reads it).
DONE = "sharded worker: done"

def _model(seed: int, world: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 6),
                            torch.nn.ReLU(), torch.nn.Linear(6, 3))
    mesh = init_device_mesh("cpu", (world,))
    for layer in m:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(m, mesh=mesh)
    return m


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> float:
    # The global batch is the same whatever the world size; each rank takes its slice.
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(8, 8, generator=g), torch.randn(8, 3, generator=g)
    rank, world = dist.get_rank(), dist.get_world_size()
    n = 8 // world
    loss = (model(x[rank * n:(rank + 1) * n]) - y[rank * n:(rank + 1) * n]).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    total = loss.detach().clone()
    dist.all_reduce(total)
    return float(total) / world


def _full(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    msd, osd = get_state_dict(model, opt,
                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {"model": msd, "optim": osd}


class _GatedStore(RemoteStore):
    gate: Any


def _gated_store(url: str, gate: Path) -> RemoteStore:
    """The remote through a :class:`FaultFS` whose first call of any kind waits for ``gate``."""
    options = storage_options_from_env()
    fs = FaultFS(fsspec.core.url_to_fs(url, **options)[0])
    store = _GatedStore(url, options, fs=fs)

    def wait() -> None:
        while not gate.exists():
            time.sleep(0.1)

    store.gate = wait
    return store


def main(mode: str, directory: str, out: str, remote: str | None = None) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    outdir = Path(out)
    report: dict[str, Any] = {"rank": rank, "world": world}
    ops = _KillAtFirstWrite()
    store = None
    if mode.startswith("nodes-"):
        mode, directory = mode[len("nodes-"):], str(Path(directory) / f"node{rank}")
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
        gate = os.environ.get("CKPT_TEST_GATE")
        if gate and rank == 1 and remote:
            store = _gated_store(remote, Path(gate))
    raising = mode == "remotefail"
    if raising and rank == 1 and remote:  # node 1's credentials are refused
        store = RemoteStore(remote, storage_options_from_env(), fs=FaultFS(
            fsspec.core.url_to_fs(remote, **storage_options_from_env())[0]))
        store.fs.set_outage(PermissionError(13, "Access Denied (injected)"))  # type: ignore[attr-defined]
    if mode == "restore" and remote and store is None:  # records every path it reaches
        store = RemoteStore(remote, storage_options_from_env(), fs=FaultFS(
            fsspec.core.url_to_fs(remote, **storage_options_from_env())[0]))
    model = _model(0 if mode != "restore" else 7, world)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    ck = Checkpointer(directory, remote=remote, file_ops=ops, remote_store=store,
                      on_remote_error="raise" if raising else "warn", close_timeout=30)
    if isinstance(store, _GatedStore):
        for key in ("cat_file", "cat", "exists", "info", "ls", "find", "open:rb", "open:wb"):
            store.fs.fail_on(key, nth=1, exc=store.gate)  # type: ignore[attr-defined]
    if mode in ("save", "kill", "stall"):
        for step in range(3):
            _step(model, opt, step)
        torch.manual_seed(500 + rank)  # each rank's own RNG stream
        if mode in ("kill", "stall"):
            ck.save(1, model=model, optim=opt)
            ck.wait()  # step 1 durable (and remote, with a remote) before step 2
            ops.armed = rank == 1
            if mode == "stall":
                ops.stall_marker = outdir / "rank1-stalled"
            report["expected"] = True
            full = _full(model, opt)
            if rank == 0:
                torch.save(full, outdir / "expected.pt")
                (outdir / "rank0-ready").write_text("")
            if mode == "stall":
                try:
                    ck.save(2, model=model, optim=opt)  # rank 1 is killed in its write
                    ck.wait()  # ... which the save of step 2 raises here
                    report["save2_returned"] = True
                except Exception as e:
                    report["save2_error"] = f"{type(e).__name__}: {e}"
                (outdir / f"rank{rank}.json").write_text(json.dumps(report))
                os._exit(3)  # the process group lost a rank: no orderly teardown
            ck.save(2, model=model, optim=opt)  # rank 1 dies inside; rank 0 must not commit
            ck.wait()
            report["save2_returned"] = True
        else:
            # Every write waits until this rank's save has returned and training went on:
            # a save that returned only once committed would never return (bounded: fails).
            release = outdir / f"release{rank}"
            ops.hold = release
            h = ck.save(3, model=model, optim=opt, metrics={"loss": 1.5}, extra={"lr": 0.05})
            report["handle_done"] = h.done()
            report["committed_at_return"] = [m.step for m in ck.list()]
            report["draws"] = torch.rand(3).tolist()
            full = _full(model, opt)
            if rank == 0:
                torch.save(full, outdir / "expected.pt")
            # Training changes the weights in place while the snapshot is being written.
            report["losses"] = [_step(model, opt, s) for s in (3, 4)]
            release.write_text("")
            m = h.wait()  # every rank: only once the checkpoint is committed
            report["waited"] = m.name if m is not None else None
            report["committed_after_wait"] = [m.step for m in ck.list()]
            ops.hold = None
    elif mode == "remotefail":
        _step(model, opt, 0)
        ck.save(1, model=model, optim=opt)
        try:
            ck.wait()  # node 1's upload fails: raised on every rank
            report["waited"] = True
        except Exception as e:
            report["wait_error"] = f"{type(e).__name__}: {e}"
    elif mode == "fail":
        for step in range(3):
            _step(model, opt, step)
        ck.save(1, model=model, optim=opt)
        ck.wait()
        ops.fail_next = rank == 1  # rank 1's disk is full for one write
        ck.save(2, model=model, optim=opt)  # returns: the write fails in the background
        report["save2_returned"] = True
        _step(model, opt, 3)
        try:
            ck.save(3, model=model, optim=opt)  # the next call raises, on every rank
        except Exception as e:
            report["save3_error"] = f"{type(e).__name__}: {e}"
        ck.save(4, model=model, optim=opt)  # the process group is still usable
        ck.wait()
        report["steps"] = [m.step for m in ck.list()]
        full = _full(model, opt)
        if rank == 0:
            torch.save(full, outdir / "expected.pt")
    else:
        torch.manual_seed(999)
        info = ck.restore(model=model, optim=opt)
        assert info is not None, "nothing restored"
        report["step"] = info.step
        report["name"] = info.name
        report["extra"] = info.extra
        report["metrics"] = info.metrics
        report["draws"] = torch.rand(3).tolist()
        full = _full(model, opt)
        if rank == 0:
            torch.save(full, outdir / "restored.pt")
        report["losses"] = [_step(model, opt, s) for s in (3, 4)]
        if store is not None and isinstance(store.fs, FaultFS):
            report["remote_files"] = sorted({Path(p).name for _, p in store.fs.calls})
    ck.close()
    (outdir / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()  # gloo: no rank tears down while a peer still talks to it
    dist.destroy_process_group()
    print(DONE, flush=True)  # everything this rank does is done: only the teardown is left


if __name__ == "__main__":
    main(*sys.argv[1:])
