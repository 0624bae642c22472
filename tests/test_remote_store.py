"""The remote store and its commit protocol.

``TestConformance`` is written once against the ``store_remote`` fixture: a conftest ``Remote``
(url + storage_options) for each name in ``STORE_BACKENDS``: by default every backend
(file, memory, seaweedfs, moto, gcs, gdrive, mounted_drive, the servers conftest starts);
``CKPTSYNC_STORE_BACKENDS=file,memory`` narrows it for a quick local run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import blake3
import fsspec
import pytest
from fault_proxy import Fault, FaultProxy
from faults import FaultFS, FaultOps
from formats import put_tree, rewrite_as_v1, seal

from ckptsync.config import TransferConfig
from ckptsync.errors import (
    ConfigError,
    CorruptCheckpointError,
    LocalStorageError,
    ManifestError,
    NoCheckpointError,
    RemoteError,
)
from ckptsync.local import LocalCheckpoint, LocalStore
from ckptsync.manifest import (
    LATEST_NAME,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    FileEntry,
    Manifest,
    make_name,
)
from ckptsync.remote import ManifestExists, RemoteStore, translate_error
from ckptsync.retention import BestRule, RetentionPolicy
from ckptsync.transfer import (
    Retrier,
    TransferAborted,
    download_file,
    download_file_ranged,
    is_s3fs,
)

STORE_BACKENDS = os.environ.get(
    "CKPTSYNC_STORE_BACKENDS", "file,memory,seaweedfs,moto,gcs,gdrive,mounted_drive"
).split(",")
FAST = TransferConfig(max_workers=4, chunk_size=64 * 1024, retries=3, backoff_initial=0.0,
                      backoff_max=0.0)
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(params=STORE_BACKENDS)
def store_remote(request: pytest.FixtureRequest) -> Any:
    """A conftest ``Remote`` for each backend in ``STORE_BACKENDS``."""
    return request.getfixturevalue(f"{request.param}_remote")


def make_store(remote: Any, *, fs: Any = None, config: TransferConfig = FAST) -> RemoteStore:
    return RemoteStore(remote.url, remote.storage_options, fs=fs, config=config)


def faulty(remote: Any) -> FaultFS:
    return FaultFS(remote.fs())


def make_local(store: LocalStore, step: int | None, files: dict[str, bytes],
               metrics: dict[str, float] | None = None) -> LocalCheckpoint:
    st = store.staging(make_name(step))
    for path, data in files.items():
        st.write_file(path, data)
    return st.commit(Manifest.new(step=step, files=st.entries, name=st.name, metrics=metrics))


def files_for(step: int) -> dict[str, bytes]:
    return {
        "model.pt": os.urandom(300_000) + step.to_bytes(4, "little"),  # several chunks
        "optim/state.pt": os.urandom(1000),
        "empty.bin": b"",
    }


def _secret_values(obj: Any) -> list[str]:
    if isinstance(obj, str):
        return [obj] if len(obj) >= 6 and not obj.startswith("http") else []
    if isinstance(obj, dict):
        return [s for k, v in obj.items() if k != "client_kwargs" for s in _secret_values(v)]
    return []


def rpath(remote: Any, *parts: str) -> str:
    return "/".join([remote.path.rstrip("/"), *parts])


def put(remote: Any, path: str, data: bytes) -> None:
    """Write a remote object directly (as a broken or malicious tool would)."""
    fs = remote.fs()
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)  # a no-op on object stores
    fs.pipe_file(path, data)
    fs.invalidate_cache()


def overwrite(remote: Any, path: str, data: bytes) -> None:
    fs = remote.fs()
    fs.rm_file(path)  # Drive would otherwise keep two files of one name
    fs.pipe_file(path, data)
    fs.invalidate_cache()


def read_tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes()
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME}


def no_leftovers(local: LocalStore) -> bool:
    return not any(p.name.startswith(".") for p in local.directory.iterdir())


class ReadSizes(FaultFS):
    """Records the largest result of any whole-or-ranged read (``cat_file``, ``cat``)."""

    def __init__(self, target: Any) -> None:
        super().__init__(target)
        self.largest = 0

    def _seen(self, data: Any) -> Any:
        for v in data.values() if isinstance(data, dict) else [data]:
            if isinstance(v, (bytes, bytearray)):
                self.largest = max(self.largest, len(v))
        return data

    def cat_file(self, path: str, start: int | None = None, end: int | None = None,
                 **kwargs: Any) -> Any:
        return self._seen(super().cat_file(path, start=start, end=end, **kwargs))

    def cat(self, path: Any, recursive: bool = False, on_error: str = "raise",
            **kwargs: Any) -> Any:
        return self._seen(super().cat(path, recursive=recursive, on_error=on_error, **kwargs))


class TestConformance:
    """The commit protocol, on every backend ``store_remote`` names."""

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
        assert sorted(p.name for p in target.iterdir()) == [good.name]
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
        """Issue 17.6: a manifest over the bound is refused with its path, size and the bound,
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
        """Issue 17.1: "step": 101 edited to 301 in a committed manifest is never trusted."""
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

    def test_transient_faults_are_retried(self, store_remote: Any, tmp_path: Path) -> None:
        local = LocalStore(tmp_path / "a")
        ckpt = make_local(local, 7, files_for(7))
        fs = faulty(store_remote)
        fs.fail_on("open:wb", nth=1, exc=ConnectionError("injected: connection reset"))
        store = make_store(store_remote, fs=fs)
        store.push(ckpt)
        fs.fail_on("open:rb", nth=1, exc=TimeoutError("injected: read timed out"))
        got = store.pull(None, LocalStore(tmp_path / "b"))
        assert read_tree(got.path) == read_tree(ckpt.path)
        assert [m.name for m in store.list()] == [ckpt.name]

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
        fs.fail_on("cat_file", nth=3, exc=ConnectionError("injected: reset during a range"))
        got = make_store(store_remote, fs=fs, config=cfg).pull(None, LocalStore(tmp_path / "b"))
        assert read_tree(got.path) == data
        if is_s3fs(fs):  # S3 reads ranges through a blocking botocore client, not the fs:
            # the fs sees each shard's end-of-file probe, and the injected fault hit one.
            assert sum(fs.count("cat_file", f"shard{i}.bin") for i in range(3)) == 3 + 1
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

    def test_create_only_manifest_write(self, store_remote: Any, tmp_path: Path) -> None:
        local = LocalStore(tmp_path / "a")
        c = make_local(local, 1, {"w.bin": b"abc"})
        store = make_store(store_remote)
        store.push(c)
        # The commit point refuses to overwrite (S3 If-None-Match, GCS ifGenerationMatch=0,
        # os.link locally; SeaweedFS reports the 412 as EINVAL, moto as FileExistsError).
        with pytest.raises(ManifestExists):
            store._create_manifest(c.name, b"{}")
        assert store.read_manifest(c.name) == c.manifest
        # A different checkpoint under a committed name is refused, the remote untouched.
        st = LocalStore(tmp_path / "b").staging(c.name)
        st.write_file("w.bin", b"other")
        other = st.commit(Manifest.new(step=1, files=st.entries, name=c.name))
        with pytest.raises(RemoteError, match="different checkpoint"):
            store.push(other)
        store.verify(c.name)

    def test_missing_bucket_fails_fast(self, store_remote: Any) -> None:
        if store_remote.missing_url is None:
            pytest.skip("this backend has no buckets")
        store = RemoteStore(store_remote.missing_url, store_remote.storage_options,
                            config=TransferConfig(retries=5, backoff_initial=30.0))
        start = time.monotonic()
        with pytest.raises(RemoteError, match="bucket") as ei:
            store.newest_valid()
        assert not ei.value.retryable and time.monotonic() - start < 20

    def test_wrong_credentials_fail_fast_without_secrets(self, store_remote: Any,
                                                         tmp_path: Path) -> None:
        if store_remote.wrong_credentials is None:
            pytest.skip("this backend does not check credentials")
        ckpt = make_local(LocalStore(tmp_path / "a"), 1, {"w.bin": b"abc"})
        start = time.monotonic()
        with pytest.raises(RemoteError) as ei:
            store = RemoteStore(store_remote.url, store_remote.wrong_credentials,
                                config=TransferConfig(retries=5, backoff_initial=30.0))
            store.push(ckpt)
        assert not ei.value.retryable and time.monotonic() - start < 30
        assert re.search("access denied|credentials", str(ei.value))
        for secret in _secret_values(store_remote.wrong_credentials):
            assert secret not in str(ei.value)

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


