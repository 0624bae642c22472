"""The optimized transfer paths the benchmarks exercise keep the bytes exact.

Every test restores what it saved and compares bytes (or tensors): parallel multipart upload,
ranged parallel download, server-side copy of unchanged files, and the Checkpointer end to end
on a real S3 server. Sizes and settings are small so that every fast path triggers; no timing.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import blake3
import pytest
import torch

from ckptsync import Checkpointer
from ckptsync.config import TransferConfig
from ckptsync.errors import CorruptCheckpointError
from ckptsync.local import HashingWriter, LocalStore
from ckptsync.manifest import FileEntry
from ckptsync.remote import RemoteStore, translate_error
from ckptsync.transfer import Retrier, Slots, download_file_ranged, upload_file_multipart
from tests.support.remotes import Remote
from tests.support.stores import make_local, read_tree

pytestmark = pytest.mark.core

MiB = 1024 * 1024
# 5 MiB parts (S3's minimum), ranges from 5 MiB: a 13 MiB file is 3 parts / 3 ranges.
FAST = TransferConfig(max_workers=4, block_size=5 * MiB, part_size=5 * MiB, parts_in_flight=3,
                      ranged_min_size=5 * MiB, retries=2, backoff_initial=0.0)






def test_multipart_upload_and_ranged_download_roundtrip(s3_remote: Remote, tmp_path: Path) -> None:
    files = {"big.bin": os.urandom(13 * MiB + 123), "exact.bin": os.urandom(10 * MiB),
             "small.bin": os.urandom(1000), "empty.bin": b"", "sub/mid.bin": os.urandom(6 * MiB)}
    ck = make_local(LocalStore(tmp_path / "src"), 1, files)
    store = RemoteStore(s3_remote.url, s3_remote.storage_options, config=FAST)
    assert store.backend.parallel_parts
    store.push(ck)
    assert store.stats["bytes_uploaded"] == sum(len(b) for b in files.values())
    assert store.verify(ck.name, full=True).files == ck.manifest.files
    got = store.pull(None, LocalStore(tmp_path / "dst"))
    assert read_tree(got.path) == files
    # No multipart upload is left behind.
    bucket = s3_remote.extra["bucket"]
    assert not [u for u in store.fs.list_multipart_uploads(bucket) if "run/" in u.get("Key", "")]


def test_multipart_upload_refuses_changed_file_and_aborts(s3_remote: Remote,
                                                          tmp_path: Path) -> None:
    data = os.urandom(11 * MiB)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    entry = FileEntry("f.bin", len(data), "blake3", blake3.blake3(b"other").hexdigest())
    store = RemoteStore(s3_remote.url, s3_remote.storage_options, config=FAST)
    slots = Slots(FAST.parts_in_flight)
    target = f"{store.root}/x/f.bin"
    with pytest.raises(CorruptCheckpointError, match="no longer matches"):
        upload_file_multipart(store.fs, path, target, entry,
                              open_object=store.backend.object_calls, url="s3://x/f.bin",
                              config=FAST, retrier=Retrier(FAST, translate_error), slots=slots)
    store.fs.invalidate_cache()
    assert not store.fs.exists(target)  # aborted: nothing became visible
    for _ in range(FAST.parts_in_flight):  # every slot given back
        assert slots.acquire(blocking=False)


class CountingSlots(Slots):
    """Slots that record how many block buffers exist and how many are lent at once."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.seen: set[int] = set()
        self.lent = self.most_lent = 0

    def take(self, size: int) -> bytearray:
        buf = super().take(size)
        self.seen.add(id(buf))
        self.lent += 1
        self.most_lent = max(self.most_lent, self.lent)
        return buf

    def give(self, buf: bytearray) -> None:
        self.lent -= 1
        super().give(buf)


