"""The daemon under pressure: a trainer whose own retention deletes checkpoints
while they are uploaded, errors of any kind once running, ambiguous remote outcomes, and a
``status`` that never says "synced" while anything is not.

The daemon runs in-process (:class:`~ckptsync.daemon.Watcher` on a thread, real inotify on
``tmp_path``) so that its remote can be a fault seam (tests/faults.py ``FaultFS``, or an s3fs
subclass that loses one reply); its JSON event log is captured.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import fsspec
import pytest
import torch

from ckptsync import Checkpointer
from ckptsync.config import TransferConfig
from ckptsync.daemon import EXIT_OK, format_status
from ckptsync.local import LocalCheckpoint, LocalStore
from ckptsync.manifest import Manifest, make_name
from ckptsync.remote import RemoteStore
from tests.support.daemon import InProcessDaemon
from tests.support.faults import FaultFS
from tests.support.remotes import Remote
from tests.support.watchkit import assert_remote_sound, make_checkpoints, wait_for

pytestmark = pytest.mark.core

MiB = 1024 * 1024


def _file_store(root: Path, fs: FaultFS, cls: type[RemoteStore] = RemoteStore,
                **config: Any) -> RemoteStore:
    return cls(f"file://{root}", fs=fs,
               config=TransferConfig(retries=2, backoff_initial=0.01, **config))


class _CountingStore(RemoteStore):
    """A remote store that counts the pushes running in it at once (``most_at_once``): the
    daemon's own calls, through the real push."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._count_lock = threading.Lock()
        self._running = 0
        self.most_at_once = 0

    def push(self, *args: Any, **kwargs: Any) -> Manifest:
        with self._count_lock:
            self._running += 1
            self.most_at_once = max(self.most_at_once, self._running)
        try:
            return super().push(*args, **kwargs)
        finally:
            with self._count_lock:
                self._running -= 1


# ---------------------------------------------------------------------- a trainer's own retention
def test_fast_trainer_with_own_retention_never_starves_the_daemon(
        tmp_path: Path, daemons: list[InProcessDaemon]) -> None:
    """A trainer (Checkpointer keep_last=2) saves far faster than a slow link uploads: the
    daemon pushes the newest first, drops what the trainer deleted without calling it a
    failure, stays at most one push (in flight) plus the newest behind, and commits the last
    checkpoint soon after training ends."""
    local = tmp_path / "ckpts"
    fs = FaultFS(fsspec.filesystem("file"))
    fs.set_delay(0.04)  # every remote call: a high-latency link (a push is ~10 calls)
    store = _file_store(tmp_path / "remote", fs, _CountingStore)
    assert isinstance(store, _CountingStore)
    d = InProcessDaemon(local, store=store, wait_running=True, interval=1.0)
    daemons.append(d)

    model = torch.nn.Linear(256, 512)  # ~0.5 MB a checkpoint
    saved: dict[int, float] = {}  # step -> when its local commit was done
    ckpt = Checkpointer(local, keep_last=2)
    try:
        for step in range(1, 41):
            with torch.no_grad():
                model.weight.add_(1.0)
            ckpt.save(step, model=model)
            ckpt.wait()
            saved[step] = time.monotonic()
            time.sleep(0.03)
    finally:
        ckpt.close()
    ended = time.monotonic()
    newest = max(saved)
    final = wait_for(lambda: next((t for t, e in d.log.timed("pushed") if e["step"] == newest),
                                  None), "the newest checkpoint to be committed", timeout=30)
    assert final - ended < 10, f"the newest checkpoint was committed {final - ended:.1f}s late"
    assert d.alive()

    assert d.events("push_failed") == []  # vanished checkpoints are dropped, not failures
    for e in d.events("push_dropped"):
        assert e["reason"] == "gone"
    # Newest first: every push started during training was of the newest checkpoint saved
    # then (give or take the one saved while the scan ran), so the remote never fell further
    # behind than the push in flight plus the newest.
    starts = [(t, e["step"]) for t, e in d.log.timed("push_start") if t < ended]
    assert starts, "no push started during training"
    for t, step in starts:
        newest_then = max(s for s, when in saved.items() if when <= t)
        assert step >= newest_then - 1, f"pushed step {step} while step {newest_then} waited"
    # One push in flight at a time, counted in the store the pushes run in (the event log's
    # "pushed" line is written by the daemon's dispatcher, and may trail the next push_start).
    assert store.most_at_once == 1, f"{store.most_at_once} pushes ran at once for one source"
    assert len(d.events("push_start")) < len(saved) // 2  # superseded ones were never started

    wait_for(lambda: d.status()["in_sync"], "the daemon to report in sync", timeout=30)
    st = d.status()
    remote = {m.name for m in RemoteStore(f"file://{tmp_path / 'remote'}").list()}
    assert set(st["synced"]) <= remote and st["failed"] == [] and st["pending"] == []
    assert {c.name for c in LocalStore(local).list()} <= remote
    assert d.stop() == EXIT_OK


