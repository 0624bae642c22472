"""Multi-node checkpoints on the remote (ckptsync/parts.py): each node pushes its part; the
checkpoint exists only once every part is there, is committed once whoever pushes last (or
both at once), and an incomplete one is an uncommitted leftover that ``gc`` collects, part
markers included.

Written once against ``store_remote`` (conformance/conftest.py): every backend runs it.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

from ckptsync.local import LocalCheckpoint, LocalStore
from ckptsync.parts import part_of
from tests.support.stores import make_node_parts, make_store

pytestmark = pytest.mark.core

NODE_FILES = [{".metadata": b"meta", "__0_0.distcp": os.urandom(70_000)},
              {"__1_0.distcp": os.urandom(90_000), "sub/__1_1.distcp": b"x"}]


def _parts(tmp_path: Path, step: int) -> list[LocalCheckpoint]:
    return make_node_parts(tmp_path, step, NODE_FILES)


def _under(store: Any, name: str) -> list[str]:
    """The files under ``name`` (an object store may keep its empty "directory")."""
    store.fs.invalidate_cache()
    return sorted(rel for rel in store.at.sizes(name) if not rel.endswith(name))


class TestParts:
    def test_exists_only_once_every_part_is_there(self, store_remote: Any,
                                                  tmp_path: Path) -> None:
        a, b = _parts(tmp_path, 5)
        whole = part_of(a.manifest).whole  # type: ignore[union-attr]
        store = make_store(store_remote)
        assert store.push(a) == a.manifest  # node 0's part is up; node 1's is not
        assert store.list() == [] and store.read_manifest(a.name) is None
        assert [e.status for e in store.scan()] == ["uncommitted"]
        assert "ckptsync-part-0.json" in _under(store, a.name)
        assert store.push(a) == a.manifest  # again (a daemon's next scan): still waiting
        assert make_store(store_remote).push(b) == whole  # the last part commits
        (m,) = store.list()
        assert m == whole
        store.verify(m.name, full=True)
        assert store.push(a) == whole  # already committed: a no-op
        pulled = store.pull(None, LocalStore(tmp_path / "fresh"))
        assert {f.path for f in pulled.manifest.files} == {
            ".metadata", "__0_0.distcp", "__1_0.distcp", "sub/__1_1.distcp"}
        store.delete(m.name)  # the markers go with the checkpoint
        assert _under(store, m.name) == []

    def test_parts_pushed_at_once_commit_once(self, store_remote: Any, tmp_path: Path) -> None:
        if store_remote.name == "gdrive":
            pytest.skip("Google Drive creates a folder per create call, so two nodes creating "
                        "one checkpoint's folder at the same instant make two (no atomic "
                        "create): multi-node parts on Drive must not be pushed at once")
        make_store(store_remote).claim.ensure_marker()  # the run's root exists, as after a push
        parts = _parts(tmp_path, 6)
        whole = part_of(parts[0].manifest).whole  # type: ignore[union-attr]
        results: list[Any] = [None, None]
        barrier = threading.Barrier(2)

        def push(i: int) -> None:
            store = make_store(store_remote)
            barrier.wait()
            try:
                results[i] = store.push(parts[i])
            except Exception as e:  # reported below
                results[i] = e

        threads = [threading.Thread(target=push, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(isinstance(r, Exception) for r in results), results
        assert whole in results  # at least one of them saw both parts and committed
        store = make_store(store_remote)
        assert store.list() == [whole]
        store.verify(whole.name, full=True)

    def test_gc_collects_an_incomplete_checkpoint_with_its_markers(
            self, store_remote: Any, tmp_path: Path) -> None:
        a, _b = _parts(tmp_path, 7)
        store = make_store(store_remote)
        store.push(a)
        assert store.gc(grace_s=3600) == []  # a node still uploading is left alone
        assert store.gc(grace_s=0) == [a.name]
        assert _under(store, a.name) == [] and store.list() == []
