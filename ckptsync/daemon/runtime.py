"""What a running daemon shares with the outside: exit codes, its event log, its files.

Files in ``LOCAL_DIR/.ckptsync-watch/``: ``lock`` (flock: one daemon per directory, holds the
pid; :class:`DirLock`), ``status.json`` (replaced atomically; read by :func:`read_status` and
:func:`daemon_status`, which ``ckptsync status`` prints), ``spool/`` (zero-code versions
waiting for, or kept after, their upload).

:class:`EventLog` (defined with every command's output in :mod:`ckptsync.output`) writes one
structured event per line on stderr (``key=value`` or JSON), with every credential scrubbed.
:func:`resumed_from` names the checkpoint a live trainer resumed from (retention keeps it).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

from ckptsync.errors import ConfigError
from ckptsync.local import RESUMED_FILE, WATCH_DIR
from ckptsync.output import EventLog

__all__ = [
    "EXIT_CONFIG",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_REMOTE",
    "DirLock",
    "EventLog",
    "daemon_status",
    "pid_alive",
    "read_status",
    "resumed_from",
    "watch_dir",
]

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_REMOTE = 0, 1, 2, 3
#: ``--once`` stopped by SIGTERM/SIGINT before everything was committed (the CLI's
#: ``EXIT_INTERRUPTED``: one table, README "The command line").
EXIT_INTERRUPTED = 130
STATUS_NAME = "status.json"
LOCK_NAME = "lock"
SPOOL_NAME = "spool"


# --------------------------------------------------------------------------- status file
def watch_dir(local_dir: Path) -> Path:
    return local_dir / WATCH_DIR


def read_status(local_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The last status the daemon wrote for ``local_dir``, or None if it never ran there."""
    path = watch_dir(Path(local_dir).expanduser().absolute()) / STATUS_NAME
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _lock_holder(local_dir: Path) -> int | None:
    """The pid of the daemon holding ``local_dir``'s lock, or None if no daemon holds it."""
    path = watch_dir(local_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raw = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(raw) if raw.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def daemon_status(local_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The status file plus ``running`` (a daemon holds the directory's lock now) and ``pid``,
    made exact against the directory as it is now (:func:`_exact`).

    Works for a running daemon and after it stopped (the last status it wrote).
    """
    d = Path(local_dir).expanduser().absolute()
    st = read_status(d) or {}
    holder = _lock_holder(d)
    st["running"] = holder is not None
    if holder is not None and holder > 0:
        st["pid"] = holder
    for key in ("synced", "pending", "uploading", "settling", "failed",
                "skipped_by_retention"):
        st.setdefault(key, [])
    st.setdefault("waiting_for_nodes", {})
    st.setdefault("in_sync", False)
    st["local_dir"] = str(d)
    if "state" in st:
        _exact(st, d)
    return st


def _committed_here(d: Path) -> set[str] | None:
    """The committed checkpoints in ``d`` and in its daemon's spool, or None if unreadable."""
    from ckptsync.errors import CkptSyncError
    from ckptsync.local import LocalStore

    names: set[str] = set()
    try:
        for where in (d, watch_dir(d) / SPOOL_NAME):
            if where.is_dir():
                names.update(c.name for c in LocalStore(where).list())
    except (CkptSyncError, OSError):
        return None
    return names


def _exact(st: dict[str, Any], d: Path) -> None:
    """Make ``st`` (the daemon's last word) exact for the directory now: a committed local
    checkpoint that the daemon has not acknowledged as committed remotely (nor as dropped by
    retention, nor as one node's part) is pending, whether or not the daemon has seen it
    yet (listed in ``not_seen`` too); one deleted locally since (the trainer's retention) is
    no longer pending, nor failed. ``in_sync`` follows."""
    names = _committed_here(d)
    if names is None:
        return  # the file's word, as written
    done = set(st["synced"]) | set(st["skipped_by_retention"]) | set(st["waiting_for_nodes"])
    pending = [n for n in st["pending"] if n in names]
    unseen = sorted(names - done - set(pending))
    st["pending"] = pending + unseen
    st["not_seen"] = unseen
    st["failed"] = [f for f in st["failed"] if not isinstance(f, dict) or f.get("name") in names]
    st["in_sync"] = (st.get("last_reconcile_ts") is not None and not st["pending"]
                     and not st["uploading"] and not st["settling"] and not st["failed"]
                     and not st["waiting_for_nodes"] and not st.get("error"))


class DirLock:
    """An exclusive ``flock`` on ``<dir>/.ckptsync-watch/lock`` holding the daemon's pid.

    Raises:
        ConfigError: another daemon already watches the directory.
    """

    def __init__(self, local_dir: Path) -> None:
        path = watch_dir(local_dir) / LOCK_NAME
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + 1.0
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:  # a brief shared lock is `ckptsync status`
                    other = os.pread(self.fd, 32, 0).decode(errors="replace").strip()
                    os.close(self.fd)
                    raise ConfigError(
                        f"another ckptsync watch (pid {other or '?'}) already watches "
                        f"{local_dir}; stop it first (or use `ckptsync status {local_dir}`)"
                    ) from None
                time.sleep(0.05)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the flock
            self.fd = -1


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def resumed_from(local_dir: Path) -> str | None:
    """The checkpoint a live trainer resumed from (``RESUMED_FILE`` with a live pid), or None."""
    try:
        data = json.loads((local_dir / RESUMED_FILE).read_text())
        name, pid = data["name"], int(data["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return name if isinstance(name, str) and pid_alive(pid) else None
