"""The daemon: ``ckptsync watch LOCAL_DIR REMOTE_URL`` keeps a remote in step with a directory.

Events are hints, scans are truth (DESIGN.md, "The daemon")::

    watchdog emitter ──► _Handler.dispatch ──► queue ──► dispatcher thread ──► upload pool
    (inotify thread)     (enqueues only)                 reconcile, versions     RemoteStore.push
                                                         status file, retention

A reconcile lists the committed local checkpoints (the native ones in ``LOCAL_DIR`` and the
zero-code versions in the spool) and pushes those the remote does not hold, newest first, one
push in flight per source (the native checkpoints; each zero-code rule): however fast a
trainer saves, the remote is never further behind than that push plus the newest checkpoint,
which goes next. Older ones are pushed once nothing newer waits; one the trainer deletes
before or while it is pushed (its own retention) is dropped, not failed. A reconcile runs at
start-up, after every push, shortly after file events, and every ``interval`` seconds. The
remote is the only record needed: pushing a committed name is a no-op and a push killed at
any point leaves no manifest, so the daemon can be killed (even with SIGKILL) and restarted
at any time.

Threads: the watchdog observer, one dispatcher, ``workers`` upload threads and one snapshot
thread (zero-code copies); each stops through an :class:`threading.Event`. SIGTERM/SIGINT stop
taking work: queued uploads are cancelled (never started), in-flight ones get ``stop_timeout``
seconds, then are abandoned (never committed) and what they wrote is removed; the daemon exits
0 within ``stop_timeout`` + :data:`STOP_GRACE_S` whatever the remote does (a call that does not
return is left behind: the process exits without it). SIGUSR1 asks for an immediate reconcile
(used by ``flush``).

Files in ``LOCAL_DIR/.ckptsync-watch/``: ``lock`` (flock: one daemon per directory, holds the
pid), ``status.json`` (replaced atomically; read by ``ckptsync status``), ``spool/`` (zero-code
versions waiting for, or kept after, their upload).

Errors: once running, the daemon never exits on an error: a failed push (of any exception
type) is reported (event and ``status``) and retried with back-off, and a failing remote
listing keeps the last known state; only start-up can end it with an error.

Exit codes: 0 done (or stopped by a signal), 1 ``--once`` finished with failed checkpoints
(or could not reach the remote, or a zero-code version it could not copy: a full disk; or the
daemon crashed), 2 bad configuration or another daemon holds the directory, found at
start-up, 3 a permanent remote error found at start-up (credentials, missing bucket): a
supervisor may restart on 3 (the bucket or the credentials may be fixed meanwhile), not on 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import queue
import random
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ckptsync.config import storage_options_from_env
from ckptsync.errors import CkptSyncError, ConfigError, RemoteError
from ckptsync.local import RESUMED_FILE, FileOps, LocalCheckpoint, LocalStore, write_json_atomic
from ckptsync.manifest import MANIFEST_NAME, Manifest, parse_name
from ckptsync.ownership import check_remote_outside, check_remote_url
from ckptsync.retention import (
    BestRule,
    CheckpointInfo,
    RetentionPolicy,
    parse_best,
    select_for_deletion,
)
from ckptsync.transfer import stopping
from ckptsync.zerocode import (
    WATCH_DIR,
    Due,
    Snapshot,
    VersionTracker,
    WatchRule,
    is_watched,
    signature_of,
    snapshot_version,
)

if TYPE_CHECKING:
    from ckptsync.remote import RemoteStore

__all__ = [
    "STOP_GRACE_S",
    "EXIT_CONFIG",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_REMOTE",
    "RESUMED_FILE",
    "WatchConfig",
    "Watcher",
    "daemon_status",
    "read_status",
    "run_daemon",
]

log = logging.getLogger("ckptsync.watch")

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_REMOTE = 0, 1, 2, 3
STATUS_NAME = "status.json"
LOCK_NAME = "lock"
SPOOL_NAME = "spool"
#: Written by a trainer's Checkpointer after ``restore()``: ``{"name": ..., "pid": ...}``.
#: While that pid is alive, retention never deletes ``name`` remotely.
ENV = "CKPTSYNC_"
_REMOTE_REFRESH_S = 60.0
_DEBOUNCE_S = 0.2
_PARENT_POLL_S = 1.0
_CKPT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".pkl")
#: Seconds a SIGTERM may take beyond ``stop_timeout``: abandoned pushes noticing their stop,
#: the removal of what they wrote, the last status. Past it the process exits regardless.
STOP_GRACE_S = 15.0
# After the stop event is set, how long an abandoned push gets to notice it (it checks between
# chunks; a call already sent returns within the read timeout, or is left behind).
_ABANDON_WAIT_S = 5.0


def _utc(ts: float | None = None) -> str:
    t = datetime.fromtimestamp(time.time() if ts is None else ts, timezone.utc)
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class WatchConfig:
    """Everything the daemon needs; build it with :meth:`resolve`.

    Attributes:
        local_dir: the directory to watch (native checkpoints and zero-code files).
        remote: fsspec URL of the remote root.
        storage_options: passed to fsspec unchanged.
        keep_last, keep_best, keep_every: remote retention (None: keep everything).
        once: reconcile, upload everything, exit.
        interval: seconds between full reconciles.
        settle: seconds a zero-code version's files must stay unchanged (stat) to be taken.
        max_wait: a zero-code file rewritten more often than ``settle`` is still taken at
            least this often, when a complete copy can be made (0: only once quiet).
        rules: zero-code rules (:class:`~ckptsync.zerocode.WatchRule`).
        workers: checkpoints uploaded at once.
        parent_pid: when this process exits, upload what is pending and exit.
        stop_timeout: seconds SIGTERM waits for in-flight uploads before abandoning them.
        log_format: ``"kv"`` (key=value) or ``"json"`` lines on stderr.
        nice: added to the daemon process's CPU niceness at start (0-19; 0 leaves it), so
            that a trainer on the same cores gets the CPU first (Unix only).
    """

    local_dir: Path
    remote: str
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    keep_last: int | None = None
    keep_best: BestRule | None = None
    keep_every: int | None = None
    once: bool = False
    interval: float = 5.0
    settle: float = 2.0
    max_wait: float = 60.0
    rules: tuple[WatchRule, ...] = ()
    workers: int = 2
    parent_pid: int | None = None
    stop_timeout: float = 30.0
    log_format: str = "kv"
    nice: int = 0

    def __repr__(self) -> str:
        # Storage options hold credentials and a URL may hold a password: show neither.
        from ckptsync.redact import redact_url

        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        shown["remote"] = redact_url(self.remote)
        shown["storage_options"] = f"<keys: {', '.join(sorted(self.storage_options)) or '-'}>"
        body = ", ".join(f"{k}={v if k == 'storage_options' else repr(v)}"
                         for k, v in shown.items())
        return f"WatchConfig({body})"

    def __post_init__(self) -> None:
        if self.interval <= 0 or min(self.settle, self.max_wait, self.stop_timeout) < 0:
            raise ConfigError("interval must be > 0; settle, max-wait and stop-timeout >= 0")
        if not 0 <= self.nice <= 19:
            raise ConfigError(f"nice must be between 0 and 19, got {self.nice}")
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        if self.log_format not in ("kv", "json"):
            raise ConfigError(f"log format must be 'kv' or 'json', got {self.log_format!r}")
        check_remote_url(self.remote, "REMOTE_URL (or CKPTSYNC_REMOTE, or 'remote' in the "
                         "config file)")
        check_remote_outside(self.remote, self.local_dir, "REMOTE_URL")

    @property
    def policy(self) -> RetentionPolicy:
        return RetentionPolicy(self.keep_last, self.keep_best, self.keep_every)

    @classmethod
    def resolve(
        cls, args: Mapping[str, Any], env: Mapping[str, str] | None = None
    ) -> WatchConfig:
        """Merge per setting: ``args`` (None = unset) > ``CKPTSYNC_*`` env > config file > defaults.

        The config file is ``args["config"]`` or ``$CKPTSYNC_CONFIG``: TOML (``.toml``) or
        JSON, with the setting names as keys (``remote``, ``storage_options``, ``keep_last``,
        ``keep_best``, ``keep_every``, ``interval``, ``settle``, ``max_wait``, ``rules``,
        ``workers``, ``stop_timeout``, ``log_format``, ``nice``); TOML may nest them under
        ``[watch]``.
        ``storage_options`` are merged key by key with the same precedence.

        Raises:
            ConfigError: an unreadable file, an unknown key, a value that does not parse.
        """
        env = os.environ if env is None else env
        cfg_path = args.get("config") or env.get(ENV + "CONFIG")
        file_vals = _read_config_file(Path(cfg_path)) if cfg_path else {}
        env_vals = _env_values(env)
        arg_vals = {k: v for k, v in args.items() if v is not None and k != "config"}
        if arg_vals.get("rules") == []:
            del arg_vals["rules"]
        merged: dict[str, Any] = {}
        for layer in (file_vals, env_vals, arg_vals):
            for k, v in layer.items():
                if k == "storage_options":
                    merged.setdefault(k, {}).update(v)
                else:
                    merged[k] = v
        if "local_dir" not in merged:
            raise ConfigError("no LOCAL_DIR to watch")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(merged) - known
        if unknown:
            raise ConfigError(f"unknown watch settings {sorted(unknown)}; known: {sorted(known)}")
        try:
            merged["local_dir"] = Path(merged["local_dir"]).expanduser().absolute()
            merged["remote"] = str(merged.get("remote") or "")
            for k in ("keep_last", "keep_every", "workers", "parent_pid", "nice"):
                if merged.get(k) is not None:
                    merged[k] = int(merged[k])
            for k in ("interval", "settle", "max_wait", "stop_timeout"):
                if merged.get(k) is not None:
                    merged[k] = float(merged[k])
            if isinstance(merged.get("keep_best"), str):
                merged["keep_best"] = parse_best(merged["keep_best"])
            merged["rules"] = tuple(r if isinstance(r, WatchRule) else WatchRule.parse(str(r))
                                    for r in merged.get("rules", ()))
            merged["once"] = bool(merged.get("once", False))
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"invalid watch setting: {e}") from e
        return cls(**merged)


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from e
    try:
        if path.suffix == ".toml":
            import tomllib

            data: Any = tomllib.loads(raw.decode())
            data = data.get("watch", data)
        else:
            data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} does not parse: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table/object of settings")
    out = {k.replace("-", "_"): v for k, v in data.items()}
    if "storage_options" in out and not isinstance(out["storage_options"], dict):
        raise ConfigError(f"config file {path}: storage_options must be a table/object")
    return out


def _env_values(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("remote", "keep_last", "keep_best", "keep_every", "interval", "settle",
                "max_wait", "workers", "stop_timeout", "log_format", "nice"):
        raw = env.get(ENV + key.upper())
        if raw is not None and raw.strip():
            out[key] = raw.strip()
    opts = storage_options_from_env(env)
    if opts:
        out["storage_options"] = opts
    raw = env.get(ENV + "RULES")
    if raw and raw.strip():
        out["rules"] = (json.loads(raw) if raw.lstrip().startswith("[")
                        else [r for r in raw.splitlines() if r.strip()])
    return out


def parse_storage_option(text: str, index: int | None = None) -> tuple[str, Any]:
    """``k=v`` where ``v`` is JSON when it parses (``anon=true``, ``client_kwargs={...}``).

    Raises:
        ConfigError: no ``=`` or no key; the message names the option's ``index`` (1-based)
            and never echoes its text, which may be a secret typed without its ``KEY=``.
    """
    key, eq, value = text.partition("=")
    if not eq or not key:
        which = f" #{index}" if index is not None else ""
        raise ConfigError(f"storage option{which} (-o) is not KEY=VALUE (its text is not "
                          "shown: it may hold a secret)")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


# --------------------------------------------------------------------------- structured logs
class EventLog:
    """One event per line on a stream: ``ts=... level=info event=pushed name=...`` or JSON."""

    def __init__(self, stream: IO[str] | None = None, fmt: str = "kv") -> None:
        self.stream = stream or sys.stderr
        self.fmt = fmt
        self._lock = threading.Lock()

    def __call__(self, level: str, event: str, **fields: Any) -> None:
        from ckptsync.redact import scrub

        rec = {"ts": _utc(), "level": level, "event": event, **fields}
        if self.fmt == "json":
            line = json.dumps(rec, default=str)
        else:
            line = " ".join(f"{k}={_kv(v)}" for k, v in rec.items())
        line = scrub(line)  # no credential ever reaches the log (DESIGN.md)
        with self._lock:
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass


def _kv(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    if s and not any(c in s for c in ' "=\n\t'):
        return s
    return json.dumps(s)


class _LogBridge(logging.Handler):
    """Routes ``ckptsync.*`` library log records (retries, commits) into the event log."""

    def __init__(self, events: EventLog) -> None:
        super().__init__(logging.INFO)
        self.events = events

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.events(record.levelname.lower(), "log", logger=record.name,
                        msg=record.getMessage())


# --------------------------------------------------------------------------- status file
def _watch_dir(local_dir: Path) -> Path:
    return local_dir / WATCH_DIR


def read_status(local_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The last status the daemon wrote for ``local_dir``, or None if it never ran there."""
    path = _watch_dir(Path(local_dir).expanduser().absolute()) / STATUS_NAME
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _lock_holder(local_dir: Path) -> int | None:
    """The pid of the daemon holding ``local_dir``'s lock, or None if no daemon holds it."""
    path = _watch_dir(local_dir) / LOCK_NAME
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
    """The status file plus ``running`` (a daemon holds the directory's lock now) and ``pid``.

    Works for a running daemon and after it stopped (the last status it wrote).
    """
    d = Path(local_dir).expanduser().absolute()
    st = read_status(d) or {}
    holder = _lock_holder(d)
    st["running"] = holder is not None
    if holder is not None and holder > 0:
        st["pid"] = holder
    for key in ("synced", "pending", "uploading", "settling", "failed"):
        st.setdefault(key, [])
    st.setdefault("in_sync", False)
    st["local_dir"] = str(d)
    return st


