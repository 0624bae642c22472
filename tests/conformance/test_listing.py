"""Listing: committed checkpoints, the newest valid one and ``latest``, cheaply.

Written once against ``store_remote`` (conformance/conftest.py): every backend runs it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from ckptsync.errors import CorruptCheckpointError
from ckptsync.local import LocalStore
from ckptsync.manifest import LATEST_NAME, MANIFEST_NAME, FileEntry, Manifest, make_name
from ckptsync.retention import RetentionPolicy
from tests.support.stores import faulty, make_local, make_store, overwrite, put, rpath

pytestmark = pytest.mark.core


class TestListing:
    """Listing, on every backend ``store_remote`` names."""

    def test_list_newest_valid_and_latest(self, store_remote: Any, tmp_path: Path) -> None:
        local = LocalStore(tmp_path / "a")
        ckpts = [make_local(local, s, {"w.bin": os.urandom(100)}) for s in (5, 10, 20)]
        store = make_store(store_remote)
        assert store.list() == [] and store.newest_valid() is None
        for c in ckpts:
            store.push(c)
        assert [m.step for m in store.list()] == [5, 10, 20]
        newest = store.newest_valid()
        assert newest is not None and newest.name == ckpts[-1].name
        latest = json.loads(store_remote.fs().cat_file(rpath(store_remote, LATEST_NAME)))
        assert latest == {"name": ckpts[-1].name, "step": 20, "created": ckpts[-1].manifest.created}

    def test_stale_latest_does_not_hide_newer(self, store_remote: Any, tmp_path: Path) -> None:
        local = LocalStore(tmp_path / "a")
        old, new = (make_local(local, s, {"w.bin": b"x" * s}) for s in (1, 2))
        store = make_store(store_remote)
        store.push(old)
        store.push(new)
        overwrite(store_remote, rpath(store_remote, LATEST_NAME),
                  json.dumps({"name": old.name, "step": 1}).encode())
        m = store.newest_valid()
        assert m is not None and m.name == new.name

    def test_a_checkpoint_listing_no_files_is_not_valid(self, store_remote: Any,
                                                        tmp_path: Path) -> None:
        """A manifest with ``files: []`` verifies (nothing to check) but restores nothing: it
        is not valid, so it neither protects nor displaces a good checkpoint in retention,
        and pull passes over it, saying why."""
        good = make_local(LocalStore(tmp_path / "a"), 1, {"w.bin": b"good"})
        store = make_store(store_remote)
        store.push(good)
        empty = Manifest.new(step=2, files=[])
        put(store_remote, rpath(store_remote, empty.name, MANIFEST_NAME), empty.to_json())

        newest = store.newest_valid()
        assert newest is not None and newest.name == good.name
        assert {e.name: e.status for e in store.scan()} == {good.name: "valid",
                                                            empty.name: "corrupt"}
        assert store.apply_retention(RetentionPolicy(keep_last=1)) == []
        assert [m.name for m in store.list()] == [good.name, empty.name]
        skipped: list[tuple[str, str]] = []
        out = LocalStore(tmp_path / "b")
        assert store.pull(None, out, skipped=skipped).name == good.name
        assert [n for n, _ in skipped] == [empty.name] and "no files" in skipped[0][1]
        with pytest.raises(CorruptCheckpointError, match="no files"):
            store.pull(empty.name, out)

    def test_newest_valid_is_cheap_with_1000_checkpoints(self, store_remote: Any) -> None:
        fs = store_remote.fs()
        names = []
        base = 1_000
        entry = FileEntry("w.bin", 1, "blake3", "0" * 64)
        payload: dict[str, bytes] = {}
        n = 50 if store_remote.name == "gdrive" else 1000  # the Drive double is slow to fill
        for step in range(base, base + n):
            name = make_name(step)
            names.append(name)
            payload[rpath(store_remote, name, "w.bin")] = b"x"
            payload[rpath(store_remote, name, MANIFEST_NAME)] = Manifest.new(
                step=step, files=[entry], name=name).to_json()
        # Three uploads in progress (no manifest) newer than everything:
        for step in range(base + n, base + n + 3):
            payload[rpath(store_remote, make_name(step), "w.bin")] = b"x"
        if store_remote.name in ("file", "mounted_drive", "gdrive"):
            for p, data in payload.items():
                fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
                fs.pipe_file(p, data)
        else:
            fs.pipe(payload)  # concurrent on object stores
        fs.invalidate_cache()
        wrapped = faulty(store_remote)
        store = make_store(store_remote, fs=wrapped)
        m = store.newest_valid()
        assert m is not None and m.name == names[-1]
        assert wrapped.count("cat_file", MANIFEST_NAME) <= 4  # 3 missing + 1 found
        assert wrapped.count("open:rb") == 0
        assert wrapped.counts["ls"] <= 2 and wrapped.counts["find"] <= 2