# --------------------------------------------------------------------------- not per backend


def test_download_refuses_bytes_past_listed_size(tmp_path: Path) -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/dl-test/big", b"y" * 10_000)
    writer_store = LocalStore(tmp_path)
    st = writer_store.staging(make_name(1))
    w = st.open("big")
    entry = FileEntry("big", 100, "blake3", "0" * 64)
    retrier = Retrier(FAST, lambda e, url, action: translate_error(e, url, action))
    with pytest.raises(CorruptCheckpointError, match="larger than"):
        download_file(fs, "/dl-test/big", w, entry, url="memory://dl-test/big", config=FAST,
                      retrier=retrier)
    assert w.size <= 100
    st.abort()
    fs.rm("/dl-test", recursive=True)
    assert list(tmp_path.iterdir()) == []


def test_ranged_download_refuses_bytes_past_listed_size(tmp_path: Path) -> None:
    mib = 1024 * 1024
    cfg = TransferConfig(max_workers=3, block_size=5 * mib, ranged_min_size=5 * mib,
                         retries=1)
    fs = fsspec.filesystem("memory")
    body = os.urandom(12 * mib)
    fs.pipe_file("/dl-ranged/big", body + b"extra")
    st = LocalStore(tmp_path).staging(make_name(1))
    w = st.open("big")
    entry = FileEntry("big", len(body), "blake3", blake3.blake3(body).hexdigest())
    retrier = Retrier(cfg, lambda e, url, action: translate_error(e, url, action))
    slots = threading.BoundedSemaphore(2)
    with pytest.raises(CorruptCheckpointError, match="larger than"):
        download_file_ranged(fs, "/dl-ranged/big", w, entry, url="memory://dl-ranged/big",
                             config=cfg, retrier=retrier, slots=slots)
    assert w.size == len(body)
    assert slots.acquire(blocking=False) and slots.acquire(blocking=False)  # all given back
    st.abort()
    fs.rm("/dl-ranged", recursive=True)


