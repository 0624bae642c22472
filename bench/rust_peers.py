"""The Rust S3 clients as peers: what a user who picked one of them writes.

- **s3torchconnector** (AWS; the CRT through mountpoint-s3-client): ``torch.save`` into
  ``S3Checkpoint.writer``; DCP's ``S3StorageWriter``; ``S3Checkpoint.writer``/``reader`` as
  put_object/get_object of a file. Version 1.5 talks to a non-AWS server with
  ``S3ClientConfig(force_path_style=True)`` and ``endpoint=``; its ``S3StorageWriter`` takes no
  endpoint, so its ``fs`` is replaced by an ``S3FileSystem`` over an ``S3Client`` that has one
  (``S3Client`` is not exported: ``s3torchconnector._s3client``, the only way there in 1.5).
  Credentials: the AWS environment the bench exports.
- **obstore** (Rust ``object_store``): ``S3Store`` with the bench's keys and endpoint,
  ``client_options={"allow_http": True}`` over http and ``{"root_certificate": <the bench's
  PEM>}`` over https; ``put`` of a file path (its defaults: 5 MB parts, 12 at once) and ``get``
  streamed to a file. Its other defaults are kept (it signs every body with sha256, also over
  https), except the 30 s limit on a whole request, raised so that a large object over a slow
  link is not cut short.

Each peer is built on first use (:class:`Lazy`), inside the timed call, so that a peer that
cannot be imported or reach the server is reported as ``unavailable: <error>`` by
:func:`bench.common.measure`, not fatal to the table. Clients are kept across runs, as a
training script keeps them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

from bench.common import Ctx

T = TypeVar("T")
CHUNK = 8 * 1024 * 1024  # what the peers read and write at a time


class Lazy(Generic[T]):
    """``make(ctx)`` on the first call, then the same object (errors are not cached: each
    contender that needs the peer meets the error itself)."""

    def __init__(self, make: Callable[[Ctx], T], ctx: Ctx) -> None:
        self._make = make
        self._ctx = ctx
        self._obj: T | None = None

    def __call__(self) -> T:
        if self._obj is None:
            self._obj = self._make(self._ctx)
        return self._obj


def _split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


def _fsync_file(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())


class S3TorchConnector:
    """s3torchconnector for the bench's server: one ``S3Checkpoint`` (writer and reader) and
    one ``S3Client`` for DCP, kept across runs."""

    def __init__(self, ctx: Ctx) -> None:
        from s3torchconnector import S3Checkpoint, S3ClientConfig
        from s3torchconnector._s3client import S3Client

        from tests.support.servers import REGION

        self.region = REGION
        self.config = S3ClientConfig(force_path_style=True)
        self.checkpoint = S3Checkpoint(REGION, endpoint=ctx.endpoint, s3client_config=self.config)
        self.client = S3Client(REGION, endpoint=ctx.endpoint, s3client_config=self.config)

    def torch_save(self, sd: dict[str, Any], uri: str) -> None:
        """``torch.save`` straight into ``S3Checkpoint.writer``: no local copy, nothing
        verified; the upload is done when the writer closes."""
        with self.checkpoint.writer(uri) as w:
            torch.save(sd, w)

    def storage_writer(self, uri: str) -> Any:
        """DCP's ``S3StorageWriter`` for ``uri``, over the client that has the endpoint."""
        from s3torchconnector.dcp import S3FileSystem, S3StorageWriter

        writer = S3StorageWriter(self.region, uri, s3client_config=self.config)
        writer.fs = S3FileSystem(self.region, s3_client=self.client)
        return writer

    def put_dir(self, src: Path, prefix: str) -> None:
        """Every file of ``src`` through ``S3Checkpoint.writer`` (put_object), read in 8 MiB."""
        for p in sorted(src.iterdir()):
            if p.is_file():
                with open(p, "rb") as f, self.checkpoint.writer(f"{prefix}/{p.name}") as w:
                    shutil.copyfileobj(f, w, CHUNK)

    def get_dir(self, prefix: str, dst: Path) -> None:
        """Every object under ``prefix`` (one listing) through ``S3Checkpoint.reader``
        (get_object) into ``dst``, fsynced."""
        bucket, key = _split(prefix)
        dst.mkdir(parents=True, exist_ok=True)
        keys = [o.key for page in self.client.list_objects(bucket, key + "/")
                for o in page.object_info]
        for k in keys:
            with self.checkpoint.reader(f"s3://{bucket}/{k}") as r, \
                    open(dst / k.rsplit("/", 1)[1], "wb") as f:
                shutil.copyfileobj(r, f, CHUNK)
                _fsync_file(f)


class Obstore:
    """obstore's ``S3Store`` for the bench's bucket, kept across runs."""

    def __init__(self, ctx: Ctx) -> None:
        from obstore.store import S3Store

        from tests.support.servers import ACCESS_KEY, REGION, SECRET_KEY

        options: dict[str, Any] = {"timeout": "600s"}
        if ctx.ca_bundle:
            options["root_certificate"] = Path(ctx.ca_bundle).read_text()
        else:
            options["allow_http"] = True
        self.bucket = ctx.bucket
        self.store = S3Store(ctx.bucket, endpoint=ctx.endpoint, region=REGION,
                             access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY,
                             virtual_hosted_style_request=False, client_options=options)

    def _key(self, uri: str) -> str:
        bucket, key = _split(uri)
        assert bucket == self.bucket, f"{uri} is not in the store's bucket {self.bucket}"
        return key

    def put_file(self, path: Path, uri: str) -> None:
        import obstore

        obstore.put(self.store, self._key(uri), path)

    def put_dir(self, src: Path, prefix: str) -> None:
        for p in sorted(src.iterdir()):
            if p.is_file():
                self.put_file(p, f"{prefix}/{p.name}")

    def get_dir(self, prefix: str, dst: Path) -> None:
        """Every object under ``prefix`` (one listing), each streamed into a file, fsynced."""
        import obstore

        dst.mkdir(parents=True, exist_ok=True)
        keys = [m["path"] for batch in obstore.list(self.store, self._key(prefix))
                for m in batch]
        for k in keys:
            with open(dst / k.rsplit("/", 1)[1], "wb") as f:
                for chunk in obstore.get(self.store, k).stream(min_chunk_size=CHUNK):
                    f.write(chunk)
                _fsync_file(f)
