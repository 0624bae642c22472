"""``ckptsync wait DIR --timeout S``: blocks until every
local checkpoint in DIR is committed remotely, as ``ckptsync status`` counts it (exact against
the directory now); exit 0 committed, 1 still pending at the timeout, 2 usage, 3 the last
upload attempt failed and nothing newer succeeded.

A real daemon (``start_watcher``) for the success; an in-process daemon over a ``file://``
remote behind ``FaultFS`` (tests/integration/test_status_exact.py's pattern, the directory
lock held by the test as ``ckptsync watch`` holds it) to make the remote slow or down.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest

from ckptsync.config import TransferConfig
from ckptsync.daemon import EventLog, WatchConfig, Watcher, daemon_status, start_watcher
from ckptsync.daemon.runtime import DirLock
from ckptsync.daemon.statusview import outcome
from ckptsync.daemon.wait import WAIT_FAILED, WAIT_OK, WAIT_PENDING
from ckptsync.manifest import make_name
from ckptsync.remote import RemoteStore
from tests.support.cli import run_cli
from tests.support.faults import FaultFS
from tests.support.remotes import Remote
from tests.support.watchkit import make_checkpoints, wait_for

pytestmark = pytest.mark.core


class _Quiet:
    def write(self, line: str) -> int:
        return len(line)

    def flush(self) -> None:
        pass


@pytest.fixture
def faulty(tmp_path: Path) -> Iterator[tuple[Path, FaultFS, RemoteStore]]:
    """An in-process daemon watching ``tmp_path/ckpts``, holding its lock, pushing through a
    ``FaultFS`` the test controls."""
    local = tmp_path / "ckpts"
    local.mkdir()
    fs = FaultFS(fsspec.filesystem("file"))
    store = RemoteStore(f"file://{tmp_path / 'remote'}", fs=fs,
                        config=TransferConfig(retries=1, backoff_initial=0.01,
                                              backoff_max=0.05))
    w = Watcher(WatchConfig(local_dir=local, remote=store.url, interval=0.2), store=store,
                events=EventLog(_Quiet(), fmt="json"))  # type: ignore[arg-type]
    t = threading.Thread(target=w.run, name="test-watcher")
    t.start()
    lock = None
    try:
        wait_for(lambda: daemon_status(local).get("state") == "running", "the daemon to start")
        lock = DirLock(local)  # as `ckptsync watch` holds it: a daemon runs here
        yield local, fs, store
    finally:
        fs.set_outage(None)
        fs.set_delay(0)
        if lock is not None:
            lock.release()
        w.request_stop()
        t.join(60)
        assert not t.is_alive()


def test_wait_returns_once_everything_local_is_on_the_remote(tmp_path: Path,
                                                             file_remote: Remote) -> None:
    local = tmp_path / "ckpts"
    w = start_watcher(local, file_remote.url)
    try:
        make_checkpoints(local, [1, 2])
        newest = make_checkpoints(local, [3])[0]  # a moment ago: the daemon may not know it
        r = run_cli("wait", str(local), "--timeout", "60")
        assert r.returncode == 0, r.stderr
        assert f"every local checkpoint in {local} is committed" in r.stdout
        assert newest in r.stdout
        assert RemoteStore(file_remote.url).list()[-1].name == newest
        r = run_cli("wait", str(local), "--timeout", "60", "--json")
        assert r.returncode == 0 and '"in_sync": true' in r.stdout
    finally:
        w.stop()


def test_wait_of_a_missing_directory_or_one_no_daemon_ran_in_is_usage(tmp_path: Path) -> None:
    r = run_cli("wait", str(tmp_path / "nope"), "--timeout", "5")
    assert r.returncode == 2 and "does not exist" in r.stderr
    make_checkpoints(tmp_path / "plain", [1])
    r = run_cli("wait", str(tmp_path / "plain"), "--timeout", "5")
    assert r.returncode == 2 and "no ckptsync watch daemon has run" in r.stderr


@pytest.mark.serial  # the uploads' pace against the wait's timeout
def test_wait_gives_up_at_the_timeout_while_uploads_are_slow(
        faulty: tuple[Path, FaultFS, RemoteStore]) -> None:
    local, fs, _ = faulty
    fs.set_delay(2.0)  # every remote call: the push stays in flight
    name = make_checkpoints(local, [1])[0]
    t0 = time.monotonic()
    r = run_cli("wait", str(local), "--timeout", "0.5")
    assert r.returncode == 1, r.stderr
    assert time.monotonic() - t0 < 10
    assert "still not committed" in r.stderr and name in r.stderr


def test_wait_exits_3_when_the_last_attempt_failed_and_0_once_it_succeeds(
        faulty: tuple[Path, FaultFS, RemoteStore]) -> None:
    local, fs, store = faulty
    fs.set_outage(ConnectionError("injected: the network is down"))
    name = make_checkpoints(local, [1])[0]
    wait_for(lambda: daemon_status(local)["failed"], "the push to fail")
    r = run_cli("wait", str(local), "--timeout", "0.5")
    assert r.returncode == 3, r.stderr
    assert "failed and nothing newer succeeded" in r.stderr and "network is down" in r.stderr

    fs.set_outage(None)  # back: the daemon's next retry commits it
    r = run_cli("wait", str(local), "--timeout", "60")
    assert r.returncode == 0, r.stderr
    assert [m.name for m in RemoteStore(store.url).list()] == [name]


def test_wait_answers_at_once_when_no_daemon_is_running(tmp_path: Path,
                                                        file_remote: Remote) -> None:
    local = tmp_path / "ckpts"
    w = start_watcher(local, file_remote.url)
    try:
        make_checkpoints(local, [1])
        w.flush(timeout=60)
    finally:
        w.stop()
    assert run_cli("wait", str(local), "--timeout", "60").returncode == 0  # stopped, in sync
    name = make_checkpoints(local, [2])[0]  # nothing runs to upload it
    t0 = time.monotonic()
    r = run_cli("wait", str(local), "--timeout", "60")
    assert r.returncode == 1 and time.monotonic() - t0 < 10
    assert "no ckptsync watch is running" in r.stderr and name in r.stderr


def test_waits_outcome_is_the_newest_attempt() -> None:
    old, new = make_name(10), make_name(20)
    assert outcome({"state": "running", "in_sync": True}) == WAIT_OK
    assert outcome({"state": "running", "pending": [new], "synced": [old]}) == WAIT_PENDING
    failed = [{"name": new, "error": "boom", "attempts": 2}]
    assert outcome({"state": "running", "pending": [new], "failed": failed,
                    "synced": [old]}) == WAIT_FAILED
    # An older checkpoint failed, a newer one went up since: pending, not "failed".
    failed = [{"name": old, "error": "boom", "attempts": 2}]
    assert outcome({"state": "running", "pending": [old], "failed": failed,
                    "synced": [new]}) == WAIT_PENDING
    assert outcome({"state": "failed", "pending": [], "error": "access denied"}) == WAIT_FAILED
