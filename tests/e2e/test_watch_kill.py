"""Kill -9 the daemon at random moments during uploads, many times, restarting it each time.

Uploads go through ``slowfile://`` (tests/support/slowfs.py: a local filesystem whose writes
sleep), so each kill lands in the middle of some upload. After every kill the remote never
shows a committed checkpoint whose files do not verify; at the end every local checkpoint is
committed exactly once.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from ckptsync.daemon import daemon_status
from ckptsync.remote import RemoteStore
from tests.support.watchkit import (
    Daemon,
    assert_remote_sound,
    make_checkpoints,
    run_cli,
    wait_for,
)

SLOW = {"CKPTSYNC_TEST_SLOW_WRITE_S": "0.01", "CKPTSYNC_CHUNK_SIZE": "65536"}


# conftest: no child outlives a test
pytestmark = [pytest.mark.usefixtures("no_process_leak"), pytest.mark.core]


def test_sigkill_during_uploads_never_commits_a_partial_and_commits_each_once(
        tmp_path: Path) -> None:
    rng = random.Random(1234)
    local, remote_dir = tmp_path / "ckpts", tmp_path / "remote"
    url = f"slowfile://{remote_dir}"
    store = RemoteStore(f"file://{remote_dir}")
    names = make_checkpoints(local, list(range(1, 9)), size=1024 * 1024)
    kills_mid_upload = 0
    for i in range(10):
        # The trainer keeps saving while the daemon is being killed: always work in flight.
        names += make_checkpoints(local, [100 + 2 * i, 101 + 2 * i], size=1024 * 1024)
        d = Daemon(local, url, "--workers", "2", log=tmp_path / f"d{i}.log", **SLOW)
        pid = d.pid
        try:
            wait_for(lambda: daemon_status(local).get("pid") == pid  # noqa: B023
                     and daemon_status(local).get("uploading"), "an upload", proc=d.proc)
            time.sleep(rng.uniform(0.0, 0.4))
            kills_mid_upload += bool(daemon_status(local).get("uploading"))
        finally:
            d.kill()
        committed = assert_remote_sound(store)  # nothing committed that does not verify
        assert len({m.name for m in committed}) == len(committed)
        assert {m.name for m in committed} <= set(names)
    assert kills_mid_upload >= 5
    r = run_cli("watch", str(local), url, "--once", **SLOW)
    assert r.returncode == 0, r.stderr
    final = assert_remote_sound(store)
    assert [m.name for m in final] == names  # every local checkpoint, exactly once
    status = daemon_status(local)
    assert status["synced"] == names and not status["pending"] and not status["running"]
