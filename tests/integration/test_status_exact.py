"""``ckptsync status`` is exact: it compares the directory's committed checkpoints with what
the daemon acknowledged as committed remotely, not only the daemon's last status file.

A checkpoint committed locally a moment ago is pending (whether or not the daemon saw it);
one the trainer's retention deleted since is never pending. The daemon runs in-process
(tests/integration/test_watch_robust.py's pattern) over a ``file://`` remote behind
``FaultFS``, and is stopped before the directory changes, so that its status file is known
to be stale.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import fsspec
import pytest

from ckptsync.config import TransferConfig
from ckptsync.daemon import EventLog, WatchConfig, Watcher, daemon_status, format_status
from ckptsync.remote import RemoteStore
from tests.support.faults import FaultFS
from tests.support.watchkit import make_checkpoints, wait_for

pytestmark = pytest.mark.core


class _Quiet:
    def write(self, line: str) -> int:
        return len(line)

    def flush(self) -> None:
        pass


def _daemon(local: Path, store: RemoteStore) -> tuple[Watcher, threading.Thread]:
    w = Watcher(WatchConfig(local_dir=local, remote=store.url, interval=0.3), store=store,
                events=EventLog(_Quiet(), fmt="json"))  # type: ignore[arg-type]
    t = threading.Thread(target=w.run, name="test-watcher")
    t.start()
    try:
        wait_for(lambda: daemon_status(local).get("state") == "running", "the daemon to start")
    except BaseException:
        _stop(w, t)
        raise
    return w, t


def _stop(w: Watcher, t: threading.Thread) -> None:
    w.request_stop()
    t.join(60)
    assert not t.is_alive()


def test_a_checkpoint_committed_after_the_last_status_is_pending(tmp_path: Path) -> None:
    local = tmp_path / "ckpts"
    fs = FaultFS(fsspec.filesystem("file"))
    store = RemoteStore(f"file://{tmp_path / 'remote'}", fs=fs,
                        config=TransferConfig(retries=1, backoff_initial=0.01))
    first = make_checkpoints(local, [1])[0]
    w, t = _daemon(local, store)
    try:
        wait_for(lambda: daemon_status(local)["in_sync"], "the first checkpoint synced")
    finally:
        _stop(w, t)
    assert daemon_status(local)["synced"] == [first]

    new = make_checkpoints(local, [2])[0]  # saved a moment ago; no daemon has seen it
    st = daemon_status(local)
    assert st["in_sync"] is False and st["pending"] == [new] and st["not_seen"] == [new]
    text = format_status(st)
    assert "pending: 1" in text and new in text and "NOT in sync" in text


def test_a_checkpoint_deleted_by_retention_is_never_pending(tmp_path: Path) -> None:
    local = tmp_path / "ckpts"
    fs = FaultFS(fsspec.filesystem("file"))
    store = RemoteStore(f"file://{tmp_path / 'remote'}", fs=fs,
                        config=TransferConfig(retries=1, backoff_initial=0.01))
    w, t = _daemon(local, store)
    try:
        fs.set_outage(ConnectionError("injected: the network is down"))
        gone = make_checkpoints(local, [1])[0]
        wait_for(lambda: daemon_status(local)["failed"], "the push to fail")
    finally:
        _stop(w, t)
    assert daemon_status(local)["pending"] == [gone]

    shutil.rmtree(local / gone)  # the trainer's own retention, after the daemon stopped
    st = daemon_status(local)
    assert st["pending"] == [] and st["failed"] == [] and st["not_seen"] == []
    assert st["in_sync"] is True
    assert "in sync: every local checkpoint is committed" in format_status(st)
