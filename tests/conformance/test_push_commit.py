"""Push and commit: what a push writes, that it commits exactly once (twice, concurrently,
after a failed attempt or a crash), and that a failed upload commits nothing.

Written once against ``store_remote`` (conformance/conftest.py): every backend runs it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

from ckptsync.errors import CorruptCheckpointError, LocalStorageError, RemoteError
from ckptsync.local import LocalStore
from ckptsync.manifest import MANIFEST_NAME, Manifest
from ckptsync.remote import ManifestExists, RemoteStore
from ckptsync.remote.visibility import visibility_for
from tests.support.faults import FaultOps
from tests.support.paths import REPO
from tests.support.stores import (
    FAST,
    faulty,
    files_for,
    make_local,
    make_store,
    no_leftovers,
    read_tree,
    rpath,
)

pytestmark = pytest.mark.core


class TestPushCommit:
    """Pushing and committing, on every backend ``store_remote`` names."""

    def test_push_pull_roundtrip_byte_equal(self, store_remote: Any, tmp_path: Path) -> None:
        local = LocalStore(tmp_path / "a")
        data = files_for(1)
        ckpt = make_local(local, 1, data, metrics={"loss": 0.5})
        store = make_store(store_remote)
        m = store.push(ckpt)
        assert m == ckpt.manifest
        assert [x.name for x in store.list()] == [ckpt.name]
        out = LocalStore(tmp_path / "b")
        got = store.pull(None, out)
        assert got.name == ckpt.name and got.manifest.metrics == {"loss": 0.5}
        assert read_tree(got.path) == data
        out.verify(got, full=True)
        assert no_leftovers(out)

    def test_push_twice_commits_once(self, store_remote: Any, tmp_path: Path) -> None:
        local = LocalStore(tmp_path / "a")
        ckpt = make_local(local, 3, files_for(3))
        store = make_store(store_remote)
        first = store.push(ckpt)
        manifest_bytes = store_remote.fs().cat_file(rpath(store_remote, ckpt.name, MANIFEST_NAME))
        fs = faulty(store_remote)
        again = make_store(store_remote, fs=fs).push(ckpt)
        assert again == first
        assert fs.counts["open:wb"] == 0 and fs.counts["pipe_file"] == 0  # nothing re-uploaded
        assert [x.name for x in store.list()] == [ckpt.name]
        assert store_remote.fs().cat_file(
            rpath(store_remote, ckpt.name, MANIFEST_NAME)) == manifest_bytes

    def test_failed_upload_commits_nothing_then_retry_once(self, store_remote: Any,
                                                           tmp_path: Path) -> None:
        local = LocalStore(tmp_path / "a")
        ckpt = make_local(local, 7, files_for(7))
        fs = faulty(store_remote)
        fs.fail_on("open:wb", nth=2, exc=PermissionError("injected: access denied"))
        store = make_store(store_remote, fs=fs)
        with pytest.raises(RemoteError, match="access denied") as ei:
            store.push(ckpt)
        assert isinstance(ei.value.__cause__, PermissionError)
        assert not ei.value.retryable
        assert store.list() == [] and store.newest_valid() is None
        assert fs.count("pipe_file", MANIFEST_NAME) == 0
        fs.clear_faults()
        store.push(ckpt)
        store.push(ckpt)
        assert [m.name for m in store.list()] == [ckpt.name]
        got = store.pull(None, LocalStore(tmp_path / "b"))
        assert read_tree(got.path) == read_tree(ckpt.path)

    def test_failed_write_midway_commits_nothing(self, store_remote: Any, tmp_path: Path) -> None:
        local = LocalStore(tmp_path / "a")
        ckpt = make_local(local, 7, files_for(7))
        fs = faulty(store_remote)
        fs.fail_on("write", nth=3, exc=PermissionError("injected"))
        store = make_store(store_remote, fs=fs)
        with pytest.raises(RemoteError):
            store.push(ckpt)
        assert store.list() == []
        assert {e.status for e in store.scan()} <= {"uncommitted"}
        fs.clear_faults()
        assert store.push(ckpt) == ckpt.manifest
        store.verify(ckpt.name)

    def test_failed_manifest_write_commits_nothing(self, store_remote: Any,
                                                   tmp_path: Path) -> None:
        local = LocalStore(tmp_path / "a")
        ckpt = make_local(local, 7, {"w.bin": b"abc"})
        # A local directory commits the manifest with os.link, not through the fs: its
        # fault goes in through the store's ops seam (the fsync right before the link).
        fs, ops = faulty(store_remote), FaultOps()
        fs.fail_on("pipe_file", nth=1, exc=PermissionError("injected"))
        ops.fail_on("fsync", f"{ckpt.name}/.{MANIFEST_NAME}.tmp-", PermissionError("injected"))
        store = RemoteStore(store_remote.url, store_remote.storage_options, fs=fs, config=FAST,
                            ops=ops)
        with pytest.raises(RemoteError):
            store.push(ckpt)
        assert store.list() == []
        fs.clear_faults()
        store.push(ckpt)
        assert [m.name for m in store.list()] == [ckpt.name]

    def test_stop_abandons_upload(self, store_remote: Any, tmp_path: Path) -> None:
        local = LocalStore(tmp_path / "a")
        ckpt = make_local(local, 7, files_for(7))
        stop = threading.Event()
        stop.set()
        store = make_store(store_remote)
        with pytest.raises(RemoteError):
            store.push(ckpt, stop=stop)
        assert store.list() == []

    def test_local_file_changed_after_commit_is_not_pushed(self, store_remote: Any,
                                                           tmp_path: Path) -> None:
        local = LocalStore(tmp_path / "a")
        ckpt = make_local(local, 7, {"w.bin": b"a" * 100})
        ckpt.file("w.bin").write_bytes(b"b" * 100)
        store = make_store(store_remote)
        with pytest.raises(CorruptCheckpointError, match="no longer matches"):
            store.push(ckpt)
        assert store.list() == []
        ckpt.file("w.bin").unlink()
        with pytest.raises(LocalStorageError, match=r"w\.bin"):
            store.push(ckpt)
        assert store.list() == []

    def test_concurrent_pushes_commit_once(self, store_remote: Any, tmp_path: Path) -> None:
        if store_remote.name == "gdrive":
            pytest.skip("Drive keeps duplicate names and has no create-only write: concurrent "
                        "pushers of one checkpoint are unsupported there (documented)")
        local = LocalStore(tmp_path / "a")
        ckpt = make_local(local, 7, files_for(7))
        results: list[Any] = []

        def push() -> None:
            try:
                results.append(make_store(store_remote).push(ckpt))
            except Exception as e:  # pragma: no cover - reported below
                results.append(e)

        threads = [threading.Thread(target=push) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [ckpt.manifest] * 3
        store = make_store(store_remote)
        assert [m.name for m in store.list()] == [ckpt.name]
        store.verify(ckpt.name)

    def test_create_only_manifest_write(self, store_remote: Any, tmp_path: Path) -> None:
        local = LocalStore(tmp_path / "a")
        c = make_local(local, 1, {"w.bin": b"abc"})
        store = make_store(store_remote)
        store.push(c)
        # The commit point refuses to overwrite (S3 If-None-Match, GCS ifGenerationMatch=0,
        # os.link locally; SeaweedFS reports the 412 as EINVAL, moto as FileExistsError).
        with pytest.raises(ManifestExists):
            visibility_for(store.at).create_only(store.at.path(c.name, MANIFEST_NAME),
                                                 store.url_of(c.name, MANIFEST_NAME), b"{}",
                                                 "commit manifest to")
        assert store.read_manifest(c.name) == c.manifest
        # A different checkpoint under a committed name is refused, the remote untouched.
        st = LocalStore(tmp_path / "b").staging(c.name)
        st.write_file("w.bin", b"other")
        other = st.commit(Manifest.new(step=1, files=st.entries, name=c.name))
        with pytest.raises(RemoteError, match="different checkpoint"):
            store.push(other)
        store.verify(c.name)


def test_crash_mid_upload_then_rerun_commits_once(tmp_path: Path) -> None:
    """A process killed in the middle of a push leaves nothing committed; a rerun commits."""
    local = LocalStore(tmp_path / "a")
    ckpt = make_local(local, 7, files_for(7))
    url = f"file://{tmp_path}/remote/run"
    script = textwrap.dedent(f"""
        import fsspec
        from tests.support.faults import FaultFS, kill
        from ckptsync.local import LocalStore
        from ckptsync.remote import RemoteStore
        fs = FaultFS(fsspec.filesystem("file"))
        fs.fail_on("write", nth=2, exc=kill)
        ckpt = LocalStore({str(local.directory)!r}).get({ckpt.name!r})
        RemoteStore({url!r}, fs=fs).push(ckpt)
        print("pushed: the fault did not fire")
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 17, proc.stdout + proc.stderr
    store = RemoteStore(url, config=FAST)
    assert store.list() == [] and store.newest_valid() is None
    assert [e.status for e in store.scan()] == ["uncommitted"]
    store.push(ckpt)
    store.push(ckpt)
    assert [m.name for m in store.list()] == [ckpt.name]
    store.verify(ckpt.name)