class DirLock:
    """An exclusive ``flock`` on ``<dir>/.ckptsync-watch/lock`` holding the daemon's pid.

    Raises:
        ConfigError: another daemon already watches the directory.
    """

    def __init__(self, local_dir: Path) -> None:
        path = _watch_dir(local_dir) / LOCK_NAME
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


def _pid_alive(pid: int) -> bool:
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
    return name if isinstance(name, str) and _pid_alive(pid) else None


# --------------------------------------------------------------------------- events
def _handler_class() -> type:
    from watchdog.events import FileSystemEventHandler

    class _Handler(FileSystemEventHandler):
        """Runs on watchdog's emitter thread: translate and enqueue, nothing else."""

        def __init__(self, root: Path, q: queue.Queue[tuple[Any, ...]]) -> None:
            super().__init__()
            self.root = str(root)
            self.q = q

        def _rel(self, path: Any) -> str | None:
            p = os.fsdecode(path)
            rel = os.path.relpath(p, self.root)
            if rel == "." or rel.startswith("..") or rel.split(os.sep, 1)[0] == WATCH_DIR:
                return None
            return rel.replace(os.sep, "/")

        def on_any_event(self, event: Any) -> None:
            kind = event.event_type
            if kind in ("opened", "closed_no_write", "attrib"):
                return  # our own reads show up as these: never let them wake us
            if event.is_directory and kind == "modified":
                return
            now = time.monotonic()
            if kind == "moved":
                src, dst = self._rel(event.src_path), self._rel(event.dest_path)
                if src is not None:
                    self.q.put(("fs", now, "moved_away", src, event.is_directory))
                if dst is not None:
                    self.q.put(("fs", now, "moved_in", dst, event.is_directory))
                return
            rel = self._rel(event.src_path)
            if rel is not None:
                self.q.put(("fs", now, kind, rel, event.is_directory))

    return _Handler