# --------------------------------------------------------------------- an error no boundary knows
class _UnknownBackendError(Exception):
    """An exception type no error boundary knows."""


def test_any_error_once_running_is_reported_and_the_daemon_keeps_syncing(
        tmp_path: Path, daemons: list[InProcessDaemon]) -> None:
    local = tmp_path / "ckpts"
    fs = FaultFS(fsspec.filesystem("file"))
    store = _file_store(tmp_path / "remote", fs)
    d = InProcessDaemon(local, store=store, wait_running=True, interval=0.5)
    daemons.append(d)
    first = make_checkpoints(local, [1])[0]
    wait_for(lambda: d.events("pushed"), "the first push")

    fs.fail_on("open:wb", nth=1, exc=_UnknownBackendError("the backend broke in a new way"))
    second = make_checkpoints(local, [2])[0]
    failed = wait_for(lambda: d.events("push_failed"), "a failed push")
    assert failed[0]["name"] == second and "new way" in failed[0]["error"]
    st = wait_for(lambda: d.status()["failed"] and d.status(), "the failure in status")
    assert st["failed"][0]["name"] == second and st["in_sync"] is False
    assert "NOT in sync" in format_status(st)

    third = make_checkpoints(local, [3])[0]  # the rest keeps syncing meanwhile
    wait_for(lambda: any(e["name"] == third for e in d.events("pushed")), "the next push",
             timeout=30)
    assert d.alive() and d.events("fatal") == []
    # ... and the failed one is retried after its back-off, and committed.
    wait_for(lambda: d.status()["in_sync"], "every checkpoint committed", timeout=60)
    remote = RemoteStore(f"file://{tmp_path / 'remote'}")
    assert [m.name for m in assert_remote_sound(remote)] == [first, second, third]
    assert d.stop() == EXIT_OK


def _lost_complete_reply_fs(storage_options: dict[str, Any]) -> Any:
    import s3fs

    class LostCompleteReply(s3fs.S3FileSystem):
        """S3 completes the multipart upload, but the client's first reply is lost; a retry
        then finds no such upload (it is complete), which s3fs reports as not found."""

        lost = 0
        completed: ClassVar[set[str]] = set()

        async def _call_s3(self, method: str, *args: Any, **kwargs: Any) -> Any:
            if method == "complete_multipart_upload" and kwargs["UploadId"] in self.completed:
                raise FileNotFoundError(errno.ENOENT, "NoSuchUpload: The specified multipart "
                                        "upload does not exist")
            out = await super()._call_s3(method, *args, **kwargs)
            if method == "complete_multipart_upload" and not LostCompleteReply.lost:
                LostCompleteReply.lost += 1
                self.completed.add(kwargs["UploadId"])
                raise TimeoutError("injected: the reply to CompleteMultipartUpload was lost")
            return out

    return LostCompleteReply(skip_instance_cache=True, **storage_options)


def test_complete_multipart_whose_reply_is_lost_commits_once_and_the_daemon_runs_on(
        tmp_path: Path, s3_remote: Remote, daemons: list[InProcessDaemon]) -> None:
    fs = _lost_complete_reply_fs(s3_remote.storage_options)
    config = TransferConfig(max_workers=2, block_size=5 * MiB, part_size=5 * MiB,
                            parts_in_flight=2, retries=3, backoff_initial=0.01)
    store = RemoteStore(s3_remote.url, fs=fs, config=config)
    assert store.backend.parallel_parts
    local = tmp_path / "ckpts"
    lstore = LocalStore(local)
    name = make_name(7)
    st = lstore.staging(name)
    st.write_file("model.pt", os.urandom(6 * MiB))  # two parts: a multipart upload
    committed = st.commit(Manifest.new(step=7, files=st.entries, name=name))
    d = InProcessDaemon(local, store=store, wait_running=True, interval=0.5)
    daemons.append(d)
    wait_for(lambda: d.events("pushed") or d.events("push_failed") or not d.alive(),
             "the push to end", timeout=60)
    assert type(fs).lost == 1  # the fault did happen
    assert d.events("push_failed") == [] and d.alive()
    got = RemoteStore(s3_remote.url, s3_remote.storage_options).verify(committed.name, full=True)
    assert got.files == committed.manifest.files
    assert [e["name"] for e in d.events("pushed")] == [committed.name]  # exactly once
    assert d.stop() == EXIT_OK


