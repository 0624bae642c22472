"""Uploads carry the backend's own checksum (a hardware CRC32C):
the server refuses bytes damaged in transit, and S3 keeps a full-object CRC32C of every object
ckptsync writes.

SeaweedFS (4.48) checks the CRC32C of a PUT's body, of each part, and the full-object CRC32C
at CompleteMultipartUpload (a mismatch: 400 BadDigest). moto 5.2.5 stores the checksums it is
sent without checking them, so it cannot show a refusal; these tests run on SeaweedFS. A
fault proxy between client and server flips one byte of a request body.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import google_crc32c
import pytest

from ckptsync.config import TransferConfig
from ckptsync.local import LocalStore
from ckptsync.remote import RemoteStore
from tests.support.fault_proxy import Fault, FaultProxy
from tests.support.remotes import Remote
from tests.support.servers import SeaweedFS
from tests.support.tls import make_cert

pytestmark = pytest.mark.core

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
    return base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()


def _through(remote: Remote, proxy: FaultProxy) -> dict[str, Any]:
    opts: dict[str, Any] = json.loads(json.dumps(remote.storage_options))
    opts["client_kwargs"]["endpoint_url"] = proxy.endpoint
    return opts


def _proxy(remote: Remote, *faults: Fault, tls: tuple[Path, Path] | None = None) -> FaultProxy:
    host, port = remote.extra["endpoint"].rsplit("/", 1)[1].split(":")
    return FaultProxy(host, int(port), plan=faults, lifetime=120, tls=tls)


def _data_puts(proxy: FaultProxy) -> list[tuple[str, dict[str, str]]]:
    """The requests that carried a data file's bytes (PutObject and UploadPart)."""
    return [(target, h) for method, target, h in proxy.heads
            if method == "PUT" and ("/big.bin?" in target or target.endswith("/small.bin"))
            and "x-amz-copy-source" not in h]


def _pulled(store: RemoteStore, name: str, dest: Path) -> dict[str, bytes]:
    ckpt = store.pull(name, LocalStore(dest))
    return {f.path: ckpt.file(f.path).read_bytes() for f in ckpt.manifest.files}


def test_s3_objects_carry_a_full_object_crc32c_of_their_bytes(
        seaweedfs_remote: Remote, seaweedfs_server: SeaweedFS, tmp_path: Path) -> None:
    """Every file, a multipart upload included, is stored with the CRC32C of all its bytes
    (``ChecksumType`` FULL_OBJECT), which the server checked when it completed the upload."""
    _, ckpt, files = _checkpoint(tmp_path)
    store = RemoteStore(seaweedfs_remote.url, seaweedfs_remote.storage_options, config=CONFIG)
    store.push(ckpt)
    s3 = seaweedfs_server.boto3_client()
    bucket = seaweedfs_remote.extra["bucket"]
    for rel, data in files.items():
        head = s3.head_object(Bucket=bucket, Key=f"run/{ckpt.name}/{rel}",
                              ChecksumMode="ENABLED")
        assert head.get("ChecksumCRC32C") == _crc(data), (rel, head)
    head = s3.head_object(Bucket=bucket, Key=f"run/{ckpt.name}/big.bin", ChecksumMode="ENABLED")
    assert head.get("ChecksumType") == "FULL_OBJECT", head  # the multipart upload
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


def test_over_tls_upload_bodies_carry_the_crc_and_no_second_sha256(
        seaweedfs_remote: Remote, tmp_path: Path) -> None:
    """Over https every part and small file goes up with ``UNSIGNED-PAYLOAD`` and its CRC32C,
    as botocore does with its own checksums: not signed with a sha256 of the body too, a
    second pass over every byte (~0.9 CPU-s per GB) on the trainer's cores."""
    _, ckpt, files = _checkpoint(tmp_path)
    cert, key = make_cert(tmp_path / "tls")
    with _proxy(seaweedfs_remote, tls=(cert, key)) as proxy:
        opts = _through(seaweedfs_remote, proxy)
        opts["client_kwargs"]["verify"] = str(cert)
        store = RemoteStore(seaweedfs_remote.url, opts, config=CONFIG)
        store.push(ckpt)
        puts = _data_puts(proxy)
        assert _pulled(store, ckpt.name, tmp_path / "back") == files
    assert len(puts) == 4, [t for t, _ in puts]  # 3 parts of big.bin, small.bin's PUT
    for target, h in puts:
        assert h.get("x-amz-content-sha256") == "UNSIGNED-PAYLOAD", (target, h)
        assert h.get("x-amz-checksum-crc32c"), (target, h)
        assert not h.get("x-amz-checksum-crc32"), (target, h)  # one checksum, not two


def test_over_plain_http_upload_bodies_stay_signed(seaweedfs_remote: Remote,
                                                   tmp_path: Path) -> None:
    """Without TLS nothing else guards a body against a change on the way: it stays signed."""
    _, ckpt, _files = _checkpoint(tmp_path)
    with _proxy(seaweedfs_remote) as proxy:
        RemoteStore(seaweedfs_remote.url, _through(seaweedfs_remote, proxy),
                    config=CONFIG).push(ckpt)
        puts = _data_puts(proxy)
    assert len(puts) == 4, [t for t, _ in puts]
    for target, h in puts:
        signed = h.get("x-amz-content-sha256", "")
        assert len(signed) == 64 and int(signed, 16) >= 0, (target, h)


