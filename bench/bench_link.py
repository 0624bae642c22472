"""8. Bounded links: time to durable and training time lost when client and S3 (https) are
joined by a link of limited bandwidth and latency (:mod:`bench.link`, a pacing proxy in its
own process), like a Colab or spot VM to a bucket: 100 MB/s + 20 ms RTT and 25 MB/s + 50 ms.

The durable table gets a row for the link floor (state bytes / bandwidth + one round trip: no
client can do better) and a target against it. Full runs take at most 3 runs per link: at
~1 GB one save takes ~40 s on the slow link."""

from __future__ import annotations

import dataclasses
import urllib.parse

from bench import bench_durable, bench_train
from bench.common import Ctx, Table, Target
from bench.link import Link

TLS = True
LINKS = [(100.0, 20.0), (25.0, 50.0)]  # (MB/s, RTT ms)
OURS = "ckptsync save->remote commit"


def run(ctx: Ctx) -> list[Table]:
    from tests.support.servers import environ

    port = urllib.parse.urlsplit(ctx.endpoint).port
    assert port is not None
    scheme = urllib.parse.urlsplit(ctx.endpoint).scheme
    tables: list[Table] = []
    for mb_per_s, rtt_ms in LINKS:
        with Link("127.0.0.1", port, mb_per_s, rtt_ms) as link:
            endpoint = f"{scheme}://127.0.0.1:{link.port}"
            opts = {**ctx.storage_options,
                    "client_kwargs": {**ctx.storage_options["client_kwargs"],
                                      "endpoint_url": endpoint}}
            lctx = dataclasses.replace(ctx, endpoint=endpoint, storage_options=opts,
                                       link=link.label, runs=min(ctx.runs, 3))
            with environ(lctx.aws_env()):
                durable = bench_durable.run(lctx)
                train = bench_train.run(lctx, s3_only=True)
            floor = link.floor(ctx.size.nbytes)
            label = "link floor (bytes/bandwidth + 1 RTT)"
            for t in durable:
                t.rows[label] = [floor]
                t.targets.append(Target("<= 1.1x link floor", OURS, [label], 1.1))
            tables += [*durable, *train]
    return tables
