"""3. Upload / download throughput of one checkpoint (two files: model, optimizer)."""

from __future__ import annotations

import uuid
from pathlib import Path

from bench.common import Ctx, Table, Target, make_state, measure, over
from bench.peers import boto3_download_dir, boto3_upload_dir, rmtree, s3fs_get_dir, s3fs_put_dir
from bench.rust_peers import Lazy, Obstore, S3TorchConnector

PUSH = "ckptsync push"
PULL = "ckptsync pull (sha256+fsync)"
S3TC_PUT = "s3torchconnector put_object"
OBSTORE_GET = "obstore get->file+fsync"


def run(ctx: Ctx) -> list[Table]:
    from ckptsync import Checkpointer
    from ckptsync.local import LocalStore
    from ckptsync.remote import RemoteStore

    model, opt = make_state(ctx.size)
    src_dir = ctx.fresh_dir("tp-src")
    with Checkpointer(src_dir, rng=False) as c:
        c.save(1, model=model, optimizer=opt)
    del model, opt
    ckpt = LocalStore(src_dir).list()[-1]
    nbytes = ckpt.manifest.total_size
    client = ctx.boto3()
    fs = ctx.s3fs()
    dl_url = ctx.s3("tp-dl")
    s3tc = Lazy(S3TorchConnector, ctx)
    obs = Lazy(Obstore, ctx)
    RemoteStore(dl_url, ctx.storage_options).push(ckpt)
    stale: list[Path] = []

    def sink(prefix: str) -> Path:
        while stale:
            rmtree(stale.pop())
        d = ctx.fresh_dir(prefix)
        stale.append(d)
        return d

    def mbps(seconds: float) -> float:
        return nbytes / seconds / 1e6

    def up(fn: object) -> object:
        import time

        def go() -> float:
            t0 = time.perf_counter()
            fn()  # type: ignore[operator]
            return mbps(time.perf_counter() - t0)
        return go

    up_cpu: dict[str, list[float]] = {}
    dl_cpu: dict[str, list[float]] = {}
    up_rows = measure({
        PUSH: up(lambda: RemoteStore(ctx.s3("tp-up", uuid.uuid4().hex),
                                     ctx.storage_options).push(ckpt)),
        "boto3 upload_file": up(lambda: boto3_upload_dir(client, ckpt.path, ctx.bucket,
                                                         f"tp-boto3/{uuid.uuid4().hex}")),
        "s3fs put_file": up(lambda: s3fs_put_dir(fs, ckpt.path, ctx.s3("tp-s3fs",
                                                                       uuid.uuid4().hex))),
        S3TC_PUT: up(lambda: s3tc().put_dir(ckpt.path, ctx.s3("tp-s3tc", uuid.uuid4().hex))),
        "obstore put": up(lambda: obs().put_dir(ckpt.path, ctx.s3("tp-obstore",
                                                                  uuid.uuid4().hex))),
    }, ctx, gb=nbytes / 1e9, cpu=up_cpu)
    dl_rows = measure({
        PULL: up(lambda: RemoteStore(dl_url, ctx.storage_options)
                 .pull(None, LocalStore(sink("dl-ours")))),
        "boto3 download_file": up(lambda: boto3_download_dir(client, ctx.bucket,
                                                             f"tp-dl/{ckpt.name}",
                                                             sink("dl-boto3"))),
        "s3fs get_file": up(lambda: s3fs_get_dir(fs, f"{dl_url}/{ckpt.name}", sink("dl-s3fs"))),
        "s3torchconnector get_object+fsync": up(lambda: s3tc().get_dir(f"{dl_url}/{ckpt.name}",
                                                                       sink("dl-s3tc"))),
        OBSTORE_GET: up(lambda: obs().get_dir(f"{dl_url}/{ckpt.name}", sink("dl-obstore"))),
    }, ctx, gb=nbytes / 1e9, cpu=dl_cpu)
    rmtree(src_dir)
    gb = f"{nbytes / 1e9:.2f} GB{over(ctx)}"
    return [
        Table(f"upload throughput, {gb} checkpoint", "MB/s", up_rows, baseline="boto3 upload_file",
              higher_is_better=True,
              targets=[Target(">= 1.0x boto3", PUSH, ["boto3 upload_file"], 1.0, True),
                       Target(">= 1.3x s3fs", PUSH, ["s3fs put_file"], 1.3, True),
                       Target("client CPU-s/GB <= 1.0x s3torchconnector's", PUSH, [S3TC_PUT],
                              1.0, cpu=True)],
              notes=["ours includes re-hashing every byte sent and the manifest commit"],
              cpu=up_cpu),
        Table(f"download throughput, {gb} checkpoint", "MB/s", dl_rows,
              baseline="boto3 download_file", higher_is_better=True,
              targets=[Target(">= 1.0x boto3", PULL, ["boto3 download_file"], 1.0, True),
                       Target(">= 2x s3fs", PULL, ["s3fs get_file"], 2.0, True),
                       Target("client CPU-s/GB <= 1.0x obstore's", PULL, [OBSTORE_GET], 1.0,
                              cpu=True)],
              notes=["ours verifies each file's digest (BLAKE3 since ckptsync/2) and fsyncs; "
                     "the peers verify nothing, and only the +fsync rows fsync"], cpu=dl_cpu),
    ]
