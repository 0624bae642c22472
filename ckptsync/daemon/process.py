"""The daemon as a process: :func:`run_daemon` (what ``ckptsync watch`` runs) and its signals.

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
supervisor may restart on 3 (the bucket or the credentials may be fixed meanwhile), not on 2;
130 ``--once`` stopped by SIGTERM/SIGINT before everything was committed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING

from ckptsync.daemon.config import WatchConfig
from ckptsync.daemon.runtime import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_REMOTE,
    DirLock,
    watch_dir,
)
from ckptsync.daemon.watcher import Watcher
from ckptsync.errors import CkptSyncError, ConfigError
from ckptsync.output import EventLog, LogBridge
from ckptsync.redact import SecretFilter, remember, secrets_of

if TYPE_CHECKING:
    from ckptsync.remote import RemoteStore

__all__ = ["STOP_GRACE_S", "run_daemon"]

#: Seconds a SIGTERM may take beyond ``stop_timeout``: abandoned pushes noticing their stop,
#: the removal of what they wrote, the last status. Past it the process exits regardless.
STOP_GRACE_S = 15.0


class _WatchdogStopRace(logging.Filter):
    """Drops the ERROR watchdog 7 logs when its own observer stop races its inotify reader
    thread (``watchdog/observers/inotify.py``: ``queue_events() called when the thread is
    inactive``): the daemon stopped the observer itself, nothing is lost or wrong."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in record.getMessage()


class _WatchdogRewatch(logging.Filter):
    """Drops watchdog 7's ``RuntimeWarning`` (``inotify_c.py``: ``Callback with id ... already
    exists for watch ... It will be Overwritten``): a directory created inside the watched
    tree (the spool's stagings are) can be registered twice in one instant, by the walk of its
    parent and by its own create event; the second registration replaces the callback with
    itself, nothing is lost. Its text is a 2 KiB repr of watchdog's internals."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "already exists for watch" not in record.getMessage()


def run_daemon(config: WatchConfig, *, store: RemoteStore | None = None,
               events: EventLog | None = None) -> int:
    """Run the daemon in this process (the ``ckptsync watch`` command); return the exit code.

    Installs the structured log, takes the directory lock, handles SIGTERM/SIGINT (stop) and
    SIGUSR1 (reconcile now) on the main thread with ``sigwait`` (no handler runs inside a
    lock), and runs :class:`Watcher` on a dispatcher thread. ``events``: the event log
    (default: one on stderr in ``config.log_format``), for a caller that listens to it
    (``watch --metrics-port``).
    """
    events = events or EventLog(fmt=config.log_format)
    if config.nice and hasattr(os, "nice"):
        # Uploads compete with training for the CPU (hashing, signing, TLS): let it win.
        events("info", "niceness", nice=os.nice(config.nice))
    remember(secrets_of(config.storage_options, config.remote))
    bridge = LogBridge(events)
    bridge.addFilter(SecretFilter())
    pkg = logging.getLogger("ckptsync")
    pkg.addHandler(bridge)
    if pkg.level == logging.NOTSET or pkg.level > logging.INFO:
        pkg.setLevel(logging.INFO)
    pkg.propagate = False
    logging.getLogger("watchdog").setLevel(logging.ERROR)
    logging.getLogger("watchdog.observers.inotify").addFilter(_WatchdogStopRace())
    if threading.current_thread() is threading.main_thread():
        # The ``ckptsync watch`` process: what other libraries log (botocore, gcsfs,
        # watchdog) goes through the event log too, so that every stderr line has one format
        # (with --json, one JSON object per line, as a reader of them expects).
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.addHandler(bridge)
        # Python warnings too: printed raw they would be lines in no format at all.
        logging.captureWarnings(True)
        logging.getLogger("py.warnings").addFilter(_WatchdogRewatch())
    try:
        config.local_dir.mkdir(parents=True, exist_ok=True)
        watch_dir(config.local_dir).mkdir(exist_ok=True)
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
                    return EXIT_INTERRUPTED if watcher.config.once else EXIT_OK
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