def test_crash_mid_upload_then_rerun_commits_once(tmp_path: Path) -> None:
    """A process killed in the middle of a push leaves nothing committed; a rerun commits."""
    local = LocalStore(tmp_path / "a")
    ckpt = make_local(local, 7, files_for(7))
    url = f"file://{tmp_path}/remote/run"
    script = textwrap.dedent(f"""
        import fsspec
        from faults import FaultFS, kill
        from ckptsync.local import LocalStore
        from ckptsync.remote import RemoteStore
        fs = FaultFS(fsspec.filesystem("file"))
        fs.fail_on("write", nth=2, exc=kill)
        ckpt = LocalStore({str(local.directory)!r}).get({ckpt.name!r})
        RemoteStore({url!r}, fs=fs).push(ckpt)
        print("pushed: the fault did not fire")
    """)
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'tests'}{os.pathsep}{REPO}")
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


def test_unknown_scheme() -> None:
    with pytest.raises(ConfigError, match="unknown URL scheme 'nosuch'"):
        RemoteStore("nosuch://bucket/x")


@pytest.mark.parametrize(("scheme", "module", "extra"),
                         [("s3", "s3fs", "s3"), ("gs", "gcsfs", "gcs"),
                          ("gdrive", "gdrive_fsspec", "gdrive")])
