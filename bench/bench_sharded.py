"""Sharded save over 2 ranks (FSDP2 on CPU, gloo): the stall and the time to durable of
ckptsync's sharded save, side by side with DCP's own ``async_save`` to the same disk and to
S3 through DCP's fsspec writer (``FsspecWriter`` over s3fs).

The state is ``ctx.size`` (~1 GB with ``--full --sizes large``, ~0.15 GB in ``--quick``),
sharded over the two ranks. Each rank is a process started as ``torchrun`` would
(``python -m bench.bench_sharded --worker SPEC``); contenders alternate run by run. A run's
figure is the slowest rank's (the ranks train in lockstep: the slowest one stalls both).

- stall: ``save`` / ``async_save`` until it returns (the staging copy);
- durable: until every rank's files are fsynced and the checkpoint committed (ckptsync:
  ``wait()``, its manifest renamed into place; DCP: the future, its ``.metadata`` written),
  for S3 until the checkpoint is committed in the bucket (ckptsync: the in-process upload
  and the create-only manifest; DCP: every object and ``.metadata`` put).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, Ctx, Table, Target

OURS, DCP = "ckptsync sharded save, local", "dcp.async_save (reused stager), local"
OURS_S3, DCP_S3 = "ckptsync sharded save + upload, S3", "dcp.async_save, S3 (FsspecWriter)"
WORLD = 2
TIMEOUT_S = 3600


def run(ctx: Ctx) -> list[Table]:
    spec = {"width": ctx.size.width, "layers": ctx.size.layers, "runs": ctx.runs,
            "warmup": not ctx.quick, "tmp": str(ctx.tmp / "sharded"),
            "s3": ctx.s3("sharded"), "storage_options": ctx.storage_options}
    Path(spec["tmp"]).mkdir()
    spec_path = ctx.tmp / "sharded-spec.json"
    spec_path.write_text(json.dumps(spec))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(WORLD):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                   LOCAL_WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), PYTHONPATH=str(ROOT))
        procs.append(subprocess.Popen([sys.executable, "-m", "bench.bench_sharded", "--worker",
                                       str(spec_path)], env=env, cwd=ROOT))
    try:
        for p in procs:
            if p.wait(timeout=TIMEOUT_S) != 0:
                raise RuntimeError(f"a rank of the sharded benchmark exited {p.returncode}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    per_rank = [json.loads((Path(spec["tmp"]) / f"rank{r}.json").read_text())
                for r in range(WORLD)]
    names = list(per_rank[0]["samples"])
    stall: dict[str, list[float]] = {}
    durable: dict[str, list[float]] = {}
    for n in names:
        runs = zip(*(r["samples"][n] for r in per_rank), strict=True)
        pairs = [(max(s for s, _ in run), max(d for _, d in run)) for run in runs]
        stall[n] = [s for s, _ in pairs]
        durable[n] = [d for _, d in pairs]
    errors = per_rank[0]["errors"]
    notes = [f"{n}: unavailable: {e}" for n, e in errors.items()]
    gb = ctx.size.nbytes / 1e9
    return [
        Table(f"sharded stall: save() blocking time, {gb:.2f} GB over {WORLD} ranks (FSDP2, "
              "CPU, gloo)", "s", stall, baseline=DCP,
              targets=[Target("<= dcp.async_save", OURS, [DCP], 1.0)], notes=notes),
        Table(f"sharded time to durable: save() -> committed, {gb:.2f} GB over {WORLD} ranks",
              "s", durable, baseline=DCP,
              targets=[Target("<= 1.2x dcp.async_save (digests, manifest, commit)", OURS,
                              [DCP], 1.2)], notes=notes),
    ]


# ---------------------------------------------------------------------- one rank
def _worker(spec_path: str) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from bench.bench_durable import perturb
    from ckptsync import Checkpointer

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tmp = Path(spec["tmp"])
    torch.manual_seed(0)
    width = spec["width"]
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width)
                                  for _ in range(spec["layers"])])
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, width)).sum().backward()
    opt.step()  # the optimizer's state exists
    opt.zero_grad(set_to_none=True)

    ours = Checkpointer(tmp / "ours", keep_last=1, rng=False)
    ours_s3 = Checkpointer(tmp / "ours-s3", remote=f"{spec['s3']}/ours",
                           storage_options=spec["storage_options"], keep_last=1, rng=False,
                           on_remote_error="raise")
    group = dist.new_group(backend="gloo")  # DCP's advice for async_save: a group of its own
    stager = DefaultStager(StagingOptions(False, False, False, False))
    step = 0

    def ckptsync_save(ck: Any) -> tuple[float, float]:
        t0 = time.perf_counter()
        ck.save(step, model=model, optim=opt)
        t1 = time.perf_counter()
        ck.wait()
        return t1 - t0, time.perf_counter() - t0

    def dcp_save(s3: bool) -> tuple[float, float]:
        if s3:
            from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

            writer: Any = FsspecWriter(f"{spec['s3']}/dcp/{step}", **spec["storage_options"])
        else:
            writer = FileSystemWriter(str(tmp / f"dcp-{step}"), sync_files=True)
        t0 = time.perf_counter()
        sd = {"model": get_model_state_dict(model),
              "optim": get_optimizer_state_dict(model, opt)}
        fut = dcp.async_save(sd, storage_writer=writer, process_group=group,
                             async_stager=stager)
        t1 = time.perf_counter()
        fut.result()  # type: ignore[union-attr]
        return t1 - t0, time.perf_counter() - t0

    contenders = {OURS: lambda: ckptsync_save(ours), DCP: lambda: dcp_save(False),
                  OURS_S3: lambda: ckptsync_save(ours_s3), DCP_S3: lambda: dcp_save(True)}
    samples: dict[str, list[tuple[float, float]]] = {n: [] for n in contenders}
    errors: dict[str, str] = {}
    for i in range(spec["runs"] + (1 if spec["warmup"] else 0)):
        for name, fn in contenders.items():
            if name in errors:
                continue
            step += 1
            perturb(model, opt)  # every tensor changes, as after a training step: no file
            dist.barrier()       # is unchanged (else the S3 rows copy it server-side)
            try:
                got = fn()
            except (Exception, CheckpointException) as e:  # alike on every rank (collective)
                errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                continue
            if i > 0 or not spec["warmup"]:
                samples[name].append(got)
            dist.barrier()
            if rank == 0:  # a ~1 GB copy per DCP run: keep the disk to one of them
                for d in tmp.glob("dcp-*"):
                    shutil.rmtree(d, ignore_errors=True)
    ours.close()
    ours_s3.close()
    stager.close()
    (tmp / f"rank{rank}.json").write_text(json.dumps({"samples": samples, "errors": errors}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    sys.path.insert(0, str(ROOT))
    _worker(sys.argv[2])
