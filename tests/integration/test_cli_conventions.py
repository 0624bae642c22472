"""Conventions a user brings from aws-cli, rclone and s5cmd: ``push --dry-run``
writes nothing, progress bars only on a terminal, exit codes that tell apart credentials,
nothing to do and an interrupt, and ``Checkpointer(...)`` reading ``CKPTSYNC_REMOTE`` and
``CKPTSYNC_STORAGE_OPTIONS`` like the CLI. Real remotes (file://, SeaweedFS), real
subprocesses."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
import torch

from ckptsync import Checkpointer
from ckptsync.cli import EXIT_DENIED, EXIT_INTERRUPTED, EXIT_NOTHING_TO_DO
from ckptsync.local import LocalCheckpoint, LocalStore
from ckptsync.manifest import Manifest, make_name
from ckptsync.remote import RemoteStore
from tests.support.cli import cli, run_cli
from tests.support.cli import cli_env as _env
from tests.support.jsonlines import events, summary
from tests.support.paths import REPO
from tests.support.remotes import Remote

pytestmark = pytest.mark.core


def make_local(store: LocalStore, step: int, size: int = 50_000) -> LocalCheckpoint:
    st = store.staging(make_name(step))
    st.write_file("model.pt", os.urandom(size))
    return st.commit(Manifest.new(step=step, files=st.entries, name=st.name))


def remote_files(remote: Remote) -> list[str]:
    fs = fsspec.core.url_to_fs(remote.url, **remote.storage_options)[0]
    fs.invalidate_cache()
    try:
        return sorted(fs.find(remote.path))
    except FileNotFoundError:
        return []


def options_env(remote: Remote, options: dict[str, object] | None = None) -> dict[str, str]:
    return {"CKPTSYNC_STORAGE_OPTIONS": json.dumps(options or remote.storage_options)}


# --------------------------------------------------------------------------- push --dry-run


@pytest.mark.parametrize("remote", ["file", "seaweedfs"], indirect=True)
def test_push_dry_run_lists_what_it_would_upload_and_writes_nothing(
        remote: Remote, tmp_path: Path) -> None:
    local = LocalStore(tmp_path / "ckpts")
    ckpts = [make_local(local, s) for s in (1, 2)]
    env = options_env(remote)
    before = remote_files(remote)
    p = run_cli("push", str(local.directory), remote.url, "--dry-run", **env)
    assert p.returncode == 0, p.stderr
    assert all(f"would push {c.name}" in p.stdout for c in ckpts), p.stdout
    assert "2 would push, 0 already" in p.stdout
    assert remote_files(remote) == before  # nothing written, not even the root marker

    p = run_cli("push", str(local.directory), remote.url, "--dry-run", "--json", **env)
    assert p.returncode == 0, p.stderr
    assert [(e["event"], e["name"]) for e in events(p.stdout)] == [
        ("would_push", c.name) for c in ckpts]
    assert summary(p.stdout) == {"event": "summary", "command": "push", "dry_run": True,
                                 "would_push": 2, "skipped": 0, "bytes": 0, "exit_code": 0}
    assert remote_files(remote) == before

    # Once one is pushed, a dry run names only the other.
    make_local(local, 3)
    assert run_cli("push", str(local.directory), remote.url, **env).returncode == 0
    after = remote_files(remote)
    new = make_local(local, 4)
    p = run_cli("push", str(local.directory), remote.url, "--dry-run", "--json", **env)
    assert [e["name"] for e in events(p.stdout, "would_push")] == [new.name]
    assert remote_files(remote) == after


# --------------------------------------------------------------------------- progress bars


def test_progress_bars_only_on_a_terminal(tmp_path: Path) -> None:
    """tqdm draws on stderr when it is a terminal; a pipe or a log file never gets a bar."""
    local = LocalStore(tmp_path / "ckpts")
    make_local(local, 1, size=3 * 1024 * 1024)
    url = f"file://{tmp_path}/remote/run"
    p = cli("push", str(local.directory), url + "-pipe")
    assert p.returncode == 0, p.stderr
    assert p.stderr == "", p.stderr  # no bar, no carriage returns

    master, slave = pty.openpty()
    # A terminal 100 columns wide (a fresh pty is 0 x 0, where tqdm draws nothing).
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "ckptsync.cli", "push",
                             str(local.directory), url], stdout=subprocess.PIPE,
                            stderr=slave, cwd=REPO, env=_env())
    os.close(slave)
    seen = b""
    while True:
        ready, _, _ = select.select([master], [], [], 120)
        if not ready:
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    out, _ = proc.communicate(timeout=120)
    os.close(master)
    assert proc.returncode == 0, seen
    assert b"\r" in seen and b"B" in seen and b"|" in seen, seen  # a tqdm bar was drawn
    assert b"pushed" in out


# --------------------------------------------------------------------------- exit codes


@pytest.mark.parametrize("command", ["ls", "pull", "push", "verify"])
def test_wrong_credentials_exit_3(seaweedfs_remote: Remote, tmp_path: Path,
                                  command: str) -> None:
    assert seaweedfs_remote.wrong_credentials is not None
    local = LocalStore(tmp_path / "ckpts")
    make_local(local, 1)
    argv = {"ls": ["ls", seaweedfs_remote.url],
            "pull": ["pull", seaweedfs_remote.url, str(tmp_path / "out")],
            "push": ["push", str(local.directory), seaweedfs_remote.url],
            "verify": ["verify", seaweedfs_remote.url]}[command]
    p = run_cli(*argv, **options_env(seaweedfs_remote, seaweedfs_remote.wrong_credentials))
    assert p.returncode == EXIT_DENIED, (p.returncode, p.stderr)
    assert "access denied" in p.stderr or "credentials" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and "wrong-secret" not in p.stderr
    # The right credentials: not a "denied" (exit 0 for ls of a new run's empty prefix).
    if command == "ls":
        assert run_cli(*argv, "--allow-empty", **options_env(seaweedfs_remote)).returncode == 0


@pytest.mark.parametrize("remote", ["file", "seaweedfs"], indirect=True)
def test_pull_of_an_empty_remote_is_nothing_to_do(remote: Remote, tmp_path: Path) -> None:
    """Where a new run is declared (without it, a prefix that holds nothing at
    all is a typo, exit 1)."""
    p = run_cli("pull", remote.url, str(tmp_path / "out"), **options_env(remote))
    assert p.returncode == 1 and "holds nothing at all" in p.stderr, p.stderr
    p = run_cli("pull", remote.url, str(tmp_path / "out"), "--allow-empty",
                **options_env(remote))
    assert p.returncode == EXIT_NOTHING_TO_DO, (p.returncode, p.stderr)
    assert "nothing to pull" in p.stderr and "holds no checkpoint" in p.stderr, p.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    # A remote with only corrupt checkpoints is a failure, not "nothing to do".
    local = LocalStore(tmp_path / "ckpts")
    ckpt = make_local(local, 1)
    assert run_cli("push", str(local.directory), remote.url, **options_env(remote)).returncode == 0
    fs = fsspec.core.url_to_fs(remote.url, **remote.storage_options)[0]
    fs.rm_file(f"{remote.path}/{ckpt.name}/model.pt")
    p = run_cli("pull", remote.url, str(tmp_path / "out"), **options_env(remote))
    assert p.returncode == 1, (p.returncode, p.stderr)


@pytest.fixture
def black_hole() -> Iterator[tuple[str, threading.Event]]:
    """A listener that accepts connections and never answers; the event is set on the
    first connection (the command is inside a network call)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    held: list[socket.socket] = []
    stop, connected = threading.Event(), threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
                connected.set()
            except TimeoutError:
                continue

    t = threading.Thread(target=accept, name="black-hole", daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}", connected
    finally:
        stop.set()
        t.join()
        for s in held:
            s.close()
        server.close()


