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
from pathlib import Path

import fsspec
import pytest

from ckptsync.config import TransferConfig
from ckptsync.daemon import daemon_status, format_status
from ckptsync.remote import RemoteStore
from tests.support.daemon import InProcessDaemon
from tests.support.faults import FaultFS
from tests.support.watchkit import make_checkpoints, wait_for

pytestmark = pytest.mark.core


def test_a_checkpoint_committed_after_the_last_status_is_pending(tmp_path: Path) -> None:
    local = tmp_path / "ckpts"
    fs = FaultFS(fsspec.filesystem("file"))
    store = RemoteStore(f"file://{tmp_path / 'remote'}", fs=fs,
                        config=TransferConfig(retries=1, backoff_initial=0.01))
    first = make_checkpoints(local, [1])[0]
    d = InProcessDaemon(local, store=store, interval=0.3, wait_running=True)
    try:
        wait_for(lambda: daemon_status(local)["in_sync"], "the first checkpoint synced")
    finally:
        d.stop()
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
    d = InProcessDaemon(local, store=store, interval=0.3, wait_running=True)
    try:
        fs.set_outage(ConnectionError("injected: the network is down"))
        gone = make_checkpoints(local, [1])[0]
        wait_for(lambda: daemon_status(local)["failed"], "the push to fail")
    finally:
        d.stop()
    assert daemon_status(local)["pending"] == [gone]

    shutil.rmtree(local / gone)  # the trainer's own retention, after the daemon stopped
    st = daemon_status(local)
    assert st["pending"] == [] and st["failed"] == [] and st["not_seen"] == []
    assert st["in_sync"] is True
    assert "in sync: every local checkpoint is committed" in format_status(st)
