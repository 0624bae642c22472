"""Manifests on the remote that are hostile, misplaced, old (v1), oversized, empty or edited.

Written once against ``store_remote`` (conformance/conftest.py): every backend runs it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ckptsync.errors import CorruptCheckpointError, ManifestError
from ckptsync.local import LocalStore
from ckptsync.manifest import (
    LATEST_NAME,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    FileEntry,
    Manifest,
    make_name,
)
from ckptsync.ownership import RUN_FILE
from tests.support.formats import put_tree, rewrite_as_v1, seal
from tests.support.stores import (
    ReadSizes,
    files_for,
    make_local,
    make_store,
    overwrite,
    put,
    read_tree,
    rpath,
)

pytestmark = pytest.mark.core


class TestRemoteManifests:
    """Reading the manifests a remote holds, on every backend ``store_remote`` names."""

    def test_malicious_manifests(self, store_remote: Any, tmp_path: Path) -> None:
        local = LocalStore(tmp_path / "a")
        good = make_local(local, 1, {"w.bin": b"good"})
        store = make_store(store_remote)
        store.push(good)
        fs = store_remote.fs()
        sandbox = tmp_path / "sandbox"  # "../victim.txt" from the target lands here
        target = sandbox / "target"
        sandbox.mkdir()
        victim = sandbox / "victim.txt"
        victim.write_text("keep me")
        evil_paths = ["../victim.txt", "/etc/evil", "a/../../victim.txt", "C:/evil"]
        for i, evil in enumerate(evil_paths):
            name = make_name(10 + i)
            d = Manifest.new(step=10 + i, files=[FileEntry("w.bin", 4, "blake3", "0" * 64)],
                             name=name)
            raw = d.to_dict()
            raw["files"] = [{"path": evil, "size": 7, "blake3": "0" * 64}]
            put(store_remote, rpath(store_remote, name, "w.bin"), b"hacked!")
            put(store_remote, rpath(store_remote, name, MANIFEST_NAME),
                json.dumps(seal(raw)).encode())
            with pytest.raises(ManifestError, match="unsafe"):
                store.pull(name, LocalStore(target))
        fs.invalidate_cache()
        # A manifest whose sizes lie (the file is bigger than listed):
        liar = make_name(50)
        put(store_remote, rpath(store_remote, liar, "w.bin"), b"x" * 5000)
        lie = Manifest.new(step=50, files=[FileEntry("w.bin", 10, "blake3", "0" * 64)],
                           name=liar)
        put(store_remote, rpath(store_remote, liar, MANIFEST_NAME), lie.to_json())
        fs.invalidate_cache()
        with pytest.raises(CorruptCheckpointError, match=r"w\.bin"):
            store.pull(liar, LocalStore(target))
        # Newest valid skips all of them; the good one is restored, nothing else is written.
        m = store.newest_valid()
        assert m is not None and m.name == good.name
        got = store.pull(None, LocalStore(target))
        assert got.name == good.name
        assert victim.read_text() == "keep me"
        assert sorted(p.name for p in target.iterdir()) == sorted([RUN_FILE, good.name])
        assert sorted(p.name for p in sandbox.iterdir()) == ["target", "victim.txt"]

    def test_manifest_under_wrong_name_is_refused(self, store_remote: Any,
                                                 tmp_path: Path) -> None:
        local = LocalStore(tmp_path / "a")
        c = make_local(local, 1, {"w.bin": b"abc"})
        store = make_store(store_remote)
        store.push(c)
        other = make_name(99)
        fs = store_remote.fs()
        put(store_remote, rpath(store_remote, other, "w.bin"), b"abc")
        put(store_remote, rpath(store_remote, other, MANIFEST_NAME), c.manifest.to_json())
        fs.invalidate_cache()
        with pytest.raises(ManifestError, match="lives under"):
            store.pull(other, LocalStore(tmp_path / "b"))
        m = store.newest_valid()
        assert m is not None and m.name == c.name

    def test_v1_checkpoint_written_the_old_way_is_read(self, store_remote: Any,
                                                       tmp_path: Path) -> None:
        """A ``ckptsync/1`` checkpoint (sha256 entries, no self-digest) lists, verifies and
        pulls; its local copy stays a sha256-verified format 1 checkpoint."""
        local = LocalStore(tmp_path / "a")
        data = files_for(3)
        old = make_local(local, 3, data)
        rewrite_as_v1(old.path)
        put_tree(store_remote.fs(), old.path, rpath(store_remote, old.name))
        new = make_local(local, 4, files_for(4))
        store = make_store(store_remote)
        store.push(new)  # format 2 beside format 1 in one remote
        assert [(m.name, m.format) for m in store.list()] == [
            (old.name, "ckptsync/1"), (new.name, "ckptsync/2")]
        assert {e.name: e.status for e in store.scan()} == {old.name: "valid", new.name: "valid"}
        m = store.verify(old.name)
        assert {f.algo for f in m.files} == {"sha256"}
        out = LocalStore(tmp_path / "b")
        got = store.pull(old.name, out)
        assert read_tree(got.path) == data and got.manifest == m
        assert json.loads((got.path / MANIFEST_NAME).read_bytes())["format"] == "ckptsync/1"
        out.verify(out.get(old.name))  # sha256 of every local byte
        # Its sha256 still catches a flipped byte, remotely and while pulling.
        path = rpath(store_remote, old.name, "model.pt")
        raw = bytearray(data["model.pt"])
        raw[4321] ^= 0x10
        overwrite(store_remote, path, bytes(raw))
        with pytest.raises(CorruptCheckpointError, match=r"model\.pt.*sha256 digest"):
            store.verify(old.name)
        with pytest.raises(CorruptCheckpointError, match="sha256 digest does not match"):
            store.pull(old.name, LocalStore(tmp_path / "c"))

    def test_oversized_manifest_is_refused_unread(self, store_remote: Any,
                                                  tmp_path: Path) -> None:
        """A manifest over the bound is refused with its path, size and the bound,
        and no read returns more than the bound + 1 byte of it."""
        local = LocalStore(tmp_path / "a")
        good = make_local(local, 1, {"w.bin": b"good"})
        store = make_store(store_remote)
        store.push(good)
        big = make_name(2)
        size = MAX_MANIFEST_BYTES + 2 * 1024 * 1024
        put(store_remote, rpath(store_remote, big, "w.bin"), b"good")
        put(store_remote, rpath(store_remote, big, MANIFEST_NAME), b" " * size)
        fs = ReadSizes(store_remote.fs())
        wrapped = make_store(store_remote, fs=fs)
        with pytest.raises(ManifestError) as e:
            wrapped.read_manifest(big)
        msg = str(e.value)
        assert f"{big}/{MANIFEST_NAME}" in msg and f"{MAX_MANIFEST_BYTES:,}" in msg
        assert f"{size:,} bytes" in msg
        rows = {r.name: r for r in wrapped.scan()}
        assert rows[big].status == "corrupt" and "bound" in (rows[big].problem or "")
        assert [m.name for m in wrapped.list()] == [good.name]
        m = wrapped.newest_valid()
        assert m is not None and m.name == good.name
        assert wrapped.pull(None, LocalStore(tmp_path / "b")).name == good.name
        assert 0 < fs.largest <= MAX_MANIFEST_BYTES + 1
        # LATEST is read with the same bound: a huge one is no hint at all.
        overwrite(store_remote, rpath(store_remote, LATEST_NAME), b" " * size)
        assert wrapped.read_latest() is None and fs.largest <= MAX_MANIFEST_BYTES + 1

    def test_empty_manifest_is_corrupt(self, store_remote: Any, tmp_path: Path) -> None:
        """Manifests are read with a range (bound + 1 bytes): an empty object, which S3 and GCS
        answer with 416 for any range, is a corrupt manifest, not a remote failure."""
        local = LocalStore(tmp_path / "a")
        good = make_local(local, 1, {"w.bin": b"good"})
        store = make_store(store_remote)
        store.push(good)
        empty = make_name(2)
        put(store_remote, rpath(store_remote, empty, "w.bin"), b"good")
        put(store_remote, rpath(store_remote, empty, MANIFEST_NAME), b"")
        overwrite(store_remote, rpath(store_remote, LATEST_NAME), b"")
        with pytest.raises(ManifestError, match=f"{empty}.*not valid JSON"):
            store.read_manifest(empty)
        rows = {r.name: r for r in store.scan()}
        assert rows[empty].status == "corrupt" and "not valid JSON" in (rows[empty].problem or "")
        assert store.read_latest() is None
        m = store.newest_valid()
        assert m is not None and m.name == good.name

    def test_edited_step_is_refused(self, store_remote: Any, tmp_path: Path) -> None:
        """"step": 101 edited to 301 in a committed manifest is never trusted."""
        local = LocalStore(tmp_path / "a")
        c100 = make_local(local, 100, {"w.bin": b"100"})
        c101 = make_local(local, 101, {"w.bin": b"101"})
        store = make_store(store_remote)
        store.push(c100)
        store.push(c101)
        path = rpath(store_remote, c101.name, MANIFEST_NAME)
        edited = store_remote.fs().cat_file(path).replace(b'"step": 101', b'"step": 301')
        assert b'"step": 301' in edited
        overwrite(store_remote, path, edited)
        with pytest.raises(ManifestError, match=f"{c101.name}.*altered"):
            store.verify(c101.name)
        m = store.newest_valid()
        assert m is not None and (m.name, m.step) == (c100.name, 100)
        got = store.pull(None, LocalStore(tmp_path / "b"))
        assert got.step == 100 and got.file("w.bin").read_bytes() == b"100"
