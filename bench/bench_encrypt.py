"""Client-side encryption's cost: push and pull throughput and client CPU per GB, with and
without a key (AES-256-GCM in 1 MiB chunks, :mod:`ckptsync.crypto`), same state, same server,
runs alternating. Encrypted pushes on S3 go through one sequential multipart stream per file
(no parallel parts from the file: the stored bytes are hashed in order while encrypted)."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

from bench.common import Ctx, Table, Target, make_state, measure, over
from bench.peers import rmtree


def run(ctx: Ctx) -> list[Table]:
    from ckptsync import Checkpointer
    from ckptsync.crypto import KeyRing
    from ckptsync.local import LocalStore
    from ckptsync.remote import RemoteStore

    keys = KeyRing((os.urandom(32),))
    model, opt = make_state(ctx.size)
    src_dir = ctx.fresh_dir("enc-src")
    with Checkpointer(src_dir, rng=False) as c:
        c.save(1, model=model, optimizer=opt)
    del model, opt
    ckpt = LocalStore(src_dir).list()[-1]
    nbytes = ckpt.manifest.total_size
    plain_url, enc_url = ctx.s3("enc-dl-plain"), ctx.s3("enc-dl-enc")
    RemoteStore(plain_url, ctx.storage_options).push(ckpt)
    RemoteStore(enc_url, ctx.storage_options, keys=keys).push(ckpt)
    stale: list[Path] = []

    def sink(prefix: str) -> Path:
        while stale:
            rmtree(stale.pop())
        d = ctx.fresh_dir(prefix)
        stale.append(d)
        return d

    def timed(fn: object) -> object:
        def go() -> float:
            t0 = time.perf_counter()
            fn()  # type: ignore[operator]
            return nbytes / (time.perf_counter() - t0) / 1e6
        return go

    def push(k: KeyRing | None) -> object:
        return timed(lambda: RemoteStore(ctx.s3("enc-up", uuid.uuid4().hex), ctx.storage_options,
                                         keys=k).push(ckpt))

    def pull(url: str, k: KeyRing | None) -> object:
        return timed(lambda: RemoteStore(url, ctx.storage_options, keys=k)
                     .pull(None, LocalStore(sink("enc-dl"))))

    up_cpu: dict[str, list[float]] = {}
    dl_cpu: dict[str, list[float]] = {}
    up_rows = measure({"ckptsync push": push(None), "ckptsync push, encrypted": push(keys)},
                      ctx, gb=nbytes / 1e9, cpu=up_cpu)  # type: ignore[dict-item]
    dl_rows = measure({"ckptsync pull": pull(plain_url, None),
                       "ckptsync pull, encrypted": pull(enc_url, keys)},
                      ctx, gb=nbytes / 1e9, cpu=dl_cpu)  # type: ignore[dict-item]
    rmtree(src_dir)
    gb = f"{nbytes / 1e9:.2f} GB{over(ctx)}"
    return [
        Table(f"encryption: upload throughput, {gb} checkpoint", "MB/s", up_rows,
              baseline="ckptsync push", higher_is_better=True,
              targets=[Target(">= 0.8x unencrypted", "ckptsync push, encrypted",
                              ["ckptsync push"], 0.8, True)],
              notes=["encrypted: AES-256-GCM + BLAKE3 of the stored bytes in the same pass"],
              cpu=up_cpu),
        Table(f"encryption: download throughput, {gb} checkpoint", "MB/s", dl_rows,
              baseline="ckptsync pull", higher_is_better=True,
              targets=[Target(">= 0.8x unencrypted", "ckptsync pull, encrypted",
                              ["ckptsync pull"], 0.8, True)],
              notes=["encrypted: stored digest, decryption and plaintext digest in one pass"],
              cpu=dl_cpu),
    ]
