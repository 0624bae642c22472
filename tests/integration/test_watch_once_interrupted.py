"""``watch --once`` stopped by SIGTERM while work is left exits 130, not 0:
``--once`` exits 0 only when everything is committed, so a script (cron, a notebook's last
cell) never takes an interrupted sync for a finished one."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptsync.cli import EXIT_INTERRUPTED
from ckptsync.remote import RemoteStore
from tests.support.watchkit import Daemon, make_checkpoints, run_cli, wait_for

pytestmark = [pytest.mark.core, pytest.mark.serial]


def test_sigterm_during_once_with_uploads_left_exits_130_and_a_rerun_finishes(
        tmp_path: Path) -> None:
    local, remote_dir = tmp_path / "ckpts", tmp_path / "remote"
    names = make_checkpoints(local, [1, 2, 3], size=1024 * 1024)
    slow = {"CKPTSYNC_TEST_SLOW_WRITE_S": "0.2", "CKPTSYNC_CHUNK_SIZE": "65536"}
    d = Daemon(local, f"slowfile://{remote_dir}", "--once", "--stop-timeout", "1",
               log=tmp_path / "d.log", **slow)
    try:
        wait_for(lambda: "event=push_start" in d.output(), "an upload in flight", proc=d.proc)
        code = d.term(timeout=60)
    finally:
        d.kill()
    out = d.output()
    assert code == EXIT_INTERRUPTED, out[-3000:]
    assert "event=interrupted" in out and "run it again" in out
    store = RemoteStore(f"file://{remote_dir}")
    assert len(store.list()) < len(names)
    again = run_cli("watch", str(local), f"file://{remote_dir}", "--once")
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(m.name for m in store.list()) == sorted(names)
