"""6, local rows only: the training-time-lost benchmark with its local contenders alone
(no checkpoint, ``torch.save`` + fsync, ``dcp.async_save``, ckptsync), a 10 s loop instead of
15 s and no S3 contender between them, so that many paired rounds fit: this machine's run-to-run
noise (seconds) is larger than the differences between them.
``python -m bench.run --full --only train_local --runs 12``."""

from __future__ import annotations

from bench import bench_train
from bench.common import Ctx, Table


def run(ctx: Ctx) -> list[Table]:
    return bench_train.run(ctx, local_only=True)
