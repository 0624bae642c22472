"""The watch daemon: native checkpoints synced by a separate process, restart safety, signals,
--once, status, retention that protects a live run's checkpoint, fast failure, idle CPU.

Every daemon here is a real ``ckptsync watch`` subprocess using real inotify on ``tmp_path``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ckptsync import start_watcher
from ckptsync.daemon import WatchConfig, daemon_status
from ckptsync.errors import CkptSyncError, ConfigError
from ckptsync.local import LocalStore
from ckptsync.remote import RemoteStore
from tests.support.helpers import read_losses
from tests.support.paths import EXAMPLE, PY, child_env
from tests.support.remotes import Remote
from tests.support.watchkit import (
    assert_remote_sound,
    cpu_seconds,
    daemon,
    make_checkpoints,
    pid_alive,
    run_cli,
    wait_for,
)

# conftest: no child outlives a test
pytestmark = [pytest.mark.usefixtures("no_process_leak"), pytest.mark.core]


def _store(remote: Remote) -> RemoteStore:
    return RemoteStore(remote.url, remote.storage_options)


def _names(store: RemoteStore) -> list[str]:
    return [m.name for m in store.list()]


def _example(ckpt: Path, log: Path, steps: int, *extra: str) -> None:
    subprocess.run([PY, str(EXAMPLE), "--ckpt-dir", str(ckpt), "--steps", str(steps),
                    "--save-every", "10", "--log-file", str(log), "--seed", "5", *extra],
                   env=child_env(), check=True, capture_output=True, timeout=300)


def test_native_sync_from_trainer_process_then_fresh_vm_resume_is_exact(
        tmp_path: Path, s3_remote: Remote) -> None:
    ckpt = tmp_path / "ckpts"
    w = start_watcher(ckpt, s3_remote.url, storage_options=s3_remote.storage_options,
                      interval=2, log_path=tmp_path / "daemon.log")
    try:
        _example(ckpt, tmp_path / "run1.log", 40)  # the trainer knows nothing of the remote
        w.flush(timeout=120)
        status = w.status()
        assert status["running"] and status["pid"] == w.pid
    finally:
        assert w.stop() == 0
    store = _store(s3_remote)
    local = [c.name for c in LocalStore(ckpt).list()]
    assert _names(store) == local and len(local) == 4
    assert_remote_sound(store)

    # A fresh machine: only the remote survives. Pull step 30 from it, resume, and compare the
    # losses of steps 31..40 with those of the uninterrupted run.
    fresh = tmp_path / "fresh"
    step30 = next(m for m in store.list() if m.step == 30)
    store.pull(step30.name, LocalStore(fresh))
    _example(fresh, tmp_path / "resumed.log", 40, "--resume")
    resumed = read_losses(tmp_path / "resumed.log")
    straight = read_losses(tmp_path / "run1.log")
    assert sorted(resumed) == list(range(31, 41))
    assert {s: straight[s] for s in resumed} == resumed


def test_once_uploads_everything_and_status_reports_it(tmp_path: Path,
                                                       file_remote: Remote) -> None:
    local = tmp_path / "ckpts"
    names = make_checkpoints(local, [1, 2, 3])
    r = run_cli("watch", str(local), file_remote.url, "--once")
    assert r.returncode == 0, r.stderr
    assert "event=pushed" in r.stderr
    store = _store(file_remote)
    assert _names(store) == names
    assert_remote_sound(store)

    again = run_cli("watch", str(local), file_remote.url, "--once")  # nothing to do, no dupes
    assert again.returncode == 0 and "event=pushed" not in again.stderr
    assert _names(store) == names

    st = run_cli("status", str(local), "--json")
    assert st.returncode == 0
    status = json.loads(st.stdout)
    assert status["running"] is False and status["state"] == "stopped"
    assert status["synced"] == names and status["pending"] == [] and status["failed"] == []
    text = run_cli("status", str(local)).stdout
    assert "not running" in text and "synced:  3" in text


def test_running_daemon_status_lock_and_sigterm(tmp_path: Path, file_remote: Remote) -> None:
    local = tmp_path / "ckpts"
    with daemon(local, file_remote.url, "--interval", "1", log=tmp_path / "d.log") as d:
        wait_for(lambda: daemon_status(local).get("state") == "running", "daemon start",
                 proc=d.proc)
        names = make_checkpoints(local, [5, 6])
        wait_for(lambda: daemon_status(local)["synced"] == names, "sync", proc=d.proc)
        status = daemon_status(local)
        assert status["running"] and status["pid"] == d.pid and status["pending"] == []

        second = run_cli("watch", str(local), file_remote.url, "--once", timeout=30)
        assert second.returncode == 2
        assert f"pid {d.pid}" in second.stderr and "already watches" in second.stderr
        assert d.term() == 0
    assert not daemon_status(local)["running"]
    assert _names(_store(file_remote)) == names


def test_sigterm_mid_upload_exits_0_and_commits_nothing_partial(tmp_path: Path) -> None:
    local, remote_dir = tmp_path / "ckpts", tmp_path / "remote"
    url = f"slowfile://{remote_dir}"
    names = make_checkpoints(local, [1, 2], size=2 * 1024 * 1024)
    slow = {"CKPTSYNC_TEST_SLOW_WRITE_S": "0.05", "CKPTSYNC_CHUNK_SIZE": "65536"}
    with daemon(local, url, "--stop-timeout", "0", log=tmp_path / "d.log", **slow) as d:
        wait_for(lambda: daemon_status(local).get("uploading"), "an upload", proc=d.proc)
        assert d.term() == 0
        assert "event=push_abandoned" in d.output()
    store = RemoteStore(f"file://{remote_dir}")
    assert store.list() == []  # abandoned, never committed
    assert any(remote_dir.iterdir())  # ... though bytes had been written
    r = run_cli("watch", str(local), url, "--once", **slow)
    assert r.returncode == 0, r.stderr
    assert _names(store) == names
    assert_remote_sound(store)


def test_retention_never_deletes_the_checkpoint_a_live_run_resumed_from(
        tmp_path: Path, file_remote: Remote) -> None:
    local = tmp_path / "ckpts"
    names = make_checkpoints(local, [10, 20, 30, 40, 50],
                             metrics=lambda s: {"val_loss": 1.0 / s})
    sleeper = subprocess.Popen([PY, "-c", "import time; time.sleep(60)"])
    try:
        (local / ".ckptsync-resumed.json").write_text(
            json.dumps({"name": names[0], "pid": sleeper.pid}))
        r = run_cli("watch", str(local), file_remote.url, "--once", "--keep-last", "2")
        assert r.returncode == 0, r.stderr
        assert _names(_store(file_remote)) == [names[0], names[3], names[4]]
    finally:
        sleeper.kill()
        sleeper.wait()
    # The run is gone: its checkpoint is no longer protected.
    make_checkpoints(local, [60])
    r = run_cli("watch", str(local), file_remote.url, "--once", "--keep-last", "2")
    assert r.returncode == 0, r.stderr
    remaining = _names(_store(file_remote))
    assert names[0] not in remaining and len(remaining) == 2
    status = daemon_status(local)
    assert names[1] in status["skipped_by_retention"]  # pruned by policy, not pending


def test_permanent_remote_error_fails_fast_with_a_clear_message(
        tmp_path: Path, s3_remote: Remote) -> None:
    local = tmp_path / "ckpts"
    make_checkpoints(local, [1])
    assert s3_remote.wrong_credentials is not None
    env = {"CKPTSYNC_STORAGE_OPTIONS": json.dumps(s3_remote.wrong_credentials)}
    r = run_cli("watch", str(local), s3_remote.url, timeout=120, **env)
    assert r.returncode == 3
    assert "event=fatal" in r.stderr and "wrong-secret" not in r.stderr
    status = daemon_status(local)
    assert status["state"] == "failed" and status["error"]

    assert s3_remote.missing_url is not None
    env = {"CKPTSYNC_STORAGE_OPTIONS": json.dumps(s3_remote.storage_options)}
    r = run_cli("watch", str(local), s3_remote.missing_url, timeout=120, **env)
    assert r.returncode == 3 and "no such bucket" in r.stderr


@pytest.mark.serial
def test_idle_daemon_uses_little_cpu(tmp_path: Path, file_remote: Remote) -> None:
    local = tmp_path / "ckpts"
    make_checkpoints(local, [1])
    with daemon(local, file_remote.url, "--interval", "1", "--rule", "file:ckpt.pt",
                log=tmp_path / "d.log") as d:
        wait_for(lambda: len(daemon_status(local)["synced"]) == 1, "first sync", proc=d.proc)
        before = cpu_seconds(d.pid)
        time.sleep(3)
        used = cpu_seconds(d.pid) - before
        assert d.proc.poll() is None
        assert used < 0.3, f"idle daemon used {used:.2f}s of CPU in 3s (a busy loop?)"
        assert d.term() == 0


def test_start_watcher_uploads_pending_and_exits_with_its_parent(
        tmp_path: Path, file_remote: Remote) -> None:
    local = tmp_path / "ckpts"
    names = make_checkpoints(local, [1, 2])
    code = (
        "import sys, json\n"
        "from ckptsync import start_watcher\n"
        f"w = start_watcher({str(local)!r}, {file_remote.url!r}, interval=30)\n"
        "print(w.pid, flush=True)\n"
    )
    out = subprocess.run([PY, "-c", code], env=child_env(), capture_output=True, text=True,
                         check=True, timeout=60)
    pid = int(out.stdout.strip())
    wait_for(lambda: not pid_alive(pid), "the daemon to exit after its parent", timeout=60)
    assert _names(_store(file_remote)) == names
    assert daemon_status(local)["state"] == "stopped"


def test_detached_watcher_outlives_its_parent(tmp_path: Path, file_remote: Remote) -> None:
    local = tmp_path / "ckpts"
    code = (
        "from ckptsync import start_watcher\n"
        f"w = start_watcher({str(local)!r}, {file_remote.url!r}, detach=True)\n"
        "print(w.pid, flush=True)\n"
    )
    out = subprocess.run([PY, "-c", code], env=child_env(), capture_output=True, text=True,
                         check=True, timeout=60)
    pid = int(out.stdout.strip())
    try:
        names = make_checkpoints(local, [7])
        wait_for(lambda: daemon_status(local)["synced"] == names, "sync by the orphan daemon")
        assert pid_alive(pid)
    finally:
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not pid_alive(pid), "daemon exit")


def test_config_precedence_flags_over_env_over_file(tmp_path: Path) -> None:
    cfg = tmp_path / "watch.toml"
    cfg.write_text('[watch]\nremote = "file:///from-file"\nkeep_last = 4\ninterval = 9\n'
                   'settle = 7\nrules = ["file:a.pt"]\n'
                   '[watch.storage_options]\nanon = true\nregion = "file"\n')
    env = {"CKPTSYNC_KEEP_LAST": "3", "CKPTSYNC_INTERVAL": "8",
           "CKPTSYNC_STORAGE_OPTIONS": '{"region": "env"}'}
    c = WatchConfig.resolve({"local_dir": tmp_path, "config": str(cfg), "interval": 2.0,
                             "rules": []}, env)
    assert c.remote == "file:///from-file" and c.keep_last == 3 and c.interval == 2.0
    assert c.settle == 7.0 and [r.spec for r in c.rules] == ["file:a.pt"]
    assert dict(c.storage_options) == {"anon": True, "region": "env"}
    json_cfg = tmp_path / "watch.json"
    json_cfg.write_text(json.dumps({"remote": "s3://b/r", "keep_best": "loss:min:2"}))
    c2 = WatchConfig.resolve({"local_dir": tmp_path}, {"CKPTSYNC_CONFIG": str(json_cfg)})
    assert c2.remote == "s3://b/r" and c2.keep_best is not None and c2.keep_best.k == 2
    with pytest.raises(ConfigError, match="unknown watch settings"):
        WatchConfig.resolve({"local_dir": tmp_path, "remote": "x", "bogus": 1}, {})
    with pytest.raises(ConfigError, match=r"REMOTE_URL .* is empty"):
        WatchConfig.resolve({"local_dir": tmp_path}, {})
    bad = run_cli("watch", str(tmp_path), "file:///x", "--rule", "nope:x")
    assert bad.returncode == 2 and "invalid watch rule" in bad.stderr
    c3 = WatchConfig.resolve({"local_dir": tmp_path, "remote": "x"}, {"CKPTSYNC_NICE": "5"})
    assert c3.nice == 5
    with pytest.raises(ConfigError, match="nice must be between 0 and 19"):
        WatchConfig.resolve({"local_dir": tmp_path, "remote": "x", "nice": 40}, {})


def test_nice_lowers_the_daemons_cpu_priority_and_it_still_syncs(
        tmp_path: Path, file_remote: Remote) -> None:
    local = tmp_path / "ckpts"
    w = start_watcher(local, file_remote.url, nice=7)
    try:
        ours = os.getpriority(os.PRIO_PROCESS, 0)
        assert os.getpriority(os.PRIO_PROCESS, w.pid) == min(19, ours + 7)
        names = make_checkpoints(local, [3])
        w.flush(timeout=60)
        assert _names(_store(file_remote)) == names
    finally:
        w.stop()


def test_watch_handle_flush_raises_when_the_daemon_died(tmp_path: Path,
                                                        file_remote: Remote) -> None:
    local = tmp_path / "ckpts"
    w = start_watcher(local, file_remote.url)
    os.kill(w.pid, signal.SIGKILL)
    w.proc.wait()
    with pytest.raises(CkptSyncError, match="exited"):
        w.flush(timeout=10)
    assert not w.running()