# ---------------------------------------------------------------- failures of deleted checkpoints
def test_failures_of_checkpoints_deleted_locally_are_pruned(
        tmp_path: Path, daemons: list[InProcessDaemon]) -> None:
    local = tmp_path / "ckpts"
    fs = FaultFS(fsspec.filesystem("file"))
    store = _file_store(tmp_path / "remote", fs)
    d = InProcessDaemon(local, store=store, wait_running=True, interval=0.3)
    daemons.append(d)
    fs.set_outage(ConnectionError("injected: the network is down"))
    gone = make_checkpoints(local, [1])[0]
    wait_for(lambda: d.status()["failed"], "the push to fail")
    shutil.rmtree(local / gone)  # the trainer's retention
    fs.set_outage(None)
    kept = make_checkpoints(local, [2])[0]
    st = wait_for(lambda: d.status()["synced"] == [kept] and d.status(), "the next push",
                  timeout=30)
    assert st["failed"] == [] and st["pending"] == [] and st["in_sync"]
    assert "in sync: every local checkpoint is committed" in format_status(st)
    assert d.stop() == EXIT_OK
    from ckptsync.cli import main

    assert main(["status", str(local)]) == 0


def test_status_counts_committed_versions_and_shows_a_settling_one_as_not_synced(
        tmp_path: Path, daemons: list[InProcessDaemon]) -> None:
    local = tmp_path / "zc"
    local.mkdir()
    remote = tmp_path / "remote"
    store = _file_store(remote, FaultFS(fsspec.filesystem("file")))
    d = InProcessDaemon(local, store=store, wait_running=True, interval=0.5, settle=0.2,
                        rules=["file:ckpt.pt"])
    daemons.append(d)
    for i in range(3):  # three versions, each renamed into place and committed
        (local / "tmp.pt").write_bytes(os.urandom(1000 + i))
        os.replace(local / "tmp.pt", local / "ckpt.pt")
        wait_for(lambda i=i: len(d.events("pushed")) == i + 1, f"version {i} committed")
    st = wait_for(lambda: d.status()["in_sync"] and d.status(), "in sync")
    committed = [m.name for m in RemoteStore(f"file://{remote}").list()]
    assert len(committed) == 3 and st["synced"] == committed  # commits, not spool copies

    d.stop()
    d2 = InProcessDaemon(local, store=store, wait_running=True, interval=0.5, settle=30.0,
                         rules=["file:ckpt.pt"])
    daemons.append(d2)
    with open(local / "ckpt.pt", "r+b") as f:  # rewritten in place: settles for 30 s
        f.write(b"new bytes")
    st = wait_for(lambda: d2.status()["settling"] and d2.status(), "a settling version")
    assert st["in_sync"] is False and st["settling"] == ["file:ckpt.pt"]
    text = format_status(st)
    assert "pending: 1" in text and "NOT in sync" in text
    d2.stop()


# -------------------------------------------------------------- a checkpoint deleted while listed
class _DeletedWhileListed(LocalStore):
    """A local store whose checkpoint ``victim`` is deleted between the listing and the read
    (what a trainer's retention does to a running daemon's scan)."""

    victim = ""

    def read_manifest(self, name: str) -> Manifest:
        if name == self.victim and (self.directory / name).exists():
            shutil.rmtree(self.directory / name)
        return super().read_manifest(name)


def test_a_checkpoint_deleted_while_it_is_listed_is_skipped(tmp_path: Path) -> None:
    names = make_checkpoints(tmp_path, [1, 2, 3])
    store = _DeletedWhileListed(tmp_path)
    store.victim = names[1]
    listed: list[LocalCheckpoint] = store.list()
    assert [c.name for c in listed] == [names[0], names[2]]
