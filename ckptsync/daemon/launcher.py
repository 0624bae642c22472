"""Start the watch daemon from Python (a notebook, a training script) as a background process.

Example::

    from ckptsync import start_watcher
    w = start_watcher("ckpts", "s3://bucket/run1", keep_last=3)
    ...                                    # train; save with Checkpointer("ckpts") or torch.save
    w.flush(timeout=600)                   # every local checkpoint is committed remotely
    w.stop()

The daemon is ``python -m ckptsync watch ...`` in its own session, so a crashing trainer (or
a Ctrl-C in the notebook) does not take it down. Unless ``detach=True`` it watches this
process: when it exits, the daemon uploads what is pending and exits too. Storage options go
to the daemon through its environment, never its command line (``ps`` shows command lines).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ckptsync.daemon.runtime import daemon_status, read_status
from ckptsync.daemon.statusview import outcome
from ckptsync.daemon.wait import WAIT_FAILED, flush_mount, outstanding
from ckptsync.errors import CkptSyncError, ConfigError
from ckptsync.local import WATCH_DIR
from ckptsync.ownership import check_remote_outside, check_remote_url
from ckptsync.zerocode.presets import preset_rule

__all__ = ["WatcherHandle", "start_watcher"]

log = logging.getLogger("ckptsync")


class WatcherHandle:
    """A running ``ckptsync watch`` process started by :func:`start_watcher`."""

    def __init__(self, proc: subprocess.Popen[bytes], local_dir: Path, log_path: Path) -> None:
        self.proc = proc
        self.local_dir = local_dir
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        """Is the daemon process alive?"""
        return self.proc.poll() is None

    def status(self) -> dict[str, Any]:
        """The daemon's status (see :func:`ckptsync.daemon.daemon_status`)."""
        return daemon_status(self.local_dir)

    def _own_status(self) -> dict[str, Any] | None:
        st = read_status(self.local_dir)
        return st if st is not None and st.get("pid") == self.proc.pid else None

    def flush(self, timeout: float | None = None, poll_s: float = 0.1) -> dict[str, Any]:
        """Block until every committed local checkpoint (and every finished zero-code
        version) is committed remotely: the comparison ``ckptsync status`` and ``ckptsync
        wait`` make (:func:`~ckptsync.daemon.runtime.daemon_status`: the daemon's word,
        checked against the directory now), after a reconcile that started after this call.

        Asks the daemon for an immediate reconcile (SIGUSR1) first. Where the remote is on a
        FUSE mount (Colab's Drive), committed means handed to the mount: the mount is then
        flushed (``fsync`` of what is there, ``os.sync()``) and what to run before the
        runtime ends (``drive.flush_and_unmount()``) is logged. Returns the status.

        Raises:
            TimeoutError: still pending after ``timeout`` seconds.
            CkptSyncError: the daemon exited, or its last upload attempt failed with nothing
                newer committed and nothing uploading (``ckptsync wait``'s exit 3).
        """
        t0 = time.time()
        deadline = None if timeout is None else time.monotonic() + timeout
        signalled = False
        while True:
            own = self._own_status()
            if not self.running():
                raise CkptSyncError(
                    f"the ckptsync watch daemon (pid {self.pid}) exited with code "
                    f"{self.proc.returncode}; see {self.log_path}"
                    + (f": {own.get('error')}" if own and own.get("error") else "")
                )
            if own is not None and not signalled:
                # Only once the daemon wrote its status: it blocks SIGUSR1 by then (the
                # default action of SIGUSR1 would kill it).
                os.kill(self.pid, signal.SIGUSR1)
                signalled = True
            st = daemon_status(self.local_dir) if own is not None else None
            if st is not None and (st.get("last_reconcile_ts") or 0) >= t0:
                if st.get("in_sync"):
                    self._flush_mount(st)
                    return st
                if outcome(st) == WAIT_FAILED and not st.get("uploading"):
                    raise CkptSyncError(
                        f"ckptsync watch could not upload to {st.get('remote')}: "
                        f"{outstanding(st)}")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"not everything is committed after {timeout}s: "
                                   + (outstanding(st) if st is not None
                                      else "the daemon wrote no status yet"))
            time.sleep(poll_s)

    def _flush_mount(self, st: dict[str, Any]) -> None:
        mount, _ = flush_mount(st)
        if mount is not None:
            log.warning("%s; %s", mount.note, mount.guidance)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM the daemon (in-flight uploads finish or are abandoned, never half
        committed), wait for it, and return its exit code. SIGKILL after ``timeout``."""
        if self.running():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc.returncode is not None else -1

    def __enter__(self) -> WatcherHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _options_json(storage_options: Mapping[str, Any]) -> str:
    """The options as the daemon reads them (``CKPTSYNC_STORAGE_OPTIONS``).

    Raises:
        ConfigError: a value is not JSON (a credentials object cannot cross processes).
    """
    try:
        return json.dumps(dict(storage_options))
    except (TypeError, ValueError):
        bad = sorted(k for k, v in storage_options.items() if not _jsonable(v))
        raise ConfigError(
            f"start_watcher: storage option(s) {bad} cannot be passed to the daemon process "
            "(it reads its options as JSON); give what a process can read again: for "
            "gdrive://, token='google_default' (after google.colab.auth.authenticate_user()) "
            "or the path of an authorized-user JSON file") from None


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def start_watcher(
    local: str | os.PathLike[str],
    remote: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    keep_last: int | None = None,
    keep_best: str | None = None,
    keep_every: int | None = None,
    rules: Iterable[str] = (),
    presets: Iterable[str] = (),
    interval: float | None = None,
    settle: float | None = None,
    max_wait: float | None = None,
    workers: int | None = None,
    stop_timeout: float | None = None,
    nice: int | None = None,
    detach: bool = False,
    log_path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    python: str | None = None,
    wait_ready: float = 30.0,
    key_files: Sequence[str | os.PathLike[str]] = (),
) -> WatcherHandle:
    """Start ``ckptsync watch LOCAL REMOTE`` as a background process; return its handle.

    Args:
        local: the checkpoint directory to watch.
        remote: fsspec URL.
        storage_options: fsspec options (passed through the child's environment).
        keep_last, keep_best, keep_every, rules, interval, settle, max_wait, workers,
            stop_timeout, nice: as the ``watch`` flags of the same names.
        presets: framework presets (``"hf-trainer"``, ``"lightning"``, ``"accelerate"``,
            ``"dcp"``), as ``watch --preset``.
        detach: keep running after this process exits (default: stop with it, after
            uploading what is pending).
        log_path: the daemon's log (default ``LOCAL/.ckptsync-watch/daemon.log``, appended).
        env: extra environment for the daemon.
        python: interpreter (default: this one).
        wait_ready: seconds to wait for the daemon's first status (0: do not wait).
        key_files: ``--key-file`` flags: encrypt every upload (default: the daemon reads
            ``CKPTSYNC_KEY`` / ``CKPTSYNC_KEY_FILE`` like any command).

    Raises:
        ConfigError: ``remote`` is empty, or is inside ``local``, a preset is unknown, or a
            storage option is not JSON (a credentials object): nothing is started.
        CkptSyncError: the daemon exited during start-up (bad configuration, permanent remote
            error, another daemon on the directory); the message includes its log's tail.
    """
    check_remote_outside(check_remote_url(remote, "remote"), local, "remote")
    if storage_options:
        _options_json(storage_options)  # fails here, before anything is started
    presets = list(presets)
    for name in presets:
        preset_rule(name)  # an unknown name fails here, not in the child's log
    local_dir = Path(local).expanduser().absolute()
    (local_dir / WATCH_DIR).mkdir(parents=True, exist_ok=True)
    log_file = Path(log_path) if log_path else local_dir / WATCH_DIR / "daemon.log"
    cmd = [python or sys.executable, "-m", "ckptsync", "watch", str(local_dir), remote]
    flags: dict[str, Any] = {"--keep-last": keep_last, "--keep-best": keep_best,
                             "--keep-every": keep_every, "--interval": interval,
                             "--settle": settle, "--max-wait": max_wait, "--workers": workers,
                             "--stop-timeout": stop_timeout, "--nice": nice}
    for flag, value in flags.items():
        if value is not None:
            cmd += [flag, str(value)]
    for rule in rules:
        cmd += ["--rule", rule]
    for key_file in key_files:
        cmd += ["--key-file", str(key_file)]
    for name in presets:
        cmd += ["--preset", name]
    if not detach:
        cmd += ["--parent-pid", str(os.getpid())]
    child_env = dict(os.environ)
    child_env.update(env or {})
    if storage_options:
        child_env["CKPTSYNC_STORAGE_OPTIONS"] = _options_json(storage_options)
    with open(log_file, "ab") as logf:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                env=child_env, start_new_session=True, close_fds=True)
    handle = WatcherHandle(proc, local_dir, log_file)
    deadline = time.monotonic() + wait_ready
    while wait_ready and time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_file.read_text(errors="replace").splitlines()[-5:]
            raise CkptSyncError(f"ckptsync watch exited during start-up (code "
                                f"{proc.returncode}): " + " | ".join(tail))
        if handle._own_status() is not None:
            break
        time.sleep(0.05)
    return handle