def test_part_buffers_are_reused_and_bounded(s3_remote: Remote, tmp_path: Path) -> None:
    """7 parts through 2 slots: the bytes survive buffer reuse, at most 2 buffers ever exist,
    and every one is given back."""
    data = os.urandom(33 * MiB + 7)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    entry = FileEntry("f.bin", len(data), "blake3", blake3.blake3(data).hexdigest())
    store = RemoteStore(s3_remote.url, s3_remote.storage_options, config=FAST)
    target = f"{store.root}/reuse/f.bin"
    retrier = Retrier(FAST, translate_error)
    up = CountingSlots(2)
    upload_file_multipart(store.fs, path, target, entry, open_object=store.backend.object_calls,
                          url="s3://reuse/f.bin", config=FAST, retrier=retrier, slots=up)
    assert len(up.seen) <= 2 and up.most_lent <= 2 and up.lent == 0
    assert up.acquire(blocking=False) and up.acquire(blocking=False)
    with HashingWriter(tmp_path / "back.bin") as w:
        download_file_ranged(store.fs, target, w, entry, url="s3://reuse/f.bin", config=FAST,
                             retrier=retrier, slots=threading.BoundedSemaphore(2),
                             open_ranges=store.backend.open_ranges)
    assert (tmp_path / "back.bin").read_bytes() == data
    assert w.entry("f.bin") == entry


def test_unchanged_files_are_copied_server_side(s3_remote: Remote, tmp_path: Path) -> None:
    local = LocalStore(tmp_path / "src")
    files = {f"f{i}.bin": os.urandom(64 * 1024 + i) for i in range(10)}
    store = RemoteStore(s3_remote.url, s3_remote.storage_options, config=FAST)
    store.push(make_local(local, 1, files))
    files2 = dict(files, **{"f3.bin": os.urandom(5000)})
    ck2 = make_local(local, 2, files2)
    before = dict(store.stats)
    store.push(ck2)
    sent = store.stats["bytes_uploaded"] - before["bytes_uploaded"]
    copied = store.stats["bytes_copied"] - before["bytes_copied"]
    assert sent == 5000
    assert copied == sum(len(b) for k, b in files.items() if k != "f3.bin")
    got = RemoteStore(s3_remote.url, s3_remote.storage_options, config=FAST).pull(
        ck2.name, LocalStore(tmp_path / "dst"))
    assert read_tree(got.path) == files2


def test_checkpointer_restores_exact_tensors_through_fast_paths(s3_remote: Remote,
                                                                tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 1024))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 1024)).sum().backward()
    opt.step()
    store = RemoteStore(s3_remote.url, s3_remote.storage_options, config=FAST)
    with Checkpointer(tmp_path / "a", remote_store=store) as c:
        c.save(1, model=model, optimizer=opt)  # optimizer.pt is ~8 MiB: multipart
        with torch.no_grad():
            model[0].weight.add_(1.0)  # model.pt changes, the rest is copied
        c.save(2, model=model, optimizer=opt)
    assert store.stats["bytes_copied"] > 0
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 1024))
    fresh_opt = torch.optim.AdamW(fresh.parameters())
    restore_store = RemoteStore(s3_remote.url, s3_remote.storage_options, config=FAST)
    with Checkpointer(tmp_path / "b", remote_store=restore_store) as c:
        info = c.restore(model=fresh, optimizer=fresh_opt)
    assert info is not None and info.step == 2
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, expected[k]), k
    for a, b in zip(opt.state_dict()["state"].values(), fresh_opt.state_dict()["state"].values(),
                    strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"],
                                                                       b["exp_avg_sq"])


def test_streamed_upload_is_used_and_falls_back_when_incomplete(s3_remote: Remote,
                                                                tmp_path: Path) -> None:
    """Two saves on one store, each with more files streaming at once than parts in flight
    (small ones too, as rng.pt is): nothing waits forever, every byte arrives, and every slot
    of the store's long-lived window is given back."""
    store = RemoteStore(s3_remote.url, s3_remote.storage_options, config=FAST)
    for step in (1, 2):
        files = {"a.bin": os.urandom(12 * MiB + 7), "b.bin": os.urandom(11 * MiB),
                 **{f"s{i}.bin": os.urandom(1000 + i) for i in range(FAST.parts_in_flight)}}
        ck = make_local(LocalStore(tmp_path / f"src{step}"), step, files)
        streams = {}
        for rel, data in files.items():  # fed the whole file, as torch.save would ...
            stream = streams[rel] = store.stream_file(ck.name, rel)
            assert stream is not None
            if rel == "b.bin":
                data = data[: 7 * MiB]  # ... except b.bin, fed in part: must not be used
            for i in range(0, len(data), 3 * MiB):
                stream.write(memoryview(data)[i : i + 3 * MiB])
        store.push(ck, streams=streams)
        got = RemoteStore(s3_remote.url, s3_remote.storage_options, config=FAST).pull(
            ck.name, LocalStore(tmp_path / f"dst{step}"))
        assert read_tree(got.path) == files
    bucket = s3_remote.extra["bucket"]
    assert not [u for u in store.fs.list_multipart_uploads(bucket) if "run/" in u.get("Key", "")]
    slots = store.pusher.stream_slots
    assert all(slots.acquire(blocking=False) for _ in range(FAST.parts_in_flight))


