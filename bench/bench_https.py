"""7. The S3 rows over https: SeaweedFS's S3 gateway with TLS and a self-signed certificate
(:mod:`bench.tls`), so that every client sends unsigned payloads with checksums, as against
real S3, instead of signing each body with sha256 as over plain http. The same contenders and
tables as :mod:`bench.bench_durable`, :mod:`bench.bench_throughput` and
:mod:`bench.bench_resume`, and the S3 contenders of :mod:`bench.bench_train` (at most 3 runs:
a run of every contender takes minutes at ~1 GB), each with the client's CPU seconds per GB."""

from __future__ import annotations

import dataclasses

from bench import bench_durable, bench_resume, bench_throughput, bench_train
from bench.common import Ctx, Table

TLS = True  # bench.run starts this benchmark's server with https


def run(ctx: Ctx) -> list[Table]:
    assert ctx.ca_bundle, "bench_https needs a server started with tls=True (bench.run does)"
    train = bench_train.run(dataclasses.replace(ctx, runs=min(ctx.runs, 3)), s3_only=True)
    return [*bench_durable.run(ctx), *bench_throughput.run(ctx), *bench_resume.run(ctx), *train]