@pytest.mark.usefixtures("no_process_leak")  # conftest: no child outlives the test
def test_sigint_exits_130(black_hole: tuple[str, threading.Event]) -> None:
    endpoint, connected = black_hole
    opts = {"key": "k", "secret": "not-a-real-secret-value", "anon": False,
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    proc = subprocess.Popen([sys.executable, "-m", "ckptsync.cli", "ls", "s3://bucket/run"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=_env(CKPTSYNC_RETRIES="1000",
                                     CKPTSYNC_STORAGE_OPTIONS=json.dumps(opts)))
    try:
        assert connected.wait(90), "the command never reached the endpoint"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == EXIT_INTERRUPTED, (proc.returncode, err)
    assert "interrupted" in err and "Traceback" not in err, err


# --------------------------------------------------------------------------- Checkpointer env


def _save_one(directory: Path, **kwargs: object) -> str:
    model = torch.nn.Linear(3, 2)
    with Checkpointer(directory, **kwargs) as ck:  # type: ignore[arg-type]
        ck.save(1, model=model)
        ck.wait()
        assert ck.latest() is not None
        return ck.latest().name  # type: ignore[union-attr]


def test_checkpointer_reads_ckptsync_remote(file_remote: Remote, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CKPTSYNC_REMOTE", file_remote.url)
    name = _save_one(tmp_path / "a")
    assert [m.name for m in RemoteStore(file_remote.url).list()] == [name]

    # An explicit remote= wins over the environment.
    other = f"file://{tmp_path}/other/run"
    name2 = _save_one(tmp_path / "b", remote=other)
    assert [m.name for m in RemoteStore(other).list()] == [name2]
    assert [m.name for m in RemoteStore(file_remote.url).list()] == [name]

    # A blank variable is no remote (as for the daemon).
    monkeypatch.setenv("CKPTSYNC_REMOTE", "  ")
    with Checkpointer(tmp_path / "c") as ck:
        assert ck.remote is None


def test_checkpointer_reads_ckptsync_storage_options(seaweedfs_remote: Remote, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """An S3-compatible endpoint and its credentials come from the environment alone; an
    explicit ``storage_options=`` wins over them."""
    monkeypatch.setenv("CKPTSYNC_REMOTE", seaweedfs_remote.url)
    monkeypatch.setenv("CKPTSYNC_STORAGE_OPTIONS", json.dumps(seaweedfs_remote.storage_options))
    name = _save_one(tmp_path / "a", on_remote_error="raise")
    store = RemoteStore(seaweedfs_remote.url, seaweedfs_remote.storage_options)
    assert [m.name for m in store.list()] == [name]

    # Wrong credentials in the environment, the right ones given: the argument wins.
    assert seaweedfs_remote.wrong_credentials is not None
    monkeypatch.setenv("CKPTSYNC_STORAGE_OPTIONS",
                       json.dumps(seaweedfs_remote.wrong_credentials))
    name2 = _save_one(tmp_path / "a", on_remote_error="raise",  # the same run: one per prefix
                      storage_options=seaweedfs_remote.storage_options)
    store.fs.invalidate_cache()
    assert name2 in [m.name for m in store.list()]


# --------------------------------------------------------------------------- watch's flags


@pytest.mark.usefixtures("no_process_leak")
def test_watch_json_logs_one_object_per_line(tmp_path: Path) -> None:
    local = LocalStore(tmp_path / "ckpts")
    ckpt = make_local(local, 1)
    url = f"file://{tmp_path}/remote/run"
    p = cli("watch", str(local.directory), url, "--once", "--json", "-v", "--no-progress",
            "-o", "auto_mkdir=true")
    assert p.returncode == 0, p.stderr
    lines = [json.loads(line) for line in p.stderr.splitlines()]  # each line one object
    assert lines and all(isinstance(x, dict) for x in lines)
    assert [m.name for m in RemoteStore(url).list()] == [ckpt.name]


@pytest.mark.full
def test_demo_draws_no_bars_off_a_terminal(tmp_path: Path) -> None:
    """``ckptsync demo 2>log`` (no ``--no-progress``): the log gets no progress bar."""
    p = subprocess.run([sys.executable, "-m", "ckptsync", "demo", "--out", str(tmp_path / "out"),
                        "--steps", "40", "--save-every", "10", "--kill-at", "25"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path, env=_env())
    assert p.returncode == 0, p.stdout + p.stderr
    assert "\r" not in p.stderr and "step/s" not in p.stderr and "%|" not in p.stderr, p.stderr


NOISY_WATCH = r'''
import logging, sys
import fsspec
from fsspec.implementations.local import LocalFileSystem
from ckptsync.cli import main

class NoisyFS(LocalFileSystem):
    """A backend whose library logs (as botocore, gcsfs or watchdog do) while the daemon runs."""
    protocol = "noisy"
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        logging.getLogger("noisy.lib").warning("a third-party library speaks")
        # watchdog 7 logs this when its own stop races its reader thread (inotify.py)
        logging.getLogger("watchdog.observers.inotify").error(
            "InotifyEmitter.queue_events() called when the thread is inactive")

fsspec.register_implementation("noisy", NoisyFS, clobber=True)
sys.exit(main(sys.argv[1:]))
'''


def test_watch_json_third_party_log_records_are_json_lines_too(tmp_path: Path) -> None:
    """``watch --json``: every stderr line is one JSON object, also a record another library
    logs (it was printed as plain text, breaking a reader of the JSON lines); watchdog's
    benign stop-race message is not reported as an error."""
    local = LocalStore(tmp_path / "ckpts")
    make_local(local, 1)
    script = tmp_path / "noisy_watch.py"
    script.write_text(NOISY_WATCH)
    p = subprocess.run([sys.executable, str(script), "watch", str(local.directory),
                        f"noisy://{tmp_path}/remote/run", "--once", "--json", "--no-progress",
                        "-o", "auto_mkdir=true"],
                       capture_output=True, text=True, timeout=120, env=_env())
    assert p.returncode == 0, p.stderr
    lines = [json.loads(line) for line in p.stderr.splitlines()]  # each line one object
    assert any(x.get("msg") == "a third-party library speaks" and x.get("logger") == "noisy.lib"
               for x in lines), p.stderr
    assert not any("thread is inactive" in json.dumps(x) for x in lines), p.stderr
