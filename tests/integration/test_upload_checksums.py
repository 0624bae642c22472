"""Uploads carry the backend's own checksum (issue 18, section 2): the server refuses bytes
damaged in transit, and S3 keeps a full-object CRC32 of every object ckptsync writes.

SeaweedFS checks the CRC32 of a PUT's body, of each part, and the full-object CRC32 at
CompleteMultipartUpload (a mismatch: 400 BadDigest). moto 5.2.5 stores the checksums it is
sent without checking them, so it cannot show a refusal; these tests run on SeaweedFS. A
fault proxy between client and server flips one byte of a request body.
"""

from __future__ import annotations

import base64
import json
import os
import zlib
from pathlib import Path
from typing import Any

from ckptsync.config import TransferConfig
from ckptsync.local import LocalStore
from ckptsync.remote import RemoteStore
from tests.support.fault_proxy import Fault, FaultProxy
from tests.support.remotes import Remote
from tests.support.servers import SeaweedFS

MiB = 1024 * 1024
# 5 MiB parts (S3's minimum): big.bin is a 3-part upload, small.bin one PUT.
CONFIG = TransferConfig(max_workers=2, block_size=5 * MiB, part_size=5 * MiB,
                        parts_in_flight=2, retries=3, backoff_initial=0.0)


def _checkpoint(tmp_path: Path) -> tuple[LocalStore, Any, dict[str, bytes]]:
    files = {"big.bin": os.urandom(13 * MiB + 17), "small.bin": os.urandom(300_000)}
    store = LocalStore(tmp_path / "local")
    from ckptsync.manifest import Manifest, make_name

    name = make_name(7)
    staging = store.staging(name)
    for rel, data in files.items():
        staging.write_file(rel, data)
    ckpt = staging.commit(Manifest.new(step=7, files=staging.entries, name=name))
    return store, ckpt, files


def _crc(data: bytes) -> str:
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


def _through(remote: Remote, proxy: FaultProxy) -> dict[str, Any]:
    opts: dict[str, Any] = json.loads(json.dumps(remote.storage_options))
    opts["client_kwargs"]["endpoint_url"] = proxy.endpoint
    return opts


def _proxy(remote: Remote, *faults: Fault) -> FaultProxy:
    host, port = remote.extra["endpoint"].rsplit("/", 1)[1].split(":")
    return FaultProxy(host, int(port), plan=faults, lifetime=120)


def _pulled(store: RemoteStore, name: str, dest: Path) -> dict[str, bytes]:
    ckpt = store.pull(name, LocalStore(dest))
    return {f.path: ckpt.file(f.path).read_bytes() for f in ckpt.manifest.files}


def test_s3_objects_carry_a_full_object_crc32_of_their_bytes(
        seaweedfs_remote: Remote, seaweedfs_server: SeaweedFS, tmp_path: Path) -> None:
    """Every file, a multipart upload included, is stored with the CRC32 of all its bytes
    (``ChecksumType`` FULL_OBJECT), which the server checked when it completed the upload."""
    _, ckpt, files = _checkpoint(tmp_path)
    store = RemoteStore(seaweedfs_remote.url, seaweedfs_remote.storage_options, config=CONFIG)
    store.push(ckpt)
    s3 = seaweedfs_server.boto3_client()
    bucket = seaweedfs_remote.extra["bucket"]
    for rel, data in files.items():
        head = s3.head_object(Bucket=bucket, Key=f"run/{ckpt.name}/{rel}",
                              ChecksumMode="ENABLED")
        assert head.get("ChecksumCRC32") == _crc(data), (rel, head)
    assert _pulled(store, ckpt.name, tmp_path / "back") == files


def test_a_part_damaged_in_transit_is_refused_by_the_server_and_sent_again(
        seaweedfs_remote: Remote, tmp_path: Path) -> None:
    _, ckpt, files = _checkpoint(tmp_path)
    with _proxy(seaweedfs_remote, Fault(method="PUT", path_contains="partNumber=2",
                                        how="flip")) as proxy:
        store = RemoteStore(seaweedfs_remote.url, _through(seaweedfs_remote, proxy),
                            config=CONFIG)
        store.push(ckpt)
        assert len(proxy.fired) == 1 and proxy.fired[0].endswith("answered 400"), proxy.fired
    assert _pulled(RemoteStore(seaweedfs_remote.url, seaweedfs_remote.storage_options),
                   ckpt.name, tmp_path / "back") == files


def test_a_small_file_damaged_in_transit_is_refused_by_the_server_and_sent_again(
        seaweedfs_remote: Remote, tmp_path: Path) -> None:
    _, ckpt, files = _checkpoint(tmp_path)
    with _proxy(seaweedfs_remote, Fault(method="PUT", path_contains="small.bin",
                                        how="flip")) as proxy:
        store = RemoteStore(seaweedfs_remote.url, _through(seaweedfs_remote, proxy),
                            config=CONFIG)
        store.push(ckpt)
        assert len(proxy.fired) == 1 and proxy.fired[0].endswith("answered 400"), proxy.fired
    assert _pulled(RemoteStore(seaweedfs_remote.url, seaweedfs_remote.storage_options),
                   ckpt.name, tmp_path / "back") == files
