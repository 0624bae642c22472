"""What an operator watches. ``watch --metrics-port`` serves Prometheus metrics
(checkpoints committed, bytes, failures, retries, lag in checkpoints, steps and seconds, the
last success) and ``/healthz`` for a Kubernetes probe, on 127.0.0.1 by default;
``--on-failure CMD`` and ``--on-lag N CMD`` run a command with the event as JSON on stdin.
A real daemon subprocess, a real HTTP client, real hook commands."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from ckptsync.local import LocalStore
from ckptsync.remote import RemoteStore
from tests.support.paths import REPO
from tests.support.watchkit import Daemon, make_checkpoints, wait_for

pytestmark = [pytest.mark.core, pytest.mark.usefixtures("no_process_leak")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return 0, str(e)


def metric(text: str, name: str) -> float:
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(f"ckptsync_{name}{{")]
    assert values, f"no ckptsync_{name} in:\n{text}"
    return values[0]


def test_metrics_and_health_endpoint(tmp_path: Path) -> None:
    local = tmp_path / "ckpts"
    names = make_checkpoints(local, [10, 20], size=50_000)
    url = f"file://{tmp_path}/remote/run"
    port = free_port()
    d = Daemon(local, url, "--metrics-port", str(port), "--interval", "0.5",
               log=tmp_path / "d.log")
    try:
        wait_for(lambda: get(port, "/healthz")[0] == 200, "a healthy daemon", proc=d.proc)
        wait_for(lambda: len(RemoteStore(url).list()) == 2, "both committed", proc=d.proc)
        code, text = get(port, "/metrics")
        assert code == 200
        wait_for(lambda: metric(get(port, "/metrics")[1], "checkpoints_committed_total") == 2,
                 "the counter", proc=d.proc)
        text = get(port, "/metrics")[1]
        assert metric(text, "uploaded_bytes_total") == 2 * (50_000 + 25_001)
        assert metric(text, "upload_failures_total") == 0
        assert metric(text, "lag_checkpoints") == 0 and metric(text, "lag_steps") == 0
        assert metric(text, "last_success_timestamp_seconds") > 1.7e9
        assert metric(text, "in_sync") == 1 and metric(text, "up") == 1
        assert "ckptsync_lag_seconds" in text and "ckptsync_upload_retries_total" in text
        code, body = get(port, "/healthz")
        assert code == 200 and body.startswith("ok: daemon running"), body
        assert get(port, "/nope")[0] == 404
        assert [m.name for m in RemoteStore(url).list()] == names
        # The unit's start check (deploy/systemd) answers 0 for it ...
        check = subprocess.run([sys.executable, "-m", "ckptsync.daemon.exporter", "--check",
                                f"127.0.0.1:{port}"], capture_output=True, text=True,
                               timeout=30, cwd=REPO)
        assert check.returncode == 0 and "ok" in check.stdout, check.stderr
        assert d.term(timeout=60) == 0
    finally:
        d.kill()
    # ... and 1 once the daemon is gone.
    check = subprocess.run([sys.executable, "-m", "ckptsync.daemon.exporter", "--check",
                            f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=30,
                           cwd=REPO)
    assert check.returncode == 1 and f"127.0.0.1:{port}/healthz" in check.stderr


def test_on_failure_and_on_lag_run_a_command_with_the_event_on_stdin(tmp_path: Path) -> None:
    local = tmp_path / "ckpts"
    make_checkpoints(local, [100], size=20_000)
    bad = make_checkpoints(local, [150, 160], size=20_000)
    for name in bad:  # changed after their commit: every upload of them fails
        f = local / name / "model.pt"
        f.write_bytes(b"x" * f.stat().st_size)
    url = f"file://{tmp_path}/remote/run"
    failures, lags = tmp_path / "failures.jsonl", tmp_path / "lag.jsonl"
    port = free_port()
    d = Daemon(local, url, "--interval", "0.5", "--metrics-port", str(port),
               "--on-failure", f"cat >> {failures}; echo >> {failures}",
               "--on-lag", "2", f"cat > {lags}", log=tmp_path / "d.log")
    try:
        wait_for(lambda: failures.exists() and len(failures.read_text().split()) >= 2,
                 "an on-failure alert per failing checkpoint", proc=d.proc, timeout=90)
        wait_for(lambda: lags.exists() and lags.read_text(), "the on-lag alert", proc=d.proc)
        events = [json.loads(line) for line in failures.read_text().splitlines() if line]
        assert {e["name"] for e in events} == set(bad)
        assert all(e["event"] == "upload_failed" and "no longer matches" in e["error"]
                   and e["local_dir"] == str(local.absolute()) for e in events)
        lag = json.loads(lags.read_text())
        assert lag["event"] == "lag" and lag["threshold"] == 2
        assert lag["lag"]["checkpoints"] >= 2 and lag["lag"]["steps"] == 60
        text = get(port, "/metrics")[1]
        assert metric(text, "upload_failures_total") >= 2
        assert metric(text, "lag_checkpoints") >= 2 and metric(text, "in_sync") == 0
        assert get(port, "/healthz")[0] == 200  # failing uploads: reported, still healthy
        assert len(LocalStore(local).list()) == 3
        assert d.term(timeout=60) == 0
    finally:
        d.kill()