def test_missing_optional_package_names_the_extra(scheme: str, module: str, extra: str) -> None:
    script = textwrap.dedent(f"""
        import sys
        sys.modules[{module!r}] = None
        from ckptsync.errors import ConfigError
        from ckptsync.remote import RemoteStore
        try:
            RemoteStore("{scheme}://bucket/run")
        except ConfigError as e:
            print(e)
            sys.exit(0)
        sys.exit(1)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"pip install 'ckptsync[{extra}]'" in proc.stdout


def test_imports_without_torch() -> None:
    script = ("import sys; sys.modules['torch'] = None; sys.modules['numpy'] = None\n"
              "import ckptsync.remote, ckptsync.cli, ckptsync.transfer, ckptsync.config\n"
              "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
              "print('ok')")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_translate_error_keeps_cause_and_hides_secrets() -> None:
    exc = PermissionError("denied for secret s3cr3t-KEY-value")
    err = translate_error(exc, "s3://AKIAXX:s3cr3t-KEY-value@bucket/run?token=abc",
                          "upload to", secrets=["s3cr3t-KEY-value"])
    assert isinstance(err, RemoteError) and not err.retryable
    assert "s3cr3t" not in str(err) and "AKIAXX" not in str(err) and "token" not in str(err)
    assert "s3://bucket/run" in str(err) and "access denied" in str(err)
    assert translate_error(ConnectionError("reset"), "s3://b/x").retryable  # type: ignore[attr-defined]
    assert isinstance(translate_error(ImportError("no s3fs"), "s3://b/x"), ConfigError)


def test_storage_options_never_in_messages(tmp_path: Path) -> None:
    secret = "very-secret-token-123"
    fs = FaultFS(fsspec.filesystem("memory"))
    fs.fail_on("ls", nth=1, exc=PermissionError(f"bad token {secret}"))
    store = RemoteStore("memory://sec/run", {"token": secret}, fs=fs, config=FAST)
    with pytest.raises(RemoteError) as ei:
        store.list()
    assert secret not in str(ei.value) and secret not in repr(store)
    assert isinstance(ei.value.__cause__, PermissionError)


def test_transfer_config_precedence() -> None:
    env = {"CKPTSYNC_MAX_WORKERS": "3", "CKPTSYNC_RETRIES": "9", "CKPTSYNC_GRACE": "60"}
    cfg = TransferConfig.resolve(env=env, retries=2, max_workers=None)
    assert (cfg.max_workers, cfg.retries, cfg.grace_s) == (3, 2, 60.0)
    assert TransferConfig.resolve(env={}) == TransferConfig()
    with pytest.raises(ConfigError, match="CKPTSYNC_MAX_WORKERS"):
        TransferConfig.resolve(env={"CKPTSYNC_MAX_WORKERS": "many"})
    with pytest.raises(ConfigError):
        TransferConfig(max_workers=0)
    with pytest.raises(ConfigError, match="unknown transfer setting"):
        TransferConfig.resolve(env={}, nope=1)


def test_transfer_aborted_is_not_retryable() -> None:
    assert not TransferAborted("x").retryable


# --------------------------------------------------------------------------- mid-body faults

MIB = 1024 * 1024


def _through(remote: Any, proxy: FaultProxy) -> dict[str, Any]:
    """``remote``'s storage options with the endpoint pointing at ``proxy``."""
    opts = json.loads(json.dumps(remote.storage_options))
    opts["client_kwargs"]["endpoint_url"] = proxy.endpoint
    return opts


def _proxy(remote: Any, *faults: Fault) -> FaultProxy:
    host, port = remote.extra["endpoint"].rsplit("/", 1)[1].split(":")
    return FaultProxy(host, int(port), plan=faults, lifetime=120)


# A ranged download (parallel ranges through botocore), a streamed one (s3fs's file object,
# which reads in ranges too) and a whole-object GET (the manifest): each reset mid-body once.
MID_BODY = {
    "ranged": (TransferConfig(max_workers=2, block_size=5 * MIB, ranged_min_size=5 * MIB,
                              retries=3, backoff_initial=0.0, backoff_max=0.0),
               Fault(path_contains="/w.bin", ranged=True, nth=2)),
    "streamed": (TransferConfig(max_workers=2, block_size=5 * MIB, retries=3,
                                backoff_initial=0.0, backoff_max=0.0),
                 Fault(path_contains="/w.bin", ranged=True, nth=1)),
    # Manifests are read with a bounded (ranged) GET: at most the size bound + 1 byte.
    "manifest": (FAST, Fault(path_contains=f"/{MANIFEST_NAME}", ranged=True, nth=1)),
}


@pytest.mark.parametrize("kind", list(MID_BODY))
def test_pull_survives_a_reset_mid_body(s3_remote: Any, tmp_path: Path, kind: str) -> None:
    config, fault = MID_BODY[kind]
    body = os.urandom(12 * MIB + 12345)
    ckpt = make_local(LocalStore(tmp_path / "a"), 3, {"w.bin": body, "small.bin": b"x" * 100})
    make_store(s3_remote).push(ckpt)
    with _proxy(s3_remote, fault) as proxy:
        store = RemoteStore(s3_remote.url, _through(s3_remote, proxy), config=config)
        got = store.pull(None, LocalStore(tmp_path / "b"))
    assert len(proxy.fired) == 1, proxy.requests
    assert got.name == ckpt.name
    assert (got.path / "w.bin").read_bytes() == body
    assert (got.path / "small.bin").read_bytes() == b"x" * 100


def test_verify_survives_a_reset_mid_body(s3_remote: Any, tmp_path: Path) -> None:
    body = os.urandom(11 * MIB)
    ckpt = make_local(LocalStore(tmp_path / "a"), 3, {"w.bin": body})
    make_store(s3_remote).push(ckpt)
    config = MID_BODY["streamed"][0]
    with _proxy(s3_remote, Fault(path_contains="/w.bin", ranged=True, nth=1)) as proxy:
        store = RemoteStore(s3_remote.url, _through(s3_remote, proxy), config=config)
        assert store.verify(ckpt.name).name == ckpt.name
    assert len(proxy.fired) == 1, proxy.requests


@pytest.mark.parametrize("kind", ["ranged", "streamed"])
def test_checkpointer_restore_survives_a_reset_mid_body(s3_remote: Any, tmp_path: Path,
                                                        kind: str) -> None:
    import torch

    from ckptsync import Checkpointer

    torch.manual_seed(0)
    model = torch.nn.Linear(1024, 2048)  # model.pt is 8 MiB: two ranges of 5 MiB
    with Checkpointer(tmp_path / "a", remote_store=make_store(s3_remote)) as c:
        c.save(5, model=model)
    config, fault = MID_BODY[kind]
    fresh = torch.nn.Linear(1024, 2048)
    with _proxy(s3_remote, Fault(path_contains="/model.pt", ranged=True, nth=fault.nth)) as proxy:
        store = RemoteStore(s3_remote.url, _through(s3_remote, proxy), config=config)
        with Checkpointer(tmp_path / "b", remote_store=store) as c:
            info = c.restore(model=fresh)
    assert len(proxy.fired) == 1, proxy.requests
    assert info is not None and info.step == 5
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


@pytest.mark.parametrize("make", [
    lambda: _botocore("ResponseStreamingError", error=ConnectionResetError(104, "reset")),
    lambda: _botocore("IncompleteReadError", actual_bytes=10, expected_bytes=20),
    lambda: _botocore("FlexibleChecksumError", error_msg="crc32 mismatch"),
    lambda: __import__("http.client").client.IncompleteRead(b"abc", 10),
    lambda: __import__("urllib3").exceptions.ProtocolError(
        "Connection broken", __import__("urllib3").exceptions.IncompleteRead(3, 7)),
    lambda: __import__("aiohttp").ClientPayloadError("Response payload is not completed"),
])
def test_mid_body_errors_are_retryable(make: Any) -> None:
    err = translate_error(make(), "s3://bucket/run/x", "download from")
    assert isinstance(err, RemoteError) and err.retryable, err


def test_retryable_is_read_through_the_cause_chain() -> None:
    class WrapperError(Exception):
        pass

    try:
        try:
            raise ConnectionResetError(104, "Connection reset by peer")
        except ConnectionResetError as inner:
            raise WrapperError("read failed") from inner
    except WrapperError as e:
        err = translate_error(e, "s3://bucket/run/x", "download from")
    assert isinstance(err, RemoteError) and err.retryable
    assert not translate_error(WrapperError("bad request"), "s3://b/x").retryable  # type: ignore[attr-defined]


def _botocore(name: str, **kwargs: Any) -> BaseException:
    import botocore.exceptions

    exc: BaseException = getattr(botocore.exceptions, name)(**kwargs)
    return exc
