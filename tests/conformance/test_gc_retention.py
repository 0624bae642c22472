"""Retention, delete and gc on the remote: what goes, in which order, and what stays.

Written once against ``store_remote`` (conformance/conftest.py): every backend runs it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from ckptsync.errors import RemoteError
from ckptsync.local import LocalStore
from ckptsync.manifest import make_name
from ckptsync.retention import BestRule, RetentionPolicy
from tests.support.stores import faulty, files_for, make_local, make_store, put, rpath

pytestmark = pytest.mark.core


class TestGcRetention:
    """Retention, delete and gc, on every backend ``store_remote`` names."""

    def test_retention(self, store_remote: Any, tmp_path: Path) -> None:
        local = LocalStore(tmp_path / "a")
        losses = {1: 0.9, 2: 0.1, 3: 0.5, 4: 0.7, 5: 0.8}
        ckpts = {s: make_local(local, s, {"w.bin": b"x"}, {"loss": v}) for s, v in losses.items()}
        store = make_store(store_remote)
        for c in ckpts.values():
            store.push(c)
        policy = RetentionPolicy(keep_last=2, keep_best=BestRule("loss", "min", 1))
        planned = store.apply_retention(policy, protect=[ckpts[1].name], dry_run=True)
        assert len(store.list()) == 5
        deleted = store.apply_retention(policy, protect=[ckpts[1].name])
        assert deleted == planned == [ckpts[3].name]
        assert [m.step for m in store.list()] == [1, 2, 4, 5]
        assert {e.status for e in store.scan()} == {"valid"}  # no half-deleted leftovers

    def test_delete_removes_manifest_first(self, store_remote: Any, tmp_path: Path) -> None:
        local = LocalStore(tmp_path / "a")
        c1, c2 = (make_local(local, s, files_for(s)) for s in (1, 2))
        store = make_store(store_remote)
        store.push(c1)
        store.push(c2)
        fs = faulty(store_remote)
        fs.fail_on("rm", nth=1, exc=PermissionError("injected"))
        with pytest.raises(RemoteError):
            make_store(store_remote, fs=fs).delete(c2.name)
        # The manifest went first: the rest is an uncommitted leftover, never restored.
        assert [m.name for m in store.list()] == [c1.name]
        m = store.newest_valid()
        assert m is not None and m.name == c1.name
        assert {e.name: e.status for e in store.scan()}[c2.name] == "uncommitted"
        assert store.gc(0.0, now=time.time() + 60) == [c2.name]
        assert [e.name for e in store.scan()] == [c1.name]

    def test_gc_removes_only_old_uncommitted(self, store_remote: Any, tmp_path: Path) -> None:
        local = LocalStore(tmp_path / "a")
        c1 = make_local(local, 1, {"w.bin": b"abc"})
        store = make_store(store_remote)
        store.push(c1)
        leftover = make_name(2)
        put(store_remote, rpath(store_remote, leftover, "w.bin"), b"partial")
        store_remote.fs().invalidate_cache()
        assert store.gc(3600.0) == []
        assert store.gc(3600.0, dry_run=True, now=time.time() + 7200) == [leftover]
        assert leftover in [e.name for e in store.scan()]
        assert store.gc(3600.0, now=time.time() + 7200) == [leftover]
        assert [e.name for e in store.scan()] == [c1.name]
        assert [m.name for m in store.list()] == [c1.name]

    def test_gc_aborts_old_multipart_uploads(self, store_remote: Any, tmp_path: Path) -> None:
        fs = store_remote.fs()
        if not hasattr(fs, "list_multipart_uploads"):
            pytest.skip("no multipart uploads on this backend")
        # A root ckptsync has pushed to (and so marked): gc collects only under such a root.
        make_store(store_remote).push(make_local(LocalStore(tmp_path / "a"), 0, {"w": b"w"}))
        bucket, _, prefix = store_remote.path.partition("/")
        key = f"{prefix}/{make_name(1)}/model.pt"
        fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)
        outside = f"elsewhere/{make_name(1)}/model.pt"
        fs.call_s3("create_multipart_upload", Bucket=bucket, Key=outside)
        store = make_store(store_remote)
        started = {u["Key"]: u["Initiated"] for u in fs.list_multipart_uploads(bucket)}[key]
        if started.timestamp() > time.time() - 600:  # moto reports a fixed date in 2010
            assert store.gc(3600.0) == []
        assert store.gc(3600.0, now=time.time() + 7200) == [f"multipart:{key}"]
        assert [u["Key"] for u in fs.list_multipart_uploads(bucket)] == [outside]
