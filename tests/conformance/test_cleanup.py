"""What a failed or abandoned push leaves behind, and that it is collected without touching
anything committed: ``RemoteStore.abandon``, temporary ``.part-*`` files (by the next attempt
and by ``gc``), durable files before the manifest on file:// and mounts, and Drive's
"leftovers" against a concurrent commit of the same name.

Runs on the backends in ``CKPTSYNC_STORE_BACKENDS`` (``store_remote``, conformance/conftest.py).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from ckptsync.errors import ConfigError, RemoteError
from ckptsync.local import LocalStore
from ckptsync.manifest import MANIFEST_NAME, make_name
from ckptsync.remote import RemoteStore
from tests.support.faults import FaultFS, RecordingOps
from tests.support.stores import make_local, make_store, put, rpath

pytestmark = pytest.mark.core

# Backends where a file being uploaded is visible, so it is written under a temporary name.
VIA_TEMP = ["file", "memory", "mounted_drive"]


def _files(step: int) -> dict[str, bytes]:
    return {"model.pt": os.urandom(200_000) + bytes([step]), "optim/state.pt": os.urandom(999)}


def _under(remote: Any, name: str) -> list[str]:
    fs = remote.fs()
    fs.invalidate_cache()
    prefix = rpath(remote, name)
    try:  # SeaweedFS lists an emptied "directory" as an object of its own: not a file
        return sorted(p for p in fs.find(prefix) if p.rstrip("/") != prefix)
    except FileNotFoundError:
        return []


def test_abandon_removes_an_uncommitted_push_and_never_a_committed_one(
        store_remote: Any, tmp_path: Path) -> None:
    local = LocalStore(tmp_path / "ckpts")
    store = make_store(store_remote)
    committed = store.push(make_local(local, 1, _files(1)))
    gone = make_name(2)  # a push that uploaded a file, then was given up
    put(store_remote, rpath(store_remote, gone, "model.pt"), b"half of it")
    put(store_remote, rpath(store_remote, gone, "optim", ".state.pt.part-0a1b2c3d"), b"x")
    fs = store_remote.fs()
    multipart = hasattr(fs, "list_multipart_uploads")
    bucket, _, prefix = store_remote.path.partition("/")
    if multipart:  # and a large file's multipart upload, still open
        key = f"{prefix}/{gone}/big.pt"
        fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)

    removed = make_store(store_remote).abandon(gone)

    assert gone in removed
    assert _under(store_remote, gone) == []
    if multipart:
        assert f"multipart:{key}" in removed
        assert [u["Key"] for u in fs.list_multipart_uploads(bucket)
                if u["Key"].startswith(f"{prefix}/")] == []
    # A committed checkpoint is never touched, and a name ckptsync did not write is refused.
    assert store.abandon(committed.name) == []
    store.verify(committed.name, full=True)
    with pytest.raises(ConfigError, match="not a ckptsync checkpoint name"):
        store.abandon("somebody-elses-dir")
    assert [m.name for m in store.list()] == [committed.name]


@pytest.mark.parametrize("backend", VIA_TEMP)
def test_a_failed_attempt_leaves_no_temporary_file(
        backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    store_remote = request.getfixturevalue(f"{backend}_remote")
    ckpt = make_local(LocalStore(tmp_path / "ckpts"), 3, _files(3))
    fs = FaultFS(store_remote.fs())
    fs.fail_on("write", nth=2, exc=PermissionError("injected: the disk went away"))
    store = make_store(store_remote, fs=fs)
    assert store.backend.upload_via_temp
    with pytest.raises(RemoteError):
        store.push(ckpt)
    assert any(".part-" in p for k, p in fs.calls if k == "open:wb")  # it wrote a temp file
    assert [p for p in _under(store_remote, ckpt.name) if ".part-" in p] == []
    store.push(ckpt)
    store.verify(ckpt.name, full=True)


@pytest.mark.parametrize("backend", ["file", "mounted_drive"])
def test_next_attempt_collects_the_temporary_files_of_an_attempt_that_died(
        backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    remote = request.getfixturevalue(f"{backend}_remote")
    ckpt = make_local(LocalStore(tmp_path / "ckpts"), 3, _files(3))
    dead = rpath(remote, ckpt.name, ".model.pt.part-0badc0de")  # the process was killed
    live = rpath(remote, ckpt.name, "optim", ".state.pt.part-0123abcd")  # a second pusher
    put(remote, dead, b"half a file")
    put(remote, live, b"being written right now")
    an_hour_ago = time.time() - 3600
    os.utime(dead, (an_hour_ago, an_hour_ago))

    make_store(remote).push(ckpt)  # the next attempt of the same push

    assert not os.path.exists(dead) and os.path.exists(live)
    make_store(remote).verify(ckpt.name, full=True)


@pytest.mark.parametrize("backend", VIA_TEMP)
def test_gc_collects_old_temporary_files_only_inside_ckptsync_checkpoints(
        backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    store_remote = request.getfixturevalue(f"{backend}_remote")
    store = make_store(store_remote)
    assert store.backend.upload_via_temp
    m = store.push(make_local(LocalStore(tmp_path / "ckpts"), 4, _files(4)))
    stale = rpath(store_remote, m.name, ".model.pt.part-deadbeef")
    put(store_remote, stale, b"a crashed attempt before the one that committed")
    foreign = rpath(store_remote, "notes", ".todo.part-deadbeef")
    put(store_remote, foreign, b"not ours")

    assert store.gc(3600.0) == []  # younger than the grace period
    assert store.gc(3600.0, now=time.time() + 7200) == [f"part:{m.name}/.model.pt.part-deadbeef"]

    fs = store_remote.fs()
    fs.invalidate_cache()
    assert not fs.exists(stale) and fs.exists(foreign)
    store.verify(m.name, full=True)


@pytest.mark.parametrize("backend", ["file", "mounted_drive"])
def test_every_file_and_directory_is_durable_before_the_manifest(
        backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    remote = request.getfixturevalue(f"{backend}_remote")
    ckpt = make_local(LocalStore(tmp_path / "ckpts"), 5, _files(5))
    root = Path(remote.path)
    manifest = root / ckpt.name / MANIFEST_NAME
    synced_files: set[str] = set()
    synced_dirs: set[str] = set()

    def hook(idx: int, op: str, path: str, when: str) -> None:
        if when != "before":
            return
        if op == "fsync":  # RecordingOps records the descriptor: which file is it?
            path = os.readlink(f"/proc/self/fd/{path}")
        if manifest.exists() or Path(path) == manifest:
            return
        (synced_files if op == "fsync" else synced_dirs).add(path)

    store = RemoteStore(remote.url, remote.storage_options, ops=RecordingOps(hook))
    store.push(ckpt)

    assert manifest.exists()
    # Each data file was fsynced (as its temporary name, before the rename) before the
    # manifest existed, and so was each directory that holds one, and the root.
    for f in ckpt.manifest.files:
        head, _, base = f.path.rpartition("/")
        parent = root / ckpt.name / head if head else root / ckpt.name
        assert any(Path(p).parent == parent and Path(p).name.startswith(f".{base}.part-")
                   for p in synced_files), f"{f.path} was not fsynced before the manifest"
        assert str(parent) in synced_dirs, f"{parent} was not fsynced before the manifest"
    assert str(root) in synced_dirs


def test_drive_push_never_deletes_files_of_a_checkpoint_committed_meanwhile(
        gdrive_remote: Any, tmp_path: Path) -> None:
    ckpt = make_local(LocalStore(tmp_path / "ckpts"), 6, _files(6))
    # A failed attempt of this push left a file behind (Drive would keep a duplicate).
    put(gdrive_remote, rpath(gdrive_remote, ckpt.name, "model.pt"), b"a failed attempt")
    other = make_store(gdrive_remote)
    other.claim.ensure_marker()
    fs = FaultFS(gdrive_remote.fs())

    def second_writer_commits() -> None:  # the same checkpoint, pushed by another process
        other.push(ckpt)

    # Right after this push looked for leftovers, the other writer commits; then this push
    # fails (the network goes away) before it could upload anything again.
    fs.fail_on("find", nth=1, exc=second_writer_commits)
    fs.fail_on("open:wb", nth=1, exc=PermissionError("injected: access lost"))
    store = make_store(gdrive_remote, fs=fs)
    assert store.push(ckpt).files == ckpt.manifest.files  # it finds the other's commit
    check = make_store(gdrive_remote)
    assert [m.name for m in check.list()] == [ckpt.name]
    check.verify(ckpt.name, full=True)
