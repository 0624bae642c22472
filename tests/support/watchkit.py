"""Shared helpers for the daemon tests: starting ``ckptsync watch`` processes, making local
checkpoints without torch, reading a process's CPU time and children from ``/proc``."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ckptsync.local import LocalStore
from ckptsync.manifest import Manifest, make_name
from ckptsync.remote import RemoteStore
from tests.support.paths import PY, SCRIPTS, child_env


class Daemon:
    """A ``ckptsync watch`` subprocess (through run_daemon.py: ``slowfile://`` is known)."""

    def __init__(self, local: Path, url: str, *args: str, log: Path,
                 storage_options: dict[str, Any] | None = None, **env: str) -> None:
        import json

        extra = dict(env)
        if storage_options:
            extra["CKPTSYNC_STORAGE_OPTIONS"] = json.dumps(storage_options)
        self.log = log
        self._logf = open(log, "ab")  # noqa: SIM115  (closed in wait())
        self.proc = subprocess.Popen(
            # --create: a test's daemon may start before its trainer made the directory.
            [PY, str(SCRIPTS / "run_daemon.py"), "watch", str(local), url, "--create", *args],
            env=child_env(**extra), stdout=self._logf, stderr=self._logf,
            stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self, timeout: float = 120) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._logf.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.wait()

    def term(self, timeout: float = 120) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def daemon(local: Path, url: str, *args: str, log: Path, **kw: Any) -> Iterator[Daemon]:
    d = Daemon(local, url, *args, log=log, **kw)
    try:
        yield d
    finally:
        d.kill()


def run_cli(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, str(SCRIPTS / "run_daemon.py"), *args], env=child_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def make_checkpoints(local: Path, steps: list[int], size: int = 4096,
                     metrics: Callable[[int], dict[str, float]] | None = None) -> list[str]:
    """Commit one native-layout checkpoint per step (two files of ``size`` random bytes)."""
    store = LocalStore(local)
    names = []
    for step in steps:
        name = make_name(step)
        st = store.staging(name)
        st.write_file("model.pt", os.urandom(size))
        st.write_file("optim/state.pt", os.urandom(size // 2 + 1))
        st.commit(Manifest.new(step=step, files=st.entries, name=name,
                               metrics=metrics(step) if metrics else None))
        names.append(name)
    return names


def wait_for(cond: Callable[[], Any], what: str, timeout: float = 60,
             proc: subprocess.Popen[Any] | None = None, poll: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc/<pid>/stat."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return ticks / os.sysconf("SC_CLK_TCK")


def live_children(pid: int) -> list[int]:
    """Pids of the live (not zombie) direct children of ``pid``."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            raw = (p / "stat").read_text()
        except OSError:
            continue
        rest = raw[raw.rindex(")") + 2 :].split()
        if int(rest[1]) == pid and rest[0] != "Z":
            out.append(int(p.name))
    return out


def pid_alive(pid: int) -> bool:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return raw[raw.rindex(")") + 2] != "Z"


def assert_remote_sound(store: RemoteStore) -> list[Manifest]:
    """Every committed remote checkpoint verifies in full (sizes and digests)."""
    listed = store.list()
    for m in listed:
        store.verify(m.name, full=True)
    return listed