# --------------------------------------------------------------------------- the daemon
@dataclass
class _Failure:
    error: str
    attempts: int
    retry_at: float
    retryable: bool = True  # the remote may be failing: its source waits for the back-off


def _source(ckpt: LocalCheckpoint) -> str:
    """Which stream of checkpoints ``ckpt`` belongs to: "" (native) or its zero-code rule."""
    return str(ckpt.manifest.source.get("rule") or "")


class Watcher:
    """The daemon core: watch ``config.local_dir``, push what the remote lacks.

    ``run()`` blocks until stopped (``request_stop()``, or the end of ``--once``) and returns
    an exit code. Thread-safe controls: :meth:`request_stop`, :meth:`request_reconcile`.

    Args:
        config: the resolved configuration.
        store: a remote store (default: built from ``config.remote``); a fault seam in tests.
        events: the structured log sink (default: stderr).
        spool_ops: file system calls into the zero-code spool (a fault seam in tests).
    """

    def __init__(self, config: WatchConfig, *, store: RemoteStore | None = None,
                 events: EventLog | None = None, spool_ops: FileOps | None = None) -> None:
        self.config = config
        self.events = events or EventLog(fmt=config.log_format)
        self.local = LocalStore(config.local_dir)
        wdir = _watch_dir(self.local.directory)
        wdir.mkdir(exist_ok=True)
        self.status_path = wdir / STATUS_NAME
        self.spool = LocalStore(wdir / SPOOL_NAME, spool_ops)
        self.spool.cleanup()  # our own crashed snapshots (never the trainer's staging dirs)
        if store is None:
            from ckptsync.remote import RemoteStore

            store = RemoteStore(config.remote, dict(config.storage_options))
        self.store = store
        self._q: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._stop = threading.Event()
        self._abort = threading.Event()  # set: in-flight pushes abandon at their next chunk
        self._pool = ThreadPoolExecutor(config.workers, thread_name_prefix="ckptsync-upload")
        self._snap_pool = ThreadPoolExecutor(1, thread_name_prefix="ckptsync-snapshot")
        self._inflight: dict[str, Future[Any]] = {}
        self._inflight_src: dict[str, str] = {}  # name -> source (one push each)
        self._retention_job: Future[Any] | None = None  # the last retention run submitted
        self._failed: dict[str, _Failure] = {}
        self._remote: dict[str, Manifest] = {}
        self._skipped: set[str] = set()
        self._local_names: list[str] = []
        self._trackers = [VersionTracker(r, self.local.directory, config.settle,
                                         config.max_wait) for r in config.rules]
        self._warnings: list[str] = []
        self._retention_due = False
        self._retention_running = False
        self._fatal: str | None = None
        self._last_error: str | None = None  # the newest error reported (status)
        self._dropped: dict[str, str] = {}  # name -> why it is not pushed (gone)
        self._drain = config.once  # finish what is there, then exit
        self._state = "starting"
        self._started = _utc()
        self._last_reconcile: float | None = None
        self._remote_refreshed = 0.0
        self._reconcile_at: float | None = 0.0
        self._any_failed_once = False
        self._unreachable = False  # --once could not list the remote
        self.abandoned_calls = False  # a stopped push's call never returned (see _shutdown)
        self._parent = config.parent_pid
        self._parent_is_ppid = self._parent is not None and self._parent == os.getppid()

    # ------------------------------------------------------------------ controls
    def request_stop(self) -> None:
        """Stop taking new work; in-flight uploads get ``stop_timeout`` seconds. Thread-safe."""
        self._stop.set()
        self._q.put(("wake",))

    def request_reconcile(self) -> None:
        """Reconcile now (not at the next interval). Thread-safe."""
        self._q.put(("reconcile",))

    # ------------------------------------------------------------------ main loop
    def run(self) -> int:
        """Run until stopped; return the exit code (see the module doc)."""
        from watchdog.observers import Observer

        observer = Observer()
        observer.schedule(_handler_class()(self.local.directory, self._q),
                          str(self.local.directory), recursive=True)
        observer.daemon = True
        self.events("info", "start", pid=os.getpid(), local=str(self.local.directory),
                    remote=self._redacted(), rules=[r.spec for r in self.config.rules],
                    once=self.config.once)
        try:
            observer.start()
            code = self._loop()
        finally:
            observer.stop()
            observer.join(timeout=10)
            self._shutdown()
        self._state = "failed" if self._fatal else "stopped"
        self._write_status()
        self.events("info" if code == EXIT_OK else "error", "exit", code=code,
                    pending=self._pending_names(), failed=sorted(self._failed))
        return code

    def _redacted(self) -> str:
        from ckptsync.remote import redact_url

        return redact_url(self.config.remote)

    def _loop(self) -> int:
        if not self._refresh_remote(initial=True):
            return EXIT_FAILED if self._unreachable else EXIT_REMOTE
        if self._stop.is_set():  # stopped while the remote was out of reach: push nothing
            return EXIT_OK
        self._init_signatures()
        self._state = "running"
        self._reconcile()
        self._warn_without_rules()
        # What was finished before the daemon started is taken now, not after an interval.
        self._take_versions(time.monotonic())
        while not self._stop.is_set():
            item = self._next_item()
            batch = [item] if item is not None else []
            while True:
                try:
                    batch.append(self._q.get_nowait())
                except queue.Empty:
                    break
            now = time.monotonic()
            for it in batch:
                self._guarded(f"handling {it[0]!r}", self._handle, it, now)
            if self._fatal:
                return EXIT_REMOTE
            self._check_parent()
            now = time.monotonic()
            if self._reconcile_at is not None and now >= self._reconcile_at:
                self._guarded("reconciling", self._reconcile)
            self._guarded("taking versions", self._take_versions, now)
            self._guarded("applying retention", self._maybe_retention)
            if self._drain and self._drained():
                if self._retention_running or self._retention_due:
                    continue
                failed = bool(self._failed) or any(t.gave_up for t in self._trackers)
                self._write_status()
                return EXIT_FAILED if failed and self.config.once else EXIT_OK
        return EXIT_OK

    def _guarded(self, what: str, fn: Callable[..., None], *args: Any) -> None:
        """Run one step of the loop; an error of any type is reported, never the end of the
        daemon (the next reconcile, at the latest ``interval`` seconds later, retries)."""
        try:
            fn(*args)
        except Exception as e:
            self._last_error = f"{what}: {type(e).__name__}: {e}"
            log.debug("error while %s", what, exc_info=True)
            self.events("error", "internal_error", during=what, error_type=type(e).__name__,
                        error=str(e), action="continuing; the next reconcile retries")
            if self._reconcile_at is None:
                self._schedule(time.monotonic() + self.config.interval)

    def _next_item(self) -> tuple[Any, ...] | None:
        now = time.monotonic()
        deadlines = [self._reconcile_at] if self._reconcile_at is not None else []
        wall = time.time()
        deadlines += [d for t in self._trackers
                      if (d := t.next_deadline(now, wall)) is not None]
        if self._failed:
            deadlines.append(min(f.retry_at for f in self._failed.values()))
        timeout = max(0.0, min(deadlines, default=now + self.config.interval) - now)
        if self._parent is not None:
            timeout = min(timeout, _PARENT_POLL_S)
        try:
            return self._q.get(timeout=timeout + 0.001)
        except queue.Empty:
            return None

    def _handle(self, item: tuple[Any, ...], now: float) -> None:
        kind = item[0]
        if kind == "fs":
            _, t, ev, rel, is_dir = item
            for tr in self._trackers:
                tr.on_event(ev, rel, t, is_dir)
            # A native local commit is a directory renamed into place; debounce bursts.
            top = rel.split("/", 1)[0]
            if ev == "moved_in" and is_dir and not top.startswith("."):
                self._schedule(now + _DEBOUNCE_S)
        elif kind == "reconcile":
            self._schedule(now)
        elif kind == "pushed":
            self._on_pushed(item[1], item[2], now)
        elif kind == "snapshot":
            self._on_snapshot(item[1], item[2], item[3], item[4], item[5])
        elif kind == "retention":
            self._on_retention(item[1])

    def _schedule(self, at: float) -> None:
        if self._reconcile_at is None or at < self._reconcile_at:
            self._reconcile_at = at

    def _check_parent(self) -> None:
        if self._parent is None or self._drain:
            return
        gone = (os.getppid() != self._parent) if self._parent_is_ppid \
            else not _pid_alive(self._parent)
        if gone:
            self.events("info", "parent_exited", parent_pid=self._parent,
                        action="uploading what is pending, then exiting")
            self._drain = True
            self._schedule(time.monotonic())
            for tr in self._trackers:
                tr.settle = 0.0

    # ------------------------------------------------------------------ remote knowledge
    def _refresh_remote(self, *, initial: bool = False) -> bool:
        """Re-list the remote's committed checkpoints.

        At start-up (``initial``) a permanent error (credentials, missing bucket, a bad URL) is
        a configuration error: False, the daemon exits; so is an unreachable remote with
        ``--once`` (``list`` has retried already). Any other error, and every error later, is
        reported and leaves the last known state: a later refresh retries (a push of a name
        that is already committed is a no-op, so a stale view costs nothing).
        """
        attempt = 0
        while not self._stop.is_set():
            try:
                with stopping(self._stop):  # a stop cuts the retries' back-off short
                    listed = self.store.list()
            except Exception as e:
                if self._stop.is_set():
                    return True
                permanent = isinstance(e, ConfigError) or (
                    isinstance(e, RemoteError) and not e.retryable)
                if initial and permanent:
                    self._fail_fast(e)
                    return False
                if initial and self.config.once:
                    self._unreachable = True
                    self._fatal = str(e)
                    self.events("error", "remote_unreachable", error=str(e),
                                hint="--once gives up: check the URL, the network and the "
                                     "endpoint, then run it again; nothing was committed")
                    return False
                attempt += 1
                delay = _backoff(attempt)
                self._last_error = f"listing the remote: {type(e).__name__}: {e}"
                self.events("warning", "remote_unavailable", error=str(e),
                            error_type=type(e).__name__,
                            retry_in_s=round(delay, 2) if initial else None)
                if not initial or self._stop.wait(delay):
                    return True
                continue
            self._remote = {m.name: m for m in listed}
            self._remote_refreshed = time.monotonic()
            return True
        return True

    def _fail_fast(self, e: BaseException) -> None:
        self._fatal = str(e)
        self._state = "failed"
        self.events("error", "fatal", error=str(e),
                    hint="a permanent remote error: fix the URL, bucket or credentials and "
                         "restart; nothing partial was committed")

    def _init_signatures(self) -> None:
        for tr in self._trackers:
            spooled = [c.manifest for c in self.spool.list()
                       if c.manifest.source.get("rule") == tr.rule.spec]
            remote = [m for m in self._remote.values()
                      if is_watched(m) and m.source.get("rule") == tr.rule.spec]
            newest = sorted(spooled + remote, key=lambda m: m.sort_key())
            if newest:
                tr.last_signature = signature_of(newest[-1])

    # ------------------------------------------------------------------ reconcile
    def _local_checkpoints(self) -> list[LocalCheckpoint]:
        out = self.local.list() + self.spool.list()
        out.sort(key=lambda c: c.manifest.sort_key())
        return out

    def _reconcile(self) -> None:
        now = time.monotonic()
        self._reconcile_at = now + self.config.interval
        if now - self._remote_refreshed > max(_REMOTE_REFRESH_S, 12 * self.config.interval) \
                and not self._inflight and not self._retention_running:
            self._refresh_remote()
            if self._fatal:
                return
        local = self._local_checkpoints()
        self._local_names = [c.name for c in local]
        present = set(self._local_names)
        # A checkpoint deleted locally (the trainer's retention) can never be pushed: forget
        # its failure, or status and a drain would wait for it forever.
        for name in [n for n in self._failed if n not in present]:
            del self._failed[name]
        self._dropped = {n: why for n, why in self._dropped.items() if n in present}
        doomed: set[str] = set()
        policy = self.config.policy
        if policy.active:
            union = {c.name: c.manifest for c in local}
            union.update(self._remote)
            infos = [CheckpointInfo(m.name, m.step, m.sort_key(), m.metrics)
                     for m in union.values()]
            doomed = set(select_for_deletion(infos, policy, protect=self._protected()))
        self._skipped = {n for n in doomed if n not in self._remote}
        # Newest first, one push in flight per source: a trainer saving faster than the link
        # uploads never queues pushes the newest has to wait behind, and the ones it deletes
        # meanwhile are never started.
        busy = set(self._inflight_src.values())
        for ckpt in reversed(local):
            name, src = ckpt.name, _source(ckpt)
            if (src in busy or name in self._remote or name in self._inflight
                    or name in self._skipped or name in self._dropped):
                continue
            fail = self._failed.get(name)
            if fail is not None and self._drain and fail.attempts >= 3:
                continue  # draining (--once, or the parent exited): given up on
            if fail is not None and fail.retry_at > now:
                if fail.retryable:
                    busy.add(src)  # the remote is failing: retry the newest after its back-off
                continue
            self._submit_push(ckpt)
            busy.add(src)
        self._last_reconcile = time.time()
        self._write_status()

    def _protected(self) -> list[str]:
        name = resumed_from(self.local.directory)
        return [name] if name else []

    def _submit_push(self, ckpt: LocalCheckpoint) -> None:
        t0 = time.monotonic()
        self.events("info", "push_start", name=ckpt.name, step=ckpt.step,
                    bytes=ckpt.manifest.total_size)

        def job() -> Manifest:
            return self.store.push(ckpt, stop=self._abort)

        fut = self._pool.submit(job)
        self._inflight[ckpt.name] = fut
        self._inflight_src[ckpt.name] = _source(ckpt)
        fut.add_done_callback(lambda f: self._q.put(("pushed", ckpt, (f, t0))))

    def _on_pushed(self, ckpt: LocalCheckpoint, info: tuple[Future[Any], float],
                   now: float) -> None:
        fut, t0 = info
        self._inflight.pop(ckpt.name, None)
        self._inflight_src.pop(ckpt.name, None)
        if fut.cancelled():
            return
        self._schedule(now)  # the source's next (newest) checkpoint may be waiting for this one
        exc = fut.exception()
        if exc is None:
            m = fut.result()
            self._remote[m.name] = m
            self._failed.pop(ckpt.name, None)
            self.events("info", "pushed", name=m.name, step=m.step, bytes=m.total_size,
                        seconds=round(now - t0, 3),
                        source=m.source.get("kind", "native"))
            self._retention_due = self.config.policy.active
            if ckpt.path.parent == self.spool.directory:
                self._prune_spool(m)
            self._write_status()
            return
        if self._abort.is_set():
            self.events("warning", "push_abandoned", name=ckpt.name,
                        detail="stopped before its commit: nothing partial is visible")
            self._clean_abandoned(ckpt.name)
            return
        if not (ckpt.path / MANIFEST_NAME).is_file():
            # Deleted by the trainer (its own retention) before or while it was uploaded: not
            # a failure, and nothing to retry. The push never committed it.
            self._failed.pop(ckpt.name, None)
            self._dropped[ckpt.name] = "gone"
            self.events("info", "push_dropped", name=ckpt.name, step=ckpt.step, reason="gone",
                        detail="deleted locally during its upload; nothing was committed")
            self._write_status()
            return
        prev = self._failed.get(ckpt.name)
        attempts = (prev.attempts if prev else 0) + 1
        # Any error, of any type, once running: report it, keep syncing the rest, retry with
        # back-off (a later scan or a fixed remote may succeed). Errors a retry is unlikely to
        # fix (access denied, a conflicting remote checkpoint) back off longer.
        retryable = not isinstance(exc, CkptSyncError) or (
            isinstance(exc, RemoteError) and exc.retryable)
        if self._drain and attempts >= 3:  # a drain gives this one up: clean up after it now
            self._clean_abandoned(ckpt.name)
        delay = _backoff(attempts, base=1.0, cap=120.0) if retryable \
            else _backoff(attempts, base=5.0, cap=600.0)
        error = f"{type(exc).__name__}: {exc}"
        self._failed[ckpt.name] = _Failure(error, attempts, now + delay, retryable)
        self._last_error = f"{ckpt.name}: {error}"
        self._any_failed_once = True
        self.events("warning" if retryable else "error", "push_failed", name=ckpt.name,
                    attempt=attempts, error=str(exc), error_type=type(exc).__name__,
                    retryable=retryable, retry_in_s=round(delay, 2))
        self._schedule(now + delay)
        self._write_status()

    def _clean_abandoned(self, name: str) -> None:
        """Remove what an abandoned push of ``name`` wrote (its files, its unfinished
        multipart uploads), now rather than at ``gc``'s grace period. Only names this daemon
        pushed, only while uncommitted (:meth:`RemoteStore.abandon` refuses a committed one).
        Best effort: what is left is still ``gc``'s."""
        try:
            removed = self.store.abandon(name)
        except CkptSyncError as e:
            self.events("warning", "cleanup_failed", name=name, error=str(e),
                        note="gc collects it after its grace period")
            return
        if removed:
            self.events("info", "cleaned_up", name=name, removed=removed)

    def _prune_spool(self, pushed: Manifest) -> None:
        """Keep the newest spooled version of a rule; older ones are superseded."""
        rule = pushed.source.get("rule")
        for c in self.spool.list():
            if (c.manifest.source.get("rule") == rule and c.name != pushed.name
                    and parse_name(c.name) is not None
                    and c.manifest.sort_key() < pushed.sort_key()
                    and c.name not in self._inflight):
                self.spool.delete(c.name)
                if self._failed.pop(c.name, None) is not None:
                    self._clean_abandoned(c.name)  # superseded: its failed attempts' leftovers

    # ------------------------------------------------------------------ zero-code versions
    def _warn_without_rules(self) -> None:
        """No rule and no native checkpoint, but files there: the trainer's own, which no
        rule syncs. Said once at start-up, and in the status while it holds."""
        if self.config.rules or self._local_names:
            return
        found: list[str] = []
        with contextlib.suppress(OSError), os.scandir(self.local.directory) as it:
            for entry in it:
                if not entry.name.startswith("."):
                    found.append(entry.name + ("/" if entry.is_dir() else ""))
        if not found:
            return
        found.sort(key=lambda n: (not n.endswith(_CKPT_SUFFIXES), n.endswith("/"), n))
        first = found[0]
        rule = (f"'dir:{re.sub(r'[0-9]+', '*', first.rstrip('/'))}:MARKER'"
                if first.endswith("/") else f"'file:{first}'")
        hint = (f"no watch rule: zero-code files are not synced ({len(found)} found here, e.g. "
                f"{', '.join(found[:3])}); add --rule {rule} (see ckptsync watch --help)")
        self._warnings.append(hint)
        self.events("warning", "no_rule", local=str(self.local.directory), hint=hint)
        self._write_status()

    def _take_versions(self, now: float) -> None:
        if self._stop.is_set():
            return
        wall = time.time()
        for tr in self._trackers:
            due = tr.due(now, wall, force=self._drain)
            if due is None:
                continue
            tr.begin(due, now)
            if due.forced:
                self.events("info", "version_forced", rule=tr.rule.spec, paths=due.rels,
                            max_wait_s=self.config.max_wait,
                            note="still changing: copied anyway, committed only if unchanged "
                                 "during the copy and complete")

            def job(tr: VersionTracker = tr, due: Due = due,
                    sig: Any = tr.last_signature) -> Snapshot:
                return snapshot_version(self.spool, self.local.directory, tr.rule, due.rels,
                                        last_signature=sig, guard=due.guard)

            fut = self._snap_pool.submit(job)
            fut.add_done_callback(self._snapshot_done(tr, due.rels, due.guard))

    def _snapshot_done(self, tr: VersionTracker, rels: list[str],
                       guard: list[str]) -> Callable[[Future[Snapshot]], None]:
        def done(f: Future[Snapshot]) -> None:
            self._q.put(("snapshot", tr, f, rels, guard, None))

        return done

    def _on_snapshot(self, tr: VersionTracker, fut: Future[Snapshot], rels: list[str],
                     guard: list[str], _unused: Any) -> None:
        tr.busy = False
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            delay = tr.failed(time.monotonic(), str(exc))
            give_up = self._drain and tr.gave_up
            self.events("error", "version_error", rule=tr.rule.spec, paths=rels, error=str(exc),
                        attempt=tr.failures,
                        **({"action": "giving up"} if give_up else
                           {"retry_in_s": round(delay, 2)}))
            self._write_status()
            return
        snap = fut.result()
        tr.record(snap, rels, guard)
        if snap.ckpt is None:
            level = "debug" if snap.skipped == "identical" else "warning"
            if level != "debug":
                self.events(level, "version_discarded", rule=tr.rule.spec, paths=rels,
                            reason=snap.skipped, detail=snap.detail,
                            note="never committed; the next version will be taken")
            self._write_status()
            return
        self.events("info", "version_taken", rule=tr.rule.spec, name=snap.ckpt.name,
                    step=snap.ckpt.step, paths=rels, bytes=snap.ckpt.manifest.total_size)
        self._schedule(time.monotonic())

    # ------------------------------------------------------------------ retention
    def _maybe_retention(self) -> None:
        if not self._retention_due or self._retention_running or self._stop.is_set():
            return
        self._retention_due = False
        self._retention_running = True
        protect = self._protected()
        policy = self.config.policy

        def job() -> list[str]:
            return self.store.apply_retention(policy, protect=protect)

        fut = self._pool.submit(job)
        self._retention_job = fut
        fut.add_done_callback(lambda f: self._q.put(("retention", f)))

    def _on_retention(self, fut: Future[list[str]]) -> None:
        self._retention_running = False
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            self.events("warning", "retention_failed", error=str(exc))
            return
        deleted = fut.result()
        for name in deleted:
            self._remote.pop(name, None)
            self.events("info", "retention_deleted", name=name)
        self._write_status()

    # ------------------------------------------------------------------ status / stop
    def _drained(self) -> bool:
        if self._inflight or any(t.busy or (t.retry_at is not None and not t.gave_up)
                                 for t in self._trackers):
            return False
        wall, now = time.time(), time.monotonic()
        if any(t.due(now, wall, force=True) is not None for t in self._trackers):
            return False
        if self._reconcile_at is not None and self._reconcile_at <= now:
            return False
        pending = [n for n in self._pending_names() if n not in self._failed]
        if pending:
            return False
        # With failures: --once gives up after a few attempts; a drain on parent exit as well.
        return all(f.attempts >= 3 for f in self._failed.values())

    def _pending_names(self) -> list[str]:
        return [n for n in self._local_names
                if n not in self._remote and n not in self._skipped]

    def _synced(self) -> list[str]:
        """The committed remote checkpoints of this directory: the local checkpoints the remote
        holds, and every zero-code version of our rules it holds (their spool copies go)."""
        local = set(self._local_names)
        rules = {t.rule.spec for t in self._trackers}
        ours = [m for m in self._remote.values()
                if m.name in local or (is_watched(m) and m.source.get("rule") in rules)]
        return [m.name for m in sorted(ours, key=lambda m: m.sort_key())]

    def _write_status(self) -> None:
        now = time.monotonic()
        wall = time.time()
        # Pending also counts a finished version not yet taken (say, a file that was there
        # before the daemon started): flush() must not return before it is committed.
        watch = [{"rule": t.rule.spec,
                  "pending": t.pending(now) or t.due(now, wall, force=True) is not None,
                  "error": t.error}
                 for t in self._trackers]
        pending = self._pending_names()
        settling = [w["rule"] for w in watch if w["pending"]]
        # In sync only when nothing at all is outstanding: a version being written or copied
        # has no name yet, but it is not synced either.
        in_sync = (self._last_reconcile is not None and not pending and not self._inflight
                   and not settling and not self._failed and self._fatal is None)
        st = {
            "pid": os.getpid(),
            "state": self._state,
            "local_dir": str(self.local.directory),
            "remote": self._redacted(),
            "started": self._started,
            "updated": _utc(),
            "updated_ts": time.time(),
            "last_reconcile": _utc(self._last_reconcile) if self._last_reconcile else None,
            "last_reconcile_ts": self._last_reconcile,
            "in_sync": in_sync,
            "synced": self._synced(),
            "pending": pending,
            "uploading": sorted(self._inflight),
            "settling": settling,
            "failed": [{"name": n, "error": f.error, "attempts": f.attempts,
                        "retryable": f.retryable}
                       for n, f in sorted(self._failed.items())],
            "skipped_by_retention": sorted(self._skipped),
            "watch": watch,
            "warnings": [] if self._local_names else list(self._warnings),
            "error": self._fatal,
            "last_error": self._last_error,
        }
        with contextlib.suppress(OSError):
            write_json_atomic(self.status_path, st)

    def _shutdown(self) -> None:
        """Stop every thread: snapshots finish, queued uploads are cancelled, in-flight ones
        get ``stop_timeout``, then are abandoned (never committed) and cleaned up."""
        self._state = "stopping"
        self._snap_pool.shutdown(wait=True, cancel_futures=True)
        # Queued pushes never started: cancel them, never wait on them (a cancelled future
        # that no worker picked up is never "done" to concurrent.futures.wait).
        self._pool.shutdown(wait=False, cancel_futures=True)
        running = {f for f in self._inflight.values() if not f.cancel() and not f.done()}
        if running:
            self.events("info", "stopping", uploading=sorted(
                n for n, f in self._inflight.items() if f in running),
                wait_s=self.config.stop_timeout)
            _, running = wait_futures(running, timeout=self.config.stop_timeout)
        self._abort.set()
        # The retention job too: a delete under way gets the same bound.
        job = self._retention_job
        pending = [*running, *([job] if job is not None and not job.cancelled() else [])]
        _, stuck = wait_futures(pending, timeout=_ABANDON_WAIT_S)
        if stuck:
            # A call to the remote that did not return: leave it behind (the process exits
            # without it); what it may still write is never committed (no manifest follows).
            self.abandoned_calls = True
            self.events("warning", "stop_abandoned_calls", count=len(stuck),
                        detail="a call to the remote did not return; exiting without it")
        else:
            self._pool.shutdown(wait=True)
        # Let completion messages land in the status (committed or abandoned).
        while True:
            try:
                it = self._q.get_nowait()
            except queue.Empty:
                break
            if it[0] == "pushed":
                self._on_pushed(it[1], it[2], time.monotonic())
            elif it[0] == "retention":
                self._on_retention(it[1])


