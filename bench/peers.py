"""The peers, each as small functions on the same state: what a user would write instead."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from bench.common import Ctx, fsync_tree

# ------------------------------------------------------------------ copy floor


class CopyFloor:
    """Copy the state into preallocated CPU buffers: the least any snapshot can cost."""

    def __init__(self, sd: dict[str, Any]) -> None:
        self.tensors = [t for t in _tensors(sd)]
        self.bufs = [torch.empty_like(t, device="cpu") for t in self.tensors]

    def __call__(self) -> None:
        for b, t in zip(self.bufs, self.tensors, strict=True):
            b.copy_(t)


def _tensors(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _tensors(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _tensors(v)]
    return []


# ------------------------------------------------------------------ torch.save


def torch_save_fsync(sd: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        torch.save(sd, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


# ------------------------------------------------------------------ DCP


def dcp_save(sd: dict[str, Any], where: str | Path, ctx: Ctx | None = None,
             writer: Any = None) -> None:
    """``dcp.save`` to ``where`` through ``writer`` (default: FileSystemWriter for a path,
    FsspecWriter for s3://)."""
    import torch.distributed.checkpoint as dcp

    if writer is None:
        writer = _dcp_writer(where, ctx)
    dcp.save(sd, storage_writer=writer, no_dist=True)
    if not str(where).startswith("s3://"):
        fsync_tree(Path(where))


def _dcp_writer(where: str | Path, ctx: Ctx | None) -> Any:
    if str(where).startswith("s3://"):
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        assert ctx is not None
        return FsspecWriter(str(where), **ctx.storage_options)
    from torch.distributed.checkpoint import FileSystemWriter

    return FileSystemWriter(str(where), sync_files=True)


class DcpAsync:
    """``dcp.async_save`` with a stager reused across saves (its best CPU configuration)."""

    def __init__(self, async_staging: bool) -> None:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        self.async_staging = async_staging
        self.stager = DefaultStager(StagingOptions(use_pinned_memory=False,
                                                   use_shared_memory=False,
                                                   use_async_staging=async_staging,
                                                   use_non_blocking_copy=False))
        self.pending: Any = None

    def save(self, sd: dict[str, Any], where: str | Path, ctx: Ctx | None = None,
             writer: Any = None) -> None:
        """Returns when training may go on (the state is staged); ``wait()`` for durability.
        ``writer``: the storage writer (default as :func:`dcp_save`'s)."""
        import torch.distributed.checkpoint as dcp

        self.wait()
        if writer is None:
            writer = _dcp_writer(where, ctx)
        resp = dcp.async_save(sd, storage_writer=writer,
                              async_stager=self.stager, no_dist=True)
        if hasattr(resp, "staging_completion"):
            resp.staging_completion.result()  # the next optimizer step must wait for staging
            self.pending = resp.upload_completion
        else:
            self.pending = resp
        self.where = where

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.result()
            self.pending = None
            if not str(self.where).startswith("s3://"):
                fsync_tree(Path(self.where))

    def close(self) -> None:
        self.wait()
        with _suppress():
            self.stager.close()


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


# ------------------------------------------------------------------ torchsnapshot


def torchsnapshot_app_state(model: Any, opt: Any) -> dict[str, Any]:
    return {"model": model, "optimizer": opt}


class TorchSnapshot:
    def __init__(self) -> None:
        import torchsnapshot  # noqa: F401  (unavailable is reported by the caller)

        self.pending: Any = None

    def take(self, app_state: dict[str, Any], path: str) -> None:
        import torchsnapshot

        torchsnapshot.Snapshot.take(path=path, app_state=app_state)

    def async_take(self, app_state: dict[str, Any], path: str) -> None:
        import torchsnapshot

        self.wait()
        self.pending = torchsnapshot.Snapshot.async_take(path=path, app_state=app_state)

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.wait()
            self.pending = None


# ------------------------------------------------------------------ uploads / downloads


def boto3_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=64 * 1024 * 1024,
                          multipart_chunksize=64 * 1024 * 1024, max_concurrency=8)


def torch_save_upload(sd: dict[str, Any], path: Path, client: Any, bucket: str,
                      key: str) -> None:
    """The usual script's way to S3: ``torch.save`` + fsync to ``path``, then boto3
    ``upload_file`` (64 MB parts, concurrency 8) to ``key``."""
    torch_save_fsync(sd, path)
    client.upload_file(str(path), bucket, key, Config=boto3_config())


def boto3_upload_dir(client: Any, src: Path, bucket: str, prefix: str) -> None:
    cfg = boto3_config()
    for p in sorted(src.iterdir()):
        if p.is_file():
            client.upload_file(str(p), bucket, f"{prefix}/{p.name}", Config=cfg)


def boto3_download_dir(client: Any, bucket: str, prefix: str, dst: Path) -> None:
    cfg = boto3_config()
    dst.mkdir(parents=True, exist_ok=True)
    for obj in client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", []):
        client.download_file(bucket, obj["Key"], str(dst / obj["Key"].rsplit("/", 1)[1]),
                             Config=cfg)


def s3fs_put_dir(fs: Any, src: Path, url: str) -> None:
    for p in sorted(src.iterdir()):
        if p.is_file():
            fs.put_file(str(p), f"{url}/{p.name}")


def s3fs_get_dir(fs: Any, url: str, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    fs.invalidate_cache()
    for p in fs.ls(url, detail=False):
        fs.get_file(p, str(dst / p.rsplit("/", 1)[1]))


def lightning_async_s3(sd: dict[str, Any], fs: Any, url: str) -> None:
    """Lightning-style async to S3: torch.save into a buffer, then ``fs.pipe`` it."""
    buf = io.BytesIO()
    torch.save(sd, buf)
    fs.pipe_file(url, buf.getvalue())


def rmtree(p: str | Path) -> None:
    shutil.rmtree(p, ignore_errors=True)