def test_parts_go_through_a_blocking_client_with_credentials_from_the_environment(
        s3_remote: Remote, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No keys in storage_options: the part client resolves the same chain s3fs does."""
    from ckptsync.remote.backends.s3object import S3Object
    from tests.support.servers import ACCESS_KEY, SECRET_KEY

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    options = {k: v for k, v in s3_remote.storage_options.items() if k not in ("key", "secret")}
    store = RemoteStore(s3_remote.url, options, config=FAST)
    sender = store.backend.object_calls(f"{store.root}/probe", 2)
    assert isinstance(sender, S3Object) and sender.direct  # not the single-thread s3fs way
    sender.close()
    files = {"big.bin": os.urandom(12 * MiB + 5)}
    ck = make_local(LocalStore(tmp_path / "src"), 1, files)
    store.push(ck)
    assert read_tree(RemoteStore(s3_remote.url, options, config=FAST).pull(
        None, LocalStore(tmp_path / "dst")).path) == files


def test_a_failed_part_is_a_clear_error_and_nothing_is_visible(s3_remote: Remote,
                                                                tmp_path: Path) -> None:
    from ckptsync.errors import RemoteError
    from ckptsync.remote.backends.s3object import S3Object

    store = RemoteStore(s3_remote.url, s3_remote.storage_options, config=FAST)
    target = f"{store.root}/x/f.bin"
    sender = store.backend.object_calls(target, 2)
    assert isinstance(sender, S3Object) and sender.direct
    retrier = Retrier(FAST, translate_error)
    with pytest.raises(RemoteError, match=r"cannot upload to s3://.*/x/f\.bin"):
        retrier.call(lambda: sender.upload_part(PartNumber=1, UploadId="no-such-upload",
                                                Body=b"x" * 1024),
                     url=s3_remote.url + "/x/f.bin", action="upload to")
    with pytest.raises(FileNotFoundError):  # a missing object reads as s3fs reports it
        sender.get_range(0, 10)
    sender.close()
    store.fs.invalidate_cache()
    assert not store.fs.exists(target)


def test_truncated_or_missing_big_file_fails_the_ranged_download(s3_remote: Remote,
                                                                 tmp_path: Path) -> None:
    files = {"big.bin": os.urandom(12 * MiB), "other.bin": os.urandom(11 * MiB)}
    ck = make_local(LocalStore(tmp_path / "src"), 1, files)
    store = RemoteStore(s3_remote.url, s3_remote.storage_options, config=FAST)
    store.push(ck)
    store.fs.pipe_file(f"{store.root}/{ck.name}/big.bin", files["big.bin"][: 7 * MiB])
    store.fs.rm_file(f"{store.root}/{ck.name}/other.bin")
    from ckptsync.local import HashingWriter
    from ckptsync.transfer import download_file_ranged

    for rel, what in (("big.bin", "shorter than"), ("other.bin", "missing")):
        entry = next(f for f in ck.manifest.files if f.path == rel)
        slots = threading.BoundedSemaphore(3)
        with HashingWriter(tmp_path / f"out-{rel}") as w, pytest.raises(CorruptCheckpointError,
                                                                          match=what):
            download_file_ranged(store.fs, f"{store.root}/{ck.name}/{rel}", w, entry,
                                 url=f"{s3_remote.url}/{ck.name}/{rel}", config=FAST,
                                 retrier=Retrier(FAST, translate_error), slots=slots,
                                 open_ranges=store.backend.open_ranges)
        for _ in range(3):  # every slot given back
            assert slots.acquire(blocking=False)
    # The checkpoint as a whole: pull says which file is wrong and leaves no local checkpoint.
    with pytest.raises(CorruptCheckpointError):
        store.pull(ck.name, LocalStore(tmp_path / "dst"))
    assert LocalStore(tmp_path / "dst").list() == []
