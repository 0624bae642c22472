"""Backends as classes: which one a store chooses, what each can do, and that the fault seam
keeps it.

A fault test is worth something only if it runs the path production runs: a store over
:class:`~faults.FaultFS` must choose its target's backend, commit on ``file://`` with the
durable rename and the hard link, and upload a large file to S3 as a multipart upload.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem

from ckptsync.config import TransferConfig
from ckptsync.errors import RemoteError
from ckptsync.local import LocalCheckpoint, LocalStore
from ckptsync.manifest import MANIFEST_NAME
from ckptsync.remote import RemoteStore, choose_backend, translate_error
from ckptsync.remote.backends import GCS, S3, Backend, Drive, LocalDir, backend_class
from tests.support.faults import FaultFS, FaultOps
from tests.support.remotes import Remote
from tests.support.stores import make_local

pytestmark = pytest.mark.core

MiB = 1024 * 1024
FAST = TransferConfig(max_workers=3, retries=3, backoff_initial=0.0, backoff_max=0.0,
                      part_size=5 * MiB, block_size=5 * MiB, parts_in_flight=2)




# --------------------------------------------------------------------------- the wrapper


def test_a_store_over_the_fault_wrapper_chooses_its_targets_backend(remote: Remote) -> None:
    bare = RemoteStore(remote.url, remote.storage_options, config=FAST)
    wrapped = RemoteStore(remote.url, remote.storage_options, fs=FaultFS(remote.fs()),
                          config=FAST)
    assert type(wrapped.backend) is type(bare.backend)
    assert (wrapped.backend.parallel_parts, wrapped.backend.server_copy) == (
        bare.backend.parallel_parts, bare.backend.server_copy)
    expected = {"file": "local", "mounted_drive": "local", "memory": "fsspec",
                "seaweedfs": "s3", "moto": "s3", "gcs": "gcs", "gdrive": "gdrive"}
    assert bare.backend.name == expected[remote.name]
    # Only the mounted Drive is a remote where committed means handed to a mount.
    assert (bare.mount is not None and bare.mount.drive) == (remote.name == "mounted_drive")
    assert wrapped.mount == bare.mount


def test_a_push_through_the_wrapper_on_file_commits_by_durable_rename_and_link(
        file_remote: Remote, tmp_path: Path) -> None:
    files = {"model.pt": os.urandom(3000), "optim/state.pt": os.urandom(2000)}
    ckpt = make_local(LocalStore(tmp_path / "ckpts"), 3, files)
    fs, ops = FaultFS(file_remote.fs()), FaultOps()
    store = RemoteStore(file_remote.url, fs=fs, config=FAST, ops=ops)
    store.push(ckpt)

    root = Path(file_remote.path)
    # Each file was written through the wrapper under a temporary name, fsynced there, and
    # renamed into place by the store (os.replace), not moved through the filesystem.
    written = [p for k, p in fs.calls if k == "open:wb"]
    assert sorted(Path(p).parent / Path(p).name.split(".part-")[0][1:] for p in written) == \
        sorted(root / ckpt.name / rel for rel in files)
    synced = {p for op, p in ops.calls if op == "fsync"}
    assert set(written) <= synced
    assert fs.counts["mv"] == 0
    # The manifest (and the root marker, and LATEST) were hard-linked or renamed into place
    # from a fsynced temporary file, never written through the filesystem.
    assert fs.counts["pipe_file"] == 0
    assert any(Path(p).name.startswith(f".{MANIFEST_NAME}.tmp-") for p in synced)
    manifest = root / ckpt.name / MANIFEST_NAME
    assert manifest.stat().st_nlink == 1  # the temporary name is gone
    assert ("fsync_dir", str(root / ckpt.name / "optim")) in ops.calls  # before the manifest
    assert sorted(os.listdir(root / ckpt.name)) == [MANIFEST_NAME, "model.pt", "optim"]
    store.verify(ckpt.name, full=True)


def test_a_fault_in_the_local_commit_commits_nothing(file_remote: Remote,
                                                     tmp_path: Path) -> None:
    ckpt = make_local(LocalStore(tmp_path / "ckpts"), 4, {"model.pt": os.urandom(1000)})
    ops = FaultOps()
    ops.fail_on("fsync", f"{ckpt.name}/.{MANIFEST_NAME}.tmp-",
                PermissionError(13, "injected: read-only file system"))
    store = RemoteStore(file_remote.url, fs=FaultFS(file_remote.fs()), config=FAST, ops=ops)
    with pytest.raises(RemoteError):
        store.push(ckpt)
    assert store.list() == []
    assert store.push(ckpt).files == ckpt.manifest.files
    assert [m.name for m in store.list()] == [ckpt.name]


def _big_checkpoint(tmp_path: Path) -> tuple[LocalCheckpoint, dict[str, bytes]]:
    files = {"big.bin": os.urandom(6 * MiB), "small.bin": os.urandom(1000)}  # big: 2 parts
    return make_local(LocalStore(tmp_path / "ckpts"), 5, files), files


def test_a_push_through_the_wrapper_on_s3_takes_the_multipart_path(
        s3_remote: Remote, tmp_path: Path) -> None:
    ckpt, _ = _big_checkpoint(tmp_path)
    fs = FaultFS(s3_remote.fs())
    store = RemoteStore(s3_remote.url, s3_remote.storage_options, fs=fs, config=FAST)
    store.push(ckpt)
    assert fs.counts["_call_s3:create_multipart_upload"] == 1
    assert fs.counts["_call_s3:complete_multipart_upload"] == 1
    assert fs.count("open:wb", "big.bin") == 0 and fs.count("open:wb", "small.bin") == 1
    store.verify(ckpt.name, full=True)


def test_a_dropped_complete_multipart_request_is_retried_and_commits_once(
        s3_remote: Remote, tmp_path: Path) -> None:
    ckpt, _ = _big_checkpoint(tmp_path)
    fs = FaultFS(s3_remote.fs())
    fs.fail_on("_call_s3:complete_multipart_upload",
               exc=ConnectionError("injected: connection reset"))
    store = RemoteStore(s3_remote.url, s3_remote.storage_options, fs=fs, config=FAST)
    assert store.push(ckpt).files == ckpt.manifest.files
    assert fs.counts["_call_s3:complete_multipart_upload"] == 2  # the retry completed it
    assert fs.counts["_call_s3:head_object"] >= 1  # it looked whether the first took effect
    assert [m.name for m in store.list()] == [ckpt.name]
    store.verify(ckpt.name, full=True)


def test_a_refused_complete_multipart_is_reported_and_leaves_nothing(
        s3_remote: Remote, tmp_path: Path) -> None:
    ckpt, _ = _big_checkpoint(tmp_path)
    fs = FaultFS(s3_remote.fs())
    refused = PermissionError("injected: access denied")
    fs.fail_on("_call_s3:complete_multipart_upload", exc=refused)
    store = RemoteStore(s3_remote.url, s3_remote.storage_options, fs=fs, config=FAST)
    with pytest.raises(RemoteError) as ei:
        store.push(ckpt)
    # As production reports it: the boundary's translation of that error, for that file.
    expected = translate_error(PermissionError("injected: access denied"),
                               store.url_of(ckpt.name, "big.bin"), "upload to")
    assert str(ei.value) == str(expected) and not ei.value.retryable
    assert ei.value.__cause__ is refused
    assert fs.counts["_call_s3:complete_multipart_upload"] == 1  # not retried
    assert fs.counts["_call_s3:abort_multipart_upload"] == 1  # and cleaned up at once
    bucket = s3_remote.extra["bucket"]
    assert [u for u in fs.list_multipart_uploads(bucket) if "run/" in u.get("Key", "")] == []
    assert store.list() == []


# --------------------------------------------------------------------------- selection


def _s3fs_like(protocol: Any) -> Any:
    """An object that looks like s3fs to ``remote.backends.s3.is_s3fs`` (what the multipart
    path uses)."""
    return SimpleNamespace(protocol=protocol, _call_s3=None, loop=None, split_path=None,
                           _get_s3_method_kwargs=None)


class _SlowLocal(LocalFileSystem):
    protocol = ("slowfile",)  # tests/support/slowfs.py: a local directory under its own name


# (case, filesystem, URL scheme, backend class, parallel parts, server-side copies)
CASES: list[tuple[str, Any, str, type[Backend], bool, bool]] = [
    ("file", fsspec.filesystem("file"), "file", LocalDir, False, False),
    ("local", fsspec.filesystem("file"), "local", LocalDir, False, False),
    ("plain path (a mounted Drive)", fsspec.filesystem("file"), "file", LocalDir, False, False),
    ("local subclass, own protocol", _SlowLocal(), "slowfile", LocalDir, False, False),
    ("memory", fsspec.filesystem("memory"), "memory", Backend, False, False),
    ("memory, whatever the URL says", fsspec.filesystem("memory"), "file", Backend, False,
     False),
    ("s3fs", _s3fs_like(("s3", "s3a")), "s3", S3, True, True),
    ("s3a", _s3fs_like(("s3", "s3a")), "s3a", S3, True, True),
    ("S3 without s3fs's calls", SimpleNamespace(protocol=("s3", "s3a")), "s3", S3, False, True),
    ("gcs", SimpleNamespace(protocol=("gs", "gcs")), "gs", GCS, False, True),
    ("gdrive", SimpleNamespace(protocol="gdrive"), "gdrive", Drive, False, False),
    ("a wrapper naming no protocol: the scheme", SimpleNamespace(protocol=("cached",)), "s3",
     S3, False, False),
    ("another fsspec protocol", SimpleNamespace(protocol="ftp"), "ftp", Backend, False, False),
]


@pytest.mark.parametrize(("fs", "scheme", "family", "parts", "copies"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_backend_selection(fs: Any, scheme: str, family: type[Backend], parts: bool,
                           copies: bool) -> None:
    chosen = choose_backend(fs, scheme, TransferConfig(max_workers=7))
    assert type(chosen) is family
    assert (chosen.parallel_parts, chosen.server_copy) == (parts, copies)
    assert chosen.workers == (1 if family is Drive else 7)  # Drive: one file at a time


def test_before_opening_the_scheme_names_the_family() -> None:
    assert [backend_class(s) for s in ("s3", "s3a", "gs", "gcs", "gdrive", "file", "ftp")] == [
        S3, S3, GCS, GCS, Drive, LocalDir, Backend]


def test_what_each_family_can_do() -> None:
    flags = ("buckets", "commit", "overwrites", "needs_dirs", "upload_via_temp")
    table = {b.name: tuple(getattr(b, f) for f in flags)
             for b in (S3, GCS, LocalDir, Drive, Backend)}
    assert table == {
        "s3": (True, "create-only", True, False, False),
        "gcs": (True, "create-only", True, False, False),
        "local": (False, "rename", True, True, True),
        "gdrive": (False, "check-then-write", False, True, False),
        "fsspec": (False, "check-then-write", True, False, True),
    }


def test_s3_bodies_are_signed_only_over_plain_http() -> None:
    """Over TLS the CRC sent with every upload body stands in for botocore's sha256 payload
    signature (as botocore's own checksums do); over plain http the signature stays."""
    config = TransferConfig()

    def signing(options: dict[str, object]) -> object:
        return S3.open_options(options, config)["config_kwargs"].get("s3", {}).get(
            "payload_signing_enabled")

    assert signing({}) is False
    assert signing({"client_kwargs": {"endpoint_url": "https://s3.example.com"}}) is False
    assert signing({"endpoint_url": "HTTPS://minio.lan:9000"}) is False
    assert signing({"client_kwargs": {"endpoint_url": "http://127.0.0.1:8333"}}) is None
    assert signing({"endpoint_url": "http://minio.lan:9000"}) is None
    assert signing({"use_ssl": False}) is None
    assert signing({"client_kwargs": {"use_ssl": False}}) is None
    # The user's own s3 settings are kept, and their choice wins.
    kept = S3.open_options({"config_kwargs": {"s3": {"addressing_style": "path"}}}, config)
    assert kept["config_kwargs"]["s3"] == {"addressing_style": "path",
                                           "payload_signing_enabled": False}
    assert signing({"config_kwargs": {"s3": {"payload_signing_enabled": True}}}) is True


def test_open_options_add_client_timeouts_unless_set() -> None:
    config = TransferConfig(connect_timeout=3.0, read_timeout=9.0)
    s3 = S3.open_options({"config_kwargs": {"read_timeout": 99}}, config)
    assert s3["config_kwargs"] == {"connect_timeout": 3.0, "read_timeout": 99,
                                   "retries": {"total_max_attempts": 1},
                                   # ckptsync sends its own CRC32; botocore's second pass off
                                   "request_checksum_calculation": "when_required",
                                   # AWS is https: the CRC'd bodies need no sha256 signature
                                   "s3": {"payload_signing_enabled": False}}
    mine = S3.open_options({"config_kwargs": {"request_checksum_calculation": "when_supported"}},
                           config)
    assert mine["config_kwargs"]["request_checksum_calculation"] == "when_supported"
    pytest.importorskip("aiohttp")
    timeout = GCS.open_options({}, config)["requests_timeout"]
    assert (timeout.total, timeout.sock_connect, timeout.sock_read) == (None, 3.0, 9.0)
    for family in (LocalDir, Drive, Backend):
        assert family.open_options({"anon": True}, config) == {"anon": True}
