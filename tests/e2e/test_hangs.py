"""No hangs and fast stops, the daemon's own clean-up included.

A black hole (a TCP listener on 127.0.0.1 that accepts and never answers) stands for an
endpoint that a firewall drops: every command ends within a bounded time, and the daemon
keeps running without a busy loop and stops at once on SIGTERM. SIGTERM with queued pushes
takes about ``--stop-timeout``, never that plus the 30 s once spent waiting on cancelled work,
and what the abandoned push wrote is removed.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckptsync.daemon import daemon_status
from ckptsync.remote import RemoteStore
from tests.support.watchkit import (
    Daemon,
    assert_remote_sound,
    cpu_seconds,
    make_checkpoints,
    run_cli,
    wait_for,
)

# Short timeouts (the defaults are 10 s and 30 s) keep these tests quick; what they check is
# that every wait is bounded at all.
QUICK = {"CKPTSYNC_CONNECT_TIMEOUT": "1", "CKPTSYNC_READ_TIMEOUT": "1"}


# conftest: no child outlives a test
pytestmark = [pytest.mark.usefixtures("no_process_leak"), pytest.mark.full, pytest.mark.serial]


@pytest.fixture
def black_hole() -> Iterator[str]:
    """``http://127.0.0.1:<port>`` of a listener that accepts connections and never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    t = threading.Thread(target=accept, name="black-hole", daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        t.join()
        for s in held:
            s.close()
        server.close()


def _s3_options(endpoint: str) -> dict[str, str]:
    opts = {"key": "k", "secret": "not-a-real-secret-value",
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    return {"CKPTSYNC_STORAGE_OPTIONS": json.dumps(opts)}


def test_ls_against_a_black_hole_fails_within_a_bounded_time(black_hole: str) -> None:
    start = time.monotonic()
    r = run_cli("ls", "s3://bucket/run", timeout=90, CKPTSYNC_RETRIES="2",
                **QUICK, **_s3_options(black_hole))
    took = time.monotonic() - start
    assert r.returncode == 1, r.stderr
    assert took < 45, f"ls took {took:.0f}s against an endpoint that never answers"
    assert "s3://bucket/run" in r.stderr and "temporary failure" in r.stderr
    assert "not-a-real-secret-value" not in r.stderr


def test_ls_against_a_black_hole_ends_at_its_deadline_naming_the_endpoint(
        black_hole: str) -> None:
    """The production retries and timeouts (5 attempts, a 30 s read timeout, and
    s3fs's own retries inside each) would take many minutes; the command's deadline ends it,
    naming the endpoint that does not answer."""
    start = time.monotonic()
    r = run_cli("ls", "s3://bucket/run", "--timeout", "4", timeout=120,
                **_s3_options(black_hole))
    took = time.monotonic() - start
    assert r.returncode == 1, r.stderr
    assert took < 15, f"ls took {took:.0f}s with --timeout 4"
    assert f"endpoint {black_hole}" in r.stderr and "made no progress for 4 s" in r.stderr
    assert "--timeout" in r.stderr and "Traceback" not in r.stderr
    assert "not-a-real-secret-value" not in r.stderr
    start = time.monotonic()  # the same from the environment
    r = run_cli("verify", "s3://bucket/run", timeout=120, CKPTSYNC_TIMEOUT="3",
                **_s3_options(black_hole))
    assert r.returncode == 1 and time.monotonic() - start < 15, r.stderr
    assert "made no progress for 3 s" in r.stderr


def test_watch_once_gives_up_on_an_unreachable_remote(tmp_path: Path, black_hole: str) -> None:
    local = tmp_path / "ckpts"
    make_checkpoints(local, [1])
    start = time.monotonic()
    r = run_cli("watch", str(local), "s3://bucket/run", "--once", timeout=90,
                CKPTSYNC_RETRIES="2", **QUICK, **_s3_options(black_hole))
    assert r.returncode == 1, r.stderr
    assert time.monotonic() - start < 45
    assert "event=remote_unreachable" in r.stderr
    assert daemon_status(local)["state"] == "failed"


def test_daemon_against_a_black_hole_waits_quietly_and_stops_at_once(
        tmp_path: Path, black_hole: str) -> None:
    local = tmp_path / "ckpts"
    make_checkpoints(local, [1])
    d = Daemon(local, "s3://bucket/run", "--stop-timeout", "1", log=tmp_path / "d.log",
               CKPTSYNC_RETRIES="2", **QUICK, **_s3_options(black_hole))
    try:
        wait_for(lambda: "event=remote_unavailable" in d.output(), "a failed listing",
                 proc=d.proc, timeout=60)
        before = cpu_seconds(d.pid)
        time.sleep(2)
        assert d.proc.poll() is None  # unreachable is not fatal: it keeps trying
        assert cpu_seconds(d.pid) - before < 0.5  # ... without a busy loop
        start = time.monotonic()
        assert d.term(timeout=60) == 0
        took = time.monotonic() - start
    finally:
        d.kill()
    # A listing in flight ends within its timeouts; its retries' back-off is cut short.
    assert took < 12, f"SIGTERM took {took:.1f}s"


@pytest.mark.core
def test_sigterm_with_queued_pushes_takes_about_stop_timeout_and_cleans_up(
        tmp_path: Path) -> None:
    local, remote_dir = tmp_path / "ckpts", tmp_path / "remote"
    url = f"slowfile://{remote_dir}"
    names = make_checkpoints(local, [1, 2, 3, 4, 5, 6], size=2 * 1024 * 1024)
    slow = {"CKPTSYNC_TEST_SLOW_WRITE_S": "0.2", "CKPTSYNC_CHUNK_SIZE": "65536"}
    d = Daemon(local, url, "--workers", "2", "--stop-timeout", "2", log=tmp_path / "d.log",
               **slow)
    try:
        # One push in flight (one per source, newest first), the rest waiting behind it.
        wait_for(lambda: len(daemon_status(local).get("uploading") or []) >= 1
                 and len(daemon_status(local).get("pending") or []) >= 3,
                 "an upload in flight and more queued", proc=d.proc)
        start = time.monotonic()
        assert d.term(timeout=90) == 0
        took = time.monotonic() - start
    finally:
        d.kill()
    assert took < 2 + 8, f"SIGTERM took {took:.1f}s with --stop-timeout 2"
    out = d.output()
    assert "event=push_abandoned" in out and "event=cleaned_up" in out
    store = RemoteStore(f"file://{remote_dir}")
    assert store.list() == []  # abandoned, never committed
    # ... and what the abandoned pushes wrote is gone now, not after gc's grace period.
    assert [e.name for e in store.scan()] == []
    r = run_cli("watch", str(local), f"file://{remote_dir}", "--once")
    assert r.returncode == 0, r.stderr
    assert [m.name for m in assert_remote_sound(store)] == names