def _backoff(attempt: int, base: float = 2.0, cap: float = 300.0) -> float:
    """Exponential back-off with full jitter."""
    return random.uniform(0.5, 1.0) * min(cap, base * 2 ** max(0, attempt - 1))


# --------------------------------------------------------------------------- process entry
def run_daemon(config: WatchConfig, *, store: RemoteStore | None = None) -> int:
    """Run the daemon in this process (the ``ckptsync watch`` command); return the exit code.

    Installs the structured log, takes the directory lock, handles SIGTERM/SIGINT (stop) and
    SIGUSR1 (reconcile now) on the main thread with ``sigwait`` (no handler runs inside a
    lock), and runs :class:`Watcher` on a dispatcher thread.
    """
    events = EventLog(fmt=config.log_format)
    if config.nice and hasattr(os, "nice"):
        # Uploads compete with training for the CPU (hashing, signing, TLS): let it win.
        events("info", "niceness", nice=os.nice(config.nice))
    from ckptsync.redact import SecretFilter, remember, secrets_of

    remember(secrets_of(config.storage_options, config.remote))
    bridge = _LogBridge(events)
    bridge.addFilter(SecretFilter())
    pkg = logging.getLogger("ckptsync")
    pkg.addHandler(bridge)
    if pkg.level == logging.NOTSET or pkg.level > logging.INFO:
        pkg.setLevel(logging.INFO)
    pkg.propagate = False
    logging.getLogger("watchdog").setLevel(logging.ERROR)
    try:
        config.local_dir.mkdir(parents=True, exist_ok=True)
        _watch_dir(config.local_dir).mkdir(exist_ok=True)
        lock = DirLock(config.local_dir)
    except (ConfigError, OSError) as e:
        events("error", "refused", error=str(e))
        return EXIT_CONFIG
    try:
        try:
            watcher = Watcher(config, store=store, events=events)
        except ConfigError as e:
            events("error", "refused", error=str(e))
            return EXIT_CONFIG
        except CkptSyncError as e:
            events("error", "fatal", error=str(e))
            return EXIT_REMOTE
        if threading.current_thread() is not threading.main_thread():
            return watcher.run()
        code = _run_with_signals(watcher, events)
    finally:
        lock.release()
        pkg.removeHandler(bridge)
    if watcher.abandoned_calls:
        # Interpreter exit would join the upload threads still blocked in a remote call
        # (concurrent.futures does), for as long as that call takes: leave without them.
        # Nothing they may still write is ever committed (no manifest follows a stop).
        with contextlib.suppress(Exception):
            sys.stderr.flush()
            sys.stdout.flush()
        os._exit(code)
    return code


