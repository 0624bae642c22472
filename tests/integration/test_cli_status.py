"""``status`` gates a script and is a live view. Exit 0 only when every local
checkpoint is committed remotely, 1 while one is pending, 3 when the last attempt failed, 2
for a directory no daemon ran in; a checkpoint remote retention removed is never pending.
``--follow`` redraws one screen (rich's ``Live``), checked through rich's own recording
console: lag in steps and seconds, the upload in flight with its MB/s, the last error and the
next retry. Real daemons (``watch --once`` through the CLI), real file:// remotes."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import pytest
from rich.console import Console

from ckptsync.daemon.runtime import daemon_status
from ckptsync.local import LocalCheckpoint, LocalStore
from ckptsync.manifest import Manifest, make_name
from tests.support.cli import run_cli

pytestmark = pytest.mark.core


def make_local(store: LocalStore, step: int, size: int = 20_000) -> LocalCheckpoint:
    st = store.staging(make_name(step))
    st.write_file("model.pt", os.urandom(size))
    return st.commit(Manifest.new(step=step, files=st.entries, name=st.name))


def corrupt(ckpt: LocalCheckpoint) -> None:
    """The file changes after its checkpoint was committed: every upload of it fails."""
    f = ckpt.file("model.pt")
    f.write_bytes(b"x" * f.stat().st_size)


def status(local: Path) -> tuple[int, dict[str, object]]:
    p = run_cli("status", str(local), "--json")
    return p.returncode, json.loads(p.stdout)


def test_status_exit_codes_gate_a_script(tmp_path: Path) -> None:
    local = LocalStore(tmp_path / "ckpts")
    make_local(local, 10)
    make_local(local, 20)
    url = f"file://{tmp_path}/remote/run"
    assert run_cli("watch", str(local.directory), url, "--once").returncode == 0
    code, st = status(local.directory)
    assert code == 0 and st["in_sync"] and st["exit_code"] == 0
    p = run_cli("status", str(local.directory))
    assert p.returncode == 0 and "in sync: every local checkpoint" in p.stdout
    assert run_cli("status", str(local.directory), "-q").stdout == ""

    newer = make_local(local, 30)  # saved after the daemon stopped: pending
    code, st = status(local.directory)
    assert code == 1 and st["pending"] == [newer.name]
    assert st["lag"]["checkpoints"] == 1 and st["lag"]["steps"] == 10  # type: ignore[index]
    p = run_cli("status", str(local.directory))
    assert p.returncode == 1 and "NOT in sync" in p.stdout and "lag:     1 checkpoints, 10 " \
        "steps" in p.stdout


@pytest.mark.full  # each failing `watch --once` backs off through its attempts (~15 s)
def test_status_exit_3_when_the_last_attempt_failed(tmp_path: Path) -> None:
    local = LocalStore(tmp_path / "ckpts")
    make_local(local, 10)
    url = f"file://{tmp_path}/remote/run"
    assert run_cli("watch", str(local.directory), url, "--once").returncode == 0
    newer = make_local(local, 30)
    corrupt(newer)  # its upload now fails, and it is the newest: the last attempt failed
    assert run_cli("watch", str(local.directory), url, "--once").returncode == 1
    code, st = status(local.directory)
    assert code == 3, st
    assert [f["name"] for f in st["failed"]] == [newer.name]  # type: ignore[union-attr,index]
    from ckptsync.daemon.metrics import read_monitor

    mon = read_monitor(local.directory)
    assert mon["failures"] >= 1 and newer.name in json.dumps(mon["last_failure"])

    fixed = make_local(local, 40)  # a newer one succeeds: pending no more "failed" (1)
    assert run_cli("watch", str(local.directory), url, "--once").returncode == 1
    code, st = status(local.directory)
    assert code == 1 and fixed.name in st["synced"]  # type: ignore[operator]


def test_a_checkpoint_remote_retention_removed_is_never_pending(tmp_path: Path) -> None:
    local = LocalStore(tmp_path / "ckpts")
    ckpts = [make_local(local, s) for s in (1, 2, 3, 4)]
    url = f"file://{tmp_path}/remote/run"
    p = run_cli("watch", str(local.directory), url, "--once", "--keep-last", "1")
    assert p.returncode == 0, p.stderr
    code, st = status(local.directory)
    assert code == 0 and st["pending"] == [], st
    assert set(st["skipped_by_retention"]) | set(st["synced"]) >= {  # type: ignore[arg-type]
        c.name for c in ckpts}


@pytest.mark.full  # a failing `watch --once` backs off through its attempts (~15 s)
def test_status_follow_shows_lag_upload_rate_last_error_and_next_retry(tmp_path: Path) -> None:
    local = LocalStore(tmp_path / "ckpts")
    make_local(local, 100)
    bad = make_local(local, 160)
    corrupt(bad)
    url = f"file://{tmp_path}/remote/run"
    assert run_cli("watch", str(local.directory), url, "--once").returncode == 1
    from ckptsync.daemon.statusview import follow

    console = Console(file=io.StringIO(), force_terminal=True, width=120, record=True)
    code = follow(local.directory, console=console, interval=0.01, iterations=2)
    screen = console.export_text()
    assert code == 3
    assert "lag" in screen and "1 checkpoints, 60 steps" in screen, screen
    assert "last error" in screen and "content no longer matches its manifest" in screen
    assert "next retry" in screen and "last upload" in screen and "MB/s" in screen


def test_status_follow_shows_an_upload_in_flight_with_its_rate(tmp_path: Path) -> None:
    """What the daemon's monitor follows from its event log, drawn by the live view."""
    from ckptsync.daemon.metrics import Monitor
    from ckptsync.daemon.statusview import follow, render

    local = LocalStore(tmp_path / "ckpts")
    make_local(local, 100)
    url = f"file://{tmp_path}/remote/run"
    assert run_cli("watch", str(local.directory), url, "--once").returncode == 0
    console = Console(file=io.StringIO(), force_terminal=True, width=120, record=True)
    assert follow(local.directory, console=console, interval=0.01, iterations=2) == 0
    screen = console.export_text()
    assert "in sync" in screen and "0 checkpoints, 0 steps, 0 s" in screen, screen
    assert "last success" in screen and "s ago" in screen

    bad = make_local(local, 160)  # now uploading, as far as the monitor knows
    monitor = Monitor(local.directory)
    monitor.on_event("info", "push_start", {"name": bad.name, "step": 160,
                                            "bytes": 8_000_000})
    time.sleep(0.2)
    monitor.on_event("info", "upload_progress", {"name": bad.name, "bytes": 2_000_000})
    console = Console(file=io.StringIO(), force_terminal=True, width=120, record=True)
    console.print(render(daemon_status(local.directory), monitor.snapshot()))
    screen = console.export_text()
    assert "step 160: 1.9 MiB of 7.6 MiB" in screen and "MB/s" in screen, screen
    rate = monitor.snapshot()["uploading"][0]["mb_s"]
    assert 0 < rate <= 2_000_000 / 0.2 / 1e6 + 0.5