def test_over_tls_a_part_damaged_in_transit_is_still_refused(seaweedfs_remote: Remote,
                                                             tmp_path: Path) -> None:
    """With no payload signature, the part's CRC32C is what makes the server refuse it."""
    _, ckpt, files = _checkpoint(tmp_path)
    cert, key = make_cert(tmp_path / "tls")
    with _proxy(seaweedfs_remote, Fault(method="PUT", path_contains="partNumber=2", how="flip"),
                tls=(cert, key)) as proxy:
        opts = _through(seaweedfs_remote, proxy)
        opts["client_kwargs"]["verify"] = str(cert)
        RemoteStore(seaweedfs_remote.url, opts, config=CONFIG).push(ckpt)
        assert len(proxy.fired) == 1 and proxy.fired[0].endswith("answered 400"), proxy.fired
        second = [h for t, h in _data_puts(proxy) if "partNumber=2" in t]
        assert len(second) == 2, second  # refused, then sent again
        assert all(h.get("x-amz-content-sha256") == "UNSIGNED-PAYLOAD" for h in second)
    assert _pulled(RemoteStore(seaweedfs_remote.url, seaweedfs_remote.storage_options),
                   ckpt.name, tmp_path / "back") == files


def test_streamed_parts_carry_their_crc32c_and_a_damaged_one_is_sent_again(
        seaweedfs_remote: Remote, seaweedfs_server: SeaweedFS, tmp_path: Path) -> None:
    """A file uploaded while it is written (the in-process save's stream): each part's CRC32C
    is computed as the part is filled; a part damaged in transit is refused and sent again."""
    data = os.urandom(13 * MiB + 17)
    store_local = LocalStore(tmp_path / "local")
    from ckptsync.manifest import Manifest, make_name

    name = make_name(3)
    staging = store_local.staging(name)
    staging.write_file("model.bin", data)
    ckpt = staging.commit(Manifest.new(step=3, files=staging.entries, name=name))
    with _proxy(seaweedfs_remote, Fault(method="PUT", path_contains="partNumber=2",
                                        how="flip")) as proxy:
        store = RemoteStore(seaweedfs_remote.url, _through(seaweedfs_remote, proxy),
                            config=CONFIG)
        stream = store.stream_file(name, "model.bin")
        assert stream is not None
        for i in range(0, len(data), 3 * MiB + 1):  # as torch.save writes: uneven pieces
            stream.write(memoryview(data)[i:i + 3 * MiB + 1])
        store.push(ckpt, streams={"model.bin": stream})
        assert len(proxy.fired) == 1 and proxy.fired[0].endswith("answered 400"), proxy.fired
        parts = [(t, h) for m, t, h in proxy.heads if m == "PUT" and "partNumber=" in t]
    numbers = sorted(t.split("partNumber=")[1].split("&")[0] for t, _ in parts)
    assert numbers == ["1", "2", "2", "3"], [t for t, _ in parts]  # part 2 sent again
    assert all(h.get("x-amz-checksum-crc32c") for _, h in parts), parts
    head = seaweedfs_server.boto3_client().head_object(
        Bucket=seaweedfs_remote.extra["bucket"], Key=f"run/{name}/model.bin",
        ChecksumMode="ENABLED")
    assert head.get("ChecksumCRC32C") == _crc(data), head
    assert _pulled(RemoteStore(seaweedfs_remote.url, seaweedfs_remote.storage_options),
                   name, tmp_path / "back") == {"model.bin": data}


def test_encrypted_parts_carry_the_crc32c_of_the_stored_bytes(
        seaweedfs_remote: Remote, seaweedfs_server: SeaweedFS, tmp_path: Path) -> None:
    """An encrypted file goes up as parallel parts of its stored (encrypted) bytes: the CRC32C
    is theirs, and a part damaged in transit is refused and sent again."""
    from ckptsync.crypto import KeyRing

    keys = KeyRing((os.urandom(32),))
    _, ckpt, files = _checkpoint(tmp_path)
    with _proxy(seaweedfs_remote, Fault(method="PUT", path_contains="partNumber=2",
                                        how="flip")) as proxy:
        store = RemoteStore(seaweedfs_remote.url, _through(seaweedfs_remote, proxy),
                            config=CONFIG, keys=keys)
        store.push(ckpt)
        assert len(proxy.fired) == 1 and proxy.fired[0].endswith("answered 400"), proxy.fired
    s3 = seaweedfs_server.boto3_client()
    key = f"run/{ckpt.name}/big.bin"
    stored = s3.get_object(Bucket=seaweedfs_remote.extra["bucket"], Key=key)["Body"].read()
    head = s3.head_object(Bucket=seaweedfs_remote.extra["bucket"], Key=key,
                          ChecksumMode="ENABLED")
    assert head.get("ChecksumCRC32C") == _crc(stored), head
    back = RemoteStore(seaweedfs_remote.url, seaweedfs_remote.storage_options, keys=keys).pull(
        ckpt.name, LocalStore(tmp_path / "back"))
    assert {f.path: back.file(f.path).read_bytes() for f in back.manifest.files} == files