def _run_with_signals(watcher: Watcher, events: EventLog) -> int:
    """Run ``watcher`` on a dispatcher thread; this (main) thread waits for signals.

    Returns the exit code once the dispatcher is done, or at the latest ``stop_timeout`` +
    :data:`STOP_GRACE_S` after the first SIGTERM/SIGINT (then the process must exit without
    joining the threads left behind: :func:`run_daemon` does).
    """
    sigs = {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)  # threads started now inherit it
    result: list[int] = []
    done = threading.Event()

    def target() -> None:
        try:
            result.append(watcher.run())
        except BaseException as e:
            events("error", "crashed", error=f"{type(e).__name__}: {e}")
            result.append(EXIT_FAILED)
        finally:
            # Set before the signal: the main thread reads the event, never is_alive(), so
            # the wake-up cannot be lost however the two threads interleave.
            done.set()
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGUSR2)

    t = threading.Thread(target=target, name="ckptsync-dispatch", daemon=True)
    t.start()
    deadline: float | None = None
    try:
        while not done.is_set():
            if deadline is None:
                sig: int | None = signal.sigwait(sigs)
            else:
                info = signal.sigtimedwait(sigs, max(0.0, deadline - time.monotonic()))
                sig = info.si_signo if info is not None else None
                if sig is None and not done.is_set():
                    watcher.abandoned_calls = True
                    events("warning", "stop_forced", waited_s=round(
                        watcher.config.stop_timeout + STOP_GRACE_S, 1),
                        detail="the daemon did not finish stopping in time; exiting anyway "
                               "(nothing partial is committed)")
                    return EXIT_OK
            if sig == signal.SIGUSR1:
                watcher.request_reconcile()
            elif sig in (signal.SIGTERM, signal.SIGINT):
                events("info", "signal", signal=signal.Signals(sig).name,
                       action="finishing in-flight uploads, then exiting")
                watcher.request_stop()
                if deadline is None:
                    deadline = time.monotonic() + watcher.config.stop_timeout + STOP_GRACE_S
        t.join()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return result[0] if result else EXIT_FAILED


def config_from_args(args: Any, env: Mapping[str, str] | None = None) -> WatchConfig:
    """Build a :class:`WatchConfig` from the ``watch`` subcommand's parsed arguments."""
    opts: dict[str, Any] = {}
    for i, text in enumerate(getattr(args, "storage_option", None) or [], 1):
        k, v = parse_storage_option(text, i)
        opts[k] = v
    return WatchConfig.resolve(
        {
            "local_dir": args.local_dir,
            "remote": args.remote,
            "config": args.config,
            "storage_options": opts or None,
            "keep_last": args.keep_last,
            "keep_best": args.keep_best,
            "keep_every": args.keep_every,
            "once": True if args.once else None,
            "interval": args.interval,
            "settle": args.settle,
            "max_wait": getattr(args, "max_wait", None),
            "rules": list(args.rule or []),
            "workers": args.workers,
            "parent_pid": args.parent_pid,
            "stop_timeout": args.stop_timeout,
            "log_format": args.log_format,
            "nice": getattr(args, "nice", None),
        },
        env,
    )
