"""The atomic local store: staging, hashing while writing, commit, listing, verify, delete."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

import blake3
import pytest

from ckptsync import local
from ckptsync.errors import (
    CkptSyncError,
    CorruptCheckpointError,
    LocalStorageError,
    ManifestError,
    NoCheckpointError,
)
from ckptsync.local import (
    FileOps,
    HashingWriter,
    LocalCheckpoint,
    LocalStore,
    hash_file,
    open_verified,
)
from ckptsync.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest, make_name
from tests.support.formats import rewrite_as_v1
from tests.support.helpers import RecordingOps, fail_at, file_bytes, staging_dirs

pytestmark = pytest.mark.core


def b3(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def commit(store: LocalStore, step: int | None, files: dict[str, bytes],
           **kw: Any) -> LocalCheckpoint:
    name = make_name(step)
    st = store.staging(name)
    for rel, data in files.items():
        st.write_file(rel, data)
    return st.commit(Manifest.new(step=step, files=st.entries, name=name, **kw))


def test_commit_makes_a_verified_checkpoint_and_leaves_no_staging(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "ckpts")
    files = {"model.pt": b"m" * 1000, "nested/dir/opt.pt": b"o" * 10, "empty.bin": b""}
    ckpt = commit(store, 5, files, metrics={"loss": 1.0})
    assert ckpt.path == store.directory / ckpt.name and ckpt.step == 5
    assert staging_dirs(store.directory) == []
    for e in ckpt.manifest.files:
        data = files[e.path]
        assert ckpt.file(e.path).read_bytes() == data
        assert (e.size, e.algo, e.digest) == (len(data), "blake3", b3(data))
    store.verify(ckpt)
    assert store.get(ckpt.name) == ckpt
    assert Manifest.from_json((ckpt.path / MANIFEST_NAME).read_bytes(), where="x") == ckpt.manifest


def test_write_file_accepts_chunks(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    st = store.staging(make_name(1))
    e = st.write_file("a.bin", iter([b"ab", bytearray(b"cd"), memoryview(b"ef")]))
    assert (e.size, e.algo, e.digest) == (6, "blake3", b3(b"abcdef"))
    st.abort()


def test_staging_is_invisible_until_commit_and_abort_removes_it(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    name = make_name(1)
    st = store.staging(name)
    st.write_file("a.bin", b"x")
    w = st.open("b.bin")
    w.write(b"partial")
    assert store.list() == [] and st.path.name.startswith(".staging-")
    with pytest.raises(NoCheckpointError):
        store.get(name)
    st.abort()
    assert not st.path.exists() and list(tmp_path.iterdir()) == []


def test_commit_checks_the_manifest_name(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    st = store.staging(make_name(1))
    with pytest.raises(ValueError, match="name"):
        st.commit(Manifest.new(step=1, files=[]))
    st.abort()


def test_commit_order_manifest_last_then_rename_then_parent_fsync(tmp_path: Path) -> None:
    ops = RecordingOps()
    store = LocalStore(tmp_path, ops=ops)
    ckpt = commit(store, 1, {"a.bin": b"a", "b.bin": b"b"})
    calls = [(op, Path(p.split(" -> ")[0]).name if op != "fsync" else "") for op, p in ops.calls]
    opened = [p for op, p in calls if op == "open_write"]
    assert opened == ["a.bin", "b.bin", MANIFEST_NAME]
    ops_only = [op for op, _ in calls]
    # Every file (manifest included) is fsynced before the rename that publishes it.
    assert ops_only.count("fsync") == 3
    assert ops_only.index("rename") > max(i for i, op in enumerate(ops_only) if op == "fsync")
    assert ops_only[-3:] == ["fsync_dir", "rename", "fsync_dir"]
    assert ops.calls[-1][1] == str(store.directory) and ckpt.path.is_dir()


def test_hashing_writer_handles_short_writes(tmp_path: Path) -> None:
    class ShortWrites(FileOps):
        def write(self, f: Any, data: Any) -> int:
            return f.write(bytes(data[:3]))

    data = bytes(range(256)) * 10
    with HashingWriter(tmp_path / "f", ShortWrites()) as w:
        assert w.write(data) == len(data)
        assert w.tell() == len(data) and w.writable() and not w.seekable()
    assert (tmp_path / "f").read_bytes() == data
    assert w.entry("f").digest == b3(data) == hash_file(tmp_path / "f")[1]


def test_large_writes_are_hashed_on_a_helper_thread_before_write_returns(
        tmp_path: Path) -> None:
    """A large write is hashed beside the disk write, and write() returns only once it is
    hashed: a caller that refills its buffer right away (as a download does) must not change
    the digest. Small and large writes interleave in order."""
    threads_seen: set[str] = set()

    class Ops(FileOps):
        def write(self, f: Any, data: Any) -> int:
            threads_seen.update(t.name for t in threading.enumerate())
            return f.write(data)

    big = 32 * 1024 * 1024  # ~10 ms of BLAKE3: a write that did not wait would be overtaken
    buf = bytearray(os.urandom(big))
    expected = blake3.blake3()
    with HashingWriter(tmp_path / "f", Ops()) as w:
        for i in range(3):
            expected.update(buf)
            w.write(buf)
            buf[:] = bytes([i]) * big  # refill at once, as a reused buffer is
            expected.update(b"hdr%d" % i)
            w.write(b"hdr%d" % i)
        size = w.size
    assert any(n.startswith("ckptsync-hash") for n in threads_seen)
    assert w.entry("f").digest == expected.hexdigest() == hash_file(tmp_path / "f")[1]
    assert size == (tmp_path / "f").stat().st_size == 3 * (big + 4)


def test_hashing_writer_refuses_to_overwrite(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        HashingWriter(tmp_path / "f")
    assert (tmp_path / "f").read_bytes() == b"keep"


def test_hash_file_in_chunks(tmp_path: Path) -> None:
    data = b"0123456789" * 1000
    (tmp_path / "f").write_bytes(data)
    assert hash_file(tmp_path / "f", chunk=7) == (len(data), b3(data))
    assert hash_file(tmp_path / "f", chunk=7, algo="sha256") == (
        len(data), hashlib.sha256(data).hexdigest())


def test_open_verified(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    ckpt = commit(store, 1, {"a.bin": b"hello"})
    (entry,) = ckpt.manifest.files
    with open_verified(ckpt.file("a.bin"), entry) as f:
        assert f.read() == b"hello"
    ckpt.file("a.bin").write_bytes(b"hellO")
    with pytest.raises(CorruptCheckpointError, match=r"a\.bin"):
        open_verified(ckpt.file("a.bin"), entry)


def test_list_is_oldest_first_and_skips_what_is_not_a_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = LocalStore(tmp_path)
    c10 = commit(store, 10, {"a": b"1"})
    c2 = commit(store, 2, {"a": b"2"})
    c2b = commit(store, 2, {"a": b"3"})
    (tmp_path / "no-manifest").mkdir()
    (tmp_path / "a-file").write_text("x")
    (tmp_path / ".hidden").mkdir()
    bad = commit(store, 11, {"a": b"4"})
    (bad.path / MANIFEST_NAME).write_text("{")
    moved = commit(store, 12, {"a": b"5"})
    moved.path.rename(tmp_path / "renamed")  # manifest names another directory
    with caplog.at_level(logging.WARNING, logger="ckptsync"):
        assert [c.name for c in store.list()] == [c2.name, c2b.name, c10.name]
    assert str(bad.path / MANIFEST_NAME) in caplog.text and "renamed" in caplog.text
    with pytest.raises(ManifestError, match="lives in 'renamed'"):
        store.get("renamed")


def test_verify_full_and_size_only(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    ckpt = commit(store, 1, {"a.bin": b"abcdef", "b.bin": b"xyz"})
    ckpt.file("a.bin").write_bytes(b"abcdeF")  # same size, other bytes
    store.verify(ckpt, full=False)  # size-only check cannot see it
    with pytest.raises(CorruptCheckpointError, match="blake3 digest does not match") as e:
        store.verify(ckpt)
    assert e.value.path == str(ckpt.file("a.bin"))
    ckpt.file("b.bin").write_bytes(b"xy")
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        store.verify(ckpt, full=False)
    ckpt.file("b.bin").unlink()
    with pytest.raises(CorruptCheckpointError, match="missing"):
        store.verify(ckpt, full=False)


def test_checkpoint_file_refuses_unsafe_paths(tmp_path: Path) -> None:
    ckpt = commit(LocalStore(tmp_path), 1, {"a": b"1"})
    with pytest.raises(ManifestError):
        ckpt.file("../a")


def test_staging_refuses_unsafe_paths(tmp_path: Path) -> None:
    st = LocalStore(tmp_path).staging(make_name(1))
    for bad in ("../escape", "/abs", MANIFEST_NAME):
        with pytest.raises(ManifestError):
            st.open(bad)
    st.abort()
    assert list(tmp_path.iterdir()) == []


def test_same_file_twice_in_one_staging_is_a_storage_error(tmp_path: Path) -> None:
    st = LocalStore(tmp_path).staging(make_name(1))
    st.write_file("a", b"1")
    with pytest.raises(LocalStorageError, match="a"):
        st.write_file("a", b"2")
    st.abort()


def test_delete_removes_a_checkpoint_and_leaves_the_others(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    keep = commit(store, 1, {"a": b"1"})
    gone = commit(store, 2, {"a": b"2", "d/b": b"3"})
    before = file_bytes(keep.path)
    store.delete(gone.name)
    assert [c.name for c in store.list()] == [keep.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == [keep.name]
    assert file_bytes(keep.path) == before
    store.delete(gone.name)  # deleting twice is a no-op
    store.delete(make_name(7))  # so is deleting a checkpoint that never existed
    with pytest.raises(ManifestError, match="not a ckptsync checkpoint name"):
        store.delete("never-existed")  # a name ckptsync never writes: refused, not ignored


def test_delete_never_reaches_outside_the_directory(tmp_path: Path) -> None:
    """A name like '../other-run/ckpt' (from a CLI argument) must not touch another run."""
    other = LocalStore(tmp_path / "other-run")
    victim = commit(other, 1, {"a": b"precious"})
    before = file_bytes(victim.path)
    store = LocalStore(tmp_path / "run")
    with contextlib.suppress(CkptSyncError, ValueError):
        store.delete(f"../other-run/{victim.name}")
    assert file_bytes(victim.path) == before
    assert [c.name for c in other.list()] == [victim.name]


def test_cleanup_removes_only_leftovers(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    ckpt = commit(store, 1, {"a": b"1"})
    st = store.staging(make_name(2))
    st.write_file("a", b"2")
    trash = f".deleting-{make_name(0)}"
    (tmp_path / trash).mkdir()
    (tmp_path / ".deleting-old").mkdir()  # not a name ckptsync makes: the user's
    (tmp_path / ".staging-file").write_text("a file, not a staging dir")
    before = file_bytes(ckpt.path)
    removed = store.cleanup()
    assert sorted(removed) == sorted([st.path.name, trash])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [ckpt.name, ".staging-file", ".deleting-old"])
    assert file_bytes(ckpt.path) == before
    assert store.cleanup() == []


def test_store_creates_its_directory(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "a" / "b")
    assert store.directory.is_dir() and store.directory.is_absolute()


def test_store_under_a_file_is_a_storage_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(LocalStorageError) as e:
        LocalStore(tmp_path / "f" / "ckpts")
    assert str(tmp_path / "f" / "ckpts") in str(e.value)


def test_storage_error_message_says_what_where_and_what_to_do(tmp_path: Path) -> None:
    full = fail_at(0, lambda: OSError(errno.ENOSPC, "No space left on device"), ops=["write"])
    st = LocalStore(tmp_path, ops=full).staging(make_name(1))
    with pytest.raises(LocalStorageError) as e:
        st.write_file("model.pt", b"data")
    msg = str(e.value)
    assert e.value.errno == errno.ENOSPC
    assert "model.pt" in msg and "No space left" in msg and "free disk space" in msg
    st.abort()
    assert staging_dirs(tmp_path) == []


def test_commit_failure_is_a_storage_error_and_publishes_nothing(tmp_path: Path) -> None:
    denied = fail_at(0, lambda: PermissionError(errno.EACCES, "Permission denied"),
                     ops=["rename"])
    store = LocalStore(tmp_path, ops=denied)
    name = make_name(1)
    st = store.staging(name)
    st.write_file("a", b"1")
    with pytest.raises(LocalStorageError, match="writable") as e:
        st.commit(Manifest.new(step=1, files=st.entries, name=name))
    assert name in str(e.value)
    assert store.list() == []


def test_hashing_writer_starts_writeback_as_it_goes(tmp_path: Path) -> None:
    """Dirty pages are handed to the disk every WRITEBACK_BYTES (ranges contiguous, covering
    what was written), so the fsync at close does not write the whole file; a file system
    that refuses is asked once, never again, and the file is still written whole."""

    class Recording(FileOps):
        def __init__(self, answer: bool | None) -> None:
            self.ranges: list[tuple[int, int]] = []
            self.answer = answer

        def writeback(self, fd: int, offset: int, nbytes: int) -> bool:
            self.ranges.append((offset, nbytes))
            real = super().writeback(fd, offset, nbytes)
            return real if self.answer is None else self.answer

    data = os.urandom(local.WRITEBACK_BYTES // 3) * 10  # 3.3x the interval, odd-sized chunks
    chunk = local.WRITEBACK_BYTES // 7 + 1
    for answer in (None, False):
        ops = Recording(answer)
        path = tmp_path / f"f-{answer}"
        with HashingWriter(path, ops) as w:
            for i in range(0, len(data), chunk):
                w.write(data[i:i + chunk])
        assert path.read_bytes() == data
        assert w.entry("f").digest == b3(data)
        if answer is False:
            assert len(ops.ranges) == 1
            continue
        assert len(ops.ranges) == 3
        offsets = [o for o, _ in ops.ranges]
        ends = [o + n for o, n in ops.ranges]
        assert offsets[0] == 0 and offsets[1:] == ends[:-1]
        assert all(n >= local.WRITEBACK_BYTES for _, n in ops.ranges)
    if sys.platform.startswith("linux"):  # the real call works on this file system
        fd = os.open(tmp_path / "f-None", os.O_RDONLY)
        try:
            assert FileOps().writeback(fd, 0, 4096)
        finally:
            os.close(fd)


def _bytes_read() -> int:
    """Bytes this process has read through read(2) and friends (``rchar``)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def test_an_oversized_manifest_is_refused_unread(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A 1 GiB manifest (sparse) is refused from its size, naming path, size and
    bound; the checkpoint is skipped, and no byte of the manifest is read."""
    store = LocalStore(tmp_path)
    good = commit(store, 1, {"a": b"1"})
    big = commit(store, 2, {"a": b"2"})
    path = big.path / MANIFEST_NAME
    os.truncate(path, 1 << 30)
    before = _bytes_read()
    with pytest.raises(ManifestError) as e:
        store.get(big.name)
    assert _bytes_read() - before < 64 * 1024
    msg = str(e.value)
    assert str(path) in msg and "1,073,741,824 bytes" in msg
    assert f"{MAX_MANIFEST_BYTES:,}-byte bound" in msg
    with caplog.at_level(logging.WARNING, logger="ckptsync"):
        assert [c.name for c in store.list()] == [good.name]
    assert "bound" in caplog.text


def test_a_v1_checkpoint_verifies_with_sha256(tmp_path: Path) -> None:
    """A checkpoint ``ckptsync/1`` wrote (sha256 entries, no self-digest) lists and verifies;
    its sha256 still catches a flipped byte."""
    store = LocalStore(tmp_path)
    ckpt = commit(store, 3, {"a.bin": b"abcdef", "sub/b.bin": b"xyz"})
    rewrite_as_v1(ckpt.path)
    (got,) = store.list()
    assert got.manifest.format == "ckptsync/1" and {f.algo for f in got.manifest.files} == {
        "sha256"}
    store.verify(got)
    with open_verified(got.file("a.bin"), got.manifest.files[0]) as f:
        assert f.read() == b"abcdef"
    got.file("a.bin").write_bytes(b"abcdeF")
    with pytest.raises(CorruptCheckpointError, match=r"a\.bin: sha256 digest does not match"):
        store.verify(got)


def test_an_edited_step_is_refused(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    ckpt = commit(store, 101, {"a": b"1"})
    path = ckpt.path / MANIFEST_NAME
    path.write_bytes(path.read_bytes().replace(b'"step": 101', b'"step": 301'))
    with pytest.raises(ManifestError, match="altered"):
        store.get(ckpt.name)
    assert store.list() == []
