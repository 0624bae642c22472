"""2. Time to durable: from ``save`` until the checkpoint is committed in S3."""

from __future__ import annotations

import copy
import time
import uuid
from typing import Any

import torch

from bench.common import Ctx, Table, Target, make_state, measure, over, state_dict
from bench.peers import (
    DcpAsync,
    TorchSnapshot,
    dcp_save,
    rmtree,
    torch_save_fsync,
    torch_save_upload,
)
from bench.rust_peers import Lazy, Obstore, S3TorchConnector

OURS = "ckptsync save->remote commit"
OURS_THREAD = "ckptsync save->remote commit, upload thread (streamed)"
S3TC_WRITER = "torch.save -> s3torchconnector S3Checkpoint.writer"


def perturb(model: Any, opt: Any) -> None:
    """Change every tensor (as a training step would), so no file is unchanged."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3)
        for st in opt.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor) and v.dim() > 0:
                    v.add_(1e-3)


def run(ctx: Ctx) -> list[Table]:
    from ckptsync import Checkpointer

    model, opt = make_state(ctx.size)
    client = ctx.boto3()
    ours = Checkpointer(ctx.fresh_dir("ours-durable"), remote=ctx.s3("durable-ours"),
                        storage_options=ctx.storage_options, keep_last=1)
    ours_thread = Checkpointer(ctx.fresh_dir("ours-durable-t"), remote=ctx.s3("durable-ours-t"),
                               storage_options=ctx.storage_options, keep_last=1,
                               upload_process=False)
    dcp_async = DcpAsync(async_staging=False)
    dcp_async_s3tc = DcpAsync(async_staging=False)
    s3tc = Lazy(S3TorchConnector, ctx)
    obs = Lazy(Obstore, ctx)
    local = ctx.fresh_dir("peer-durable")
    p = lambda: perturb(model, opt)  # noqa: E731

    def ours_fn() -> None:
        ours.save(1, model=model, optimizer=opt)
        ours.wait()

    def ours_thread_fn() -> None:
        ours_thread.save(1, model=model, optimizer=opt)
        ours_thread.wait()

    def save_boto3() -> None:
        torch_save_upload(state_dict(model, opt), local / "ckpt.pt", client, ctx.bucket,
                          f"durable-boto3/{uuid.uuid4().hex}/ckpt.pt")

    def dcp_s3() -> None:
        dcp_save(state_dict(model, opt), ctx.s3("durable-dcp", uuid.uuid4().hex), ctx)

    def dcp_async_s3() -> None:
        dcp_async.save(state_dict(model, opt), ctx.s3("durable-dcpa", uuid.uuid4().hex), ctx)
        dcp_async.wait()

    def ts_s3() -> None:
        ts = TorchSnapshot()
        ts.take({"model": model, "optimizer": opt}, ctx.s3("durable-ts", uuid.uuid4().hex))

    def s3tc_writer() -> None:
        s3tc().torch_save(state_dict(model, opt), ctx.s3("durable-s3tc", uuid.uuid4().hex,
                                                         "ckpt.pt"))

    def dcp_s3tc() -> None:
        url = ctx.s3("durable-dcp-s3tc", uuid.uuid4().hex)
        dcp_save(state_dict(model, opt), url, writer=s3tc().storage_writer(url))

    def dcp_async_s3tc_fn() -> None:
        url = ctx.s3("durable-dcpa-s3tc", uuid.uuid4().hex)
        dcp_async_s3tc.save(state_dict(model, opt), url, writer=s3tc().storage_writer(url))
        dcp_async_s3tc.wait()

    def save_obstore() -> None:
        store = obs()
        torch_save_fsync(state_dict(model, opt), local / "ckpt-obstore.pt")
        store.put_file(local / "ckpt-obstore.pt",
                       ctx.s3("durable-obstore", uuid.uuid4().hex, "ckpt.pt"))

    cpu: dict[str, list[float]] = {}
    rows = measure({
        OURS: ours_fn,
        OURS_THREAD: ours_thread_fn,
        "torch.save+fsync+boto3 upload_file": save_boto3,
        "dcp.save FsspecWriter s3": dcp_s3,
        "dcp.async_save FsspecWriter s3": dcp_async_s3,
        "torchsnapshot take s3": ts_s3,
        S3TC_WRITER: s3tc_writer,
        "dcp.save S3StorageWriter": dcp_s3tc,
        "dcp.async_save S3StorageWriter": dcp_async_s3tc_fn,
        "torch.save+fsync+obstore put": save_obstore,
    }, ctx, before=p, gb=ctx.size.nbytes / 1e9, cpu=cpu)
    ours.close()
    ours_thread.close()
    dcp_async.close()
    dcp_async_s3tc.close()
    rmtree(local)
    peers = [k for k in rows if not k.startswith("ckptsync")]
    # The local-commit rows throttle plain http themselves: only in the plain run.
    extra = [] if over(ctx) else local_commit_tables(ctx, model, opt)
    return [*extra, Table(
        f"time to durable in S3{over(ctx)}, {ctx.size.nbytes / 1e9:.2f} GB state", "s", rows,
        baseline="torch.save+fsync+boto3 upload_file",
        targets=[Target("<= 0.8x fastest peer", OURS, peers, 0.8),
                 Target("<= 1.0x fastest peer (at 1 GB)", OURS, peers, 1.0),
                 Target("client CPU-s/GB <= 1.3x S3Checkpoint.writer's", OURS, [S3TC_WRITER],
                        1.3, cpu=True)],
        notes=["every tensor is changed before each save, so no file is deduplicated",
               "client CPU: this process, its exited children and its Checkpointers' upload "
               "processes, per GB of state",
               "ckptsync's row uploads in its upload process (the default for S3); the "
               "thread row (upload_process=False) in a thread that streams the file while it "
               "is written",
               "the S3Checkpoint.writer and S3StorageWriter rows keep no local copy; no peer "
               "verifies what it uploaded"],
        cpu=cpu,
    )]


SLOW_LINK = 25e6  # bytes per second


def local_commit_tables(ctx: Ctx, model: Any, opt: Any) -> list[Table]:
    """The local commit of a save while a 25 MB/s link uploads it, against the same save with
    no remote: a save is paced by the disk, never by the link (DESIGN.md, "Local side")."""
    from ckptsync import Checkpointer
    from tests.support.fault_proxy import FaultProxy

    host, port = ctx.endpoint.rsplit("/", 1)[1].split(":")
    with FaultProxy(host, int(port), rate=SLOW_LINK, lifetime=24 * 3600, timeout=300) as proxy:
        slow_opts = copy.deepcopy(ctx.storage_options)
        slow_opts.setdefault("client_kwargs", {})["endpoint_url"] = proxy.endpoint
        slow = Checkpointer(ctx.fresh_dir("ours-slowlink"), remote=ctx.s3("slowlink"),
                            storage_options=slow_opts, keep_last=1)
        alone = Checkpointer(ctx.fresh_dir("ours-noremote"), keep_last=1)
        uploads: list[float] = []

        def local_commit(c: Checkpointer) -> float:
            perturb(model, opt)
            t0 = time.perf_counter()
            c.save(1, model=model, optimizer=opt).wait()  # the local commit
            t = time.perf_counter() - t0
            c.wait()  # the upload done before the next run, so each save may stream
            if c is slow:
                uploads.append(time.perf_counter() - t0)
            return t

        rows = measure({
            "ckptsync local commit, no remote": lambda: local_commit(alone),
            "ckptsync local commit, 25 MB/s link uploading": lambda: local_commit(slow),
        }, ctx)
        slow.close()
        alone.close()
    up = sorted(uploads)[len(uploads) // 2] if uploads else float("nan")
    return [Table(
        f"local commit while the link uploads, {ctx.size.nbytes / 1e9:.2f} GB state", "s", rows,
        baseline="ckptsync local commit, no remote",
        notes=[f"the link: a proxy pacing upload bodies at {SLOW_LINK / 1e6:.0f} MB/s; "
               f"save until remote commit took {up:.1f} s (median)"],
    )]
