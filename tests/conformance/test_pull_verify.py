"""Pull and verify: bytes come back exact; damage is found, fetched again or passed over.

Written once against ``store_remote`` (conformance/conftest.py): every backend runs it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from ckptsync.config import TransferConfig
from ckptsync.errors import CorruptCheckpointError, NoCheckpointError
from ckptsync.local import LocalStore
from ckptsync.manifest import make_name
from ckptsync.remote.backends.s3 import is_s3fs
from tests.support.stores import (
    FAST,
    faulty,
    files_for,
    make_local,
    make_store,
    no_leftovers,
    overwrite,
    read_tree,
    rpath,
)

pytestmark = pytest.mark.core


class TestPullVerify:
    """Pulling and verifying, on every backend ``store_remote`` names."""

    def test_flipped_byte_verify_and_fallback(self, store_remote: Any, tmp_path: Path) -> None:
        local = LocalStore(tmp_path / "a")
        old, new = (make_local(local, s, files_for(s)) for s in (1, 2))
        store = make_store(store_remote)
        store.push(old)
        store.push(new)
        path = rpath(store_remote, new.name, "model.pt")
        data = bytearray(store_remote.fs().cat_file(path))
        data[1234] ^= 0xFF
        overwrite(store_remote, path, bytes(data))

        store.verify(old.name)
        with pytest.raises(CorruptCheckpointError,
                           match=r"model\.pt.*blake3 digest does not match") as ei:
            store.verify(new.name)
        assert new.name in str(ei.value)
        store.verify(new.name, full=False)  # the size still matches
        # Same size, so it looks valid until its bytes are hashed while downloading; it is
        # downloaded digest_attempts times before it is declared corrupt.
        out = LocalStore(tmp_path / "b")
        fs = faulty(store_remote)
        skipped: list[tuple[str, str]] = []
        got = make_store(store_remote, fs=fs).pull(None, out, skipped=skipped)
        assert got.name == old.name
        assert fs.count("open:rb", f"{new.name}/model.pt") == FAST.digest_attempts == 3
        assert [n for n, _ in skipped] == [new.name] and "digest does not match" in skipped[0][1]
        assert [c.name for c in out.list()] == [old.name]
        assert no_leftovers(out)
        with pytest.raises(CorruptCheckpointError, match="blake3 digest does not match"):
            store.pull(new.name, out)
        assert no_leftovers(out) and [c.name for c in out.list()] == [old.name]

    @pytest.mark.parametrize("ranged", [False, True], ids=["streamed", "ranged"])
    @pytest.mark.parametrize("damage", ["short-body", "flipped-byte"])
    def test_one_damaged_download_is_fetched_again_not_taken_for_corruption(
            self, store_remote: Any, tmp_path: Path, damage: str, ranged: bool) -> None:
        """One response with a short body (its Content-Length consistent, so the transport
        cannot tell) or a flipped byte is a glitch in transit, not a corrupt checkpoint: the
        file is downloaded again and the newest checkpoint is pulled, not an older one."""
        mib = 1024 * 1024
        local = LocalStore(tmp_path / "a")
        big = {"model.pt": os.urandom(6 * mib if ranged else 300_000), "rng.pt": b"r"}
        old, new = make_local(local, 1, files_for(1)), make_local(local, 2, big)
        store = make_store(store_remote)
        store.push(old)
        store.push(new)

        def short(b: bytes) -> bytes:
            return b[: len(b) // 2]

        def flip(b: bytes) -> bytes:
            return b[:10] + bytes([b[10] ^ 1]) + b[11:]

        fs = faulty(store_remote)
        # Streamed files are read through an open file; ranged ones fetched by range.
        fs.damage_on("cat_file" if ranged else "read", short if damage == "short-body" else flip,
                     suffix=f"{new.name}/model.pt")
        cfg = TransferConfig(max_workers=2, chunk_size=64 * 1024, block_size=5 * mib,
                             ranged_min_size=mib, retries=3, backoff_initial=0.0)
        out = LocalStore(tmp_path / "b")
        skipped: list[tuple[str, str]] = []
        got = make_store(store_remote, fs=fs, config=cfg).pull(None, out, skipped=skipped)
        assert got.name == new.name, "a single damaged response made pull fall back"
        assert read_tree(got.path) == big and skipped == []
        assert no_leftovers(out)

    def test_truncated_file_is_invalid(self, store_remote: Any, tmp_path: Path) -> None:
        local = LocalStore(tmp_path / "a")
        old, new = (make_local(local, s, files_for(s)) for s in (1, 2))
        store = make_store(store_remote)
        store.push(old)
        store.push(new)
        path = rpath(store_remote, new.name, "model.pt")
        overwrite(store_remote, path, store_remote.fs().cat_file(path)[:1000])
        with pytest.raises(CorruptCheckpointError, match="truncated"):
            store.verify(new.name, full=False)
        m = store.newest_valid()
        assert m is not None and m.name == old.name
        statuses = {e.name: e.status for e in store.scan()}
        assert statuses == {old.name: "valid", new.name: "partial"}
        assert store.pull(None, LocalStore(tmp_path / "b")).name == old.name

    def test_pull_nothing(self, store_remote: Any, tmp_path: Path) -> None:
        store = make_store(store_remote)
        with pytest.raises(NoCheckpointError):
            store.pull(None, LocalStore(tmp_path / "b"))
        with pytest.raises(NoCheckpointError):
            store.pull(make_name(1), LocalStore(tmp_path / "b"))

    def test_pull_newer_than(self, store_remote: Any, tmp_path: Path) -> None:
        local = LocalStore(tmp_path / "a")
        c1, c2 = (make_local(local, s, {"w.bin": b"abc"}) for s in (1, 2))
        store = make_store(store_remote)
        store.push(c1)
        with pytest.raises(NoCheckpointError):
            store.pull(None, LocalStore(tmp_path / "b"), newer_than=c1.manifest)
        store.push(c2)
        assert store.pull(None, LocalStore(tmp_path / "b"), newer_than=c1.manifest).name == c2.name

    def test_download_resumes_after_a_failed_read(self, store_remote: Any,
                                                  tmp_path: Path) -> None:
        local = LocalStore(tmp_path / "a")
        data = {"model.pt": os.urandom(700_000)}  # about 11 chunks of 64 KiB
        ckpt = make_local(local, 7, data)
        make_store(store_remote).push(ckpt)
        fs = faulty(store_remote)
        fs.fail_on("read", nth=4, exc=ConnectionError("injected: connection reset mid-file"))
        got = make_store(store_remote, fs=fs).pull(None, LocalStore(tmp_path / "b"))
        assert read_tree(got.path) == data
        assert fs.counts["open:rb"] == 2  # reopened once, at the offset reached

    def test_ranged_parallel_download(self, store_remote: Any, tmp_path: Path) -> None:
        mib = 1024 * 1024
        cfg = TransferConfig(max_workers=2, chunk_size=mib, block_size=5 * mib,
                             ranged_min_size=5 * mib, retries=3, backoff_initial=0.0,
                             backoff_max=0.0)
        data = {f"shard{i}.bin": os.urandom(11 * mib + i) for i in range(3)}
        data["small.bin"] = b"tiny"
        ckpt = make_local(LocalStore(tmp_path / "a"), 1, data)
        make_store(store_remote, config=cfg).push(ckpt)
        fs = faulty(store_remote)
        resets: list[str] = []

        def reset() -> None:
            resets.append("shard1.bin")
            raise ConnectionError("injected: reset during a range")

        fs.before("cat_file", "shard1.bin", reset)  # the first read of a shard fails once
        got = make_store(store_remote, fs=fs, config=cfg).pull(None, LocalStore(tmp_path / "b"))
        assert read_tree(got.path) == data
        # Drive reads one connection at a time through open/read (no ranges, no cat_file).
        assert resets == ([] if store_remote.name == "gdrive" else ["shard1.bin"])
        if is_s3fs(fs):  # S3 reads ranges through a blocking botocore client, not the fs:
            # the fs sees each shard's end-of-file probe (the reset one again, once it worked).
            assert sum(fs.count("cat_file", f"shard{i}.bin") for i in range(3)) == 3
        elif store_remote.name != "gdrive":  # one connection at a time there: no ranges
            assert fs.count("cat_file", "shard0.bin") >= 4  # 3 ranges + the end-of-file probe
        # A flipped byte in the middle range is caught by the in-order digest.
        path = rpath(store_remote, ckpt.name, "shard1.bin")
        raw = bytearray(data["shard1.bin"])
        raw[7 * mib] ^= 0x01
        overwrite(store_remote, path, bytes(raw))
        out = LocalStore(tmp_path / "c")
        with pytest.raises(CorruptCheckpointError, match="blake3 digest does not match"):
            make_store(store_remote, config=cfg).pull(ckpt.name, out)
        assert out.list() == [] and no_leftovers(out)
