"""``ckptsync wait DIR --timeout S``: block until everything local in DIR is committed
remotely, for the last cell of a notebook or the end of a job script.

"Committed remotely" is the watch daemon's word, made exact against the directory as it is
now: :func:`~ckptsync.daemon.runtime.daemon_status`, the comparison ``ckptsync status`` makes
(a checkpoint committed locally that the daemon has not acknowledged, seen or not, is
pending). While a daemon runs, ``wait`` asks it for a reconcile now (SIGUSR1) and waits for
one that started after the wait did, so a zero-code version written a moment ago is counted
too; once no daemon runs, nothing will change, and ``wait`` answers at once.
:meth:`~ckptsync.daemon.launcher.WatcherHandle.flush` is the same wait from Python, for the
daemon it started; :meth:`ckptsync.Checkpointer.wait` waits for a Checkpointer's own uploads.

On a remote that is a FUSE mount (Colab's Drive at ``/content/drive``: :mod:`ckptsync.mounts`)
committed means handed to the mount: ``wait`` then also flushes what the daemon wrote there
(``fsync`` of every file and directory, ``os.sync()``) and prints what to do before the
session ends (``drive.flush_and_unmount()``).

Exit codes (the one table, :mod:`ckptsync.exits`; the same as ``status``'s,
:func:`~ckptsync.daemon.statusview.outcome`): :data:`WAIT_OK` (0) every local checkpoint is
committed remotely; :data:`WAIT_PENDING` (1) some are still pending at the timeout (or no
daemon runs to upload them); :data:`WAIT_USAGE` (2) DIR is missing, or no daemon has ever run
there; :data:`WAIT_FAILED` (3) the last upload attempt failed and nothing newer succeeded.

Example::

    ckptsync wait checkpoints --timeout 600 && echo "all on the remote"
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ckptsync.daemon.runtime import daemon_status, read_status
from ckptsync.daemon.statusview import outcome
from ckptsync.exits import exit_help
from ckptsync.mounts import MountedRemote, flush_tree
from ckptsync.output import Output

__all__ = [
    "WAIT_FAILED",
    "WAIT_OK",
    "WAIT_PENDING",
    "WAIT_USAGE",
    "add_subcommand",
    "flush_mount",
    "outstanding",
    "run_wait",
    "wait_synced",
]

WAIT_OK, WAIT_PENDING, WAIT_USAGE, WAIT_FAILED = 0, 1, 2, 3

WAIT_HELP = "wait until every local checkpoint in a watched directory is committed remotely"
WAIT_EPILOG = """\
"committed remotely" is what `ckptsync status LOCAL_DIR` reports: the daemon's word, checked
against the checkpoints in the directory now. On a Drive (FUSE) mount, wait also flushes what
was written there and says what to run before the session ends.

"""


def outstanding(st: dict[str, Any]) -> str:
    """What is not committed remotely yet, in words."""
    parts = []
    for key, what in (("pending", "pending"), ("uploading", "uploading"),
                      ("settling", "being written or settling (zero-code)")):
        if st.get(key):
            parts.append(f"{what}: {', '.join(map(str, st[key]))}")
    if st.get("waiting_for_nodes"):
        parts.append(f"waiting for other nodes: {', '.join(st['waiting_for_nodes'])}")
    for f in st.get("failed", []):
        if isinstance(f, dict):
            parts.append(f"failed {f.get('name')} ({f.get('attempts')} attempts): "
                         f"{f.get('error')}")
    if st.get("error"):
        parts.append(f"the daemon stopped: {st['error']}")
    elif st.get("last_error") and not parts:
        parts.append(f"last error: {st['last_error']}")
    return "; ".join(parts) or "no reconcile reported yet"


def _ask_reconcile(st: dict[str, Any], d: Path) -> bool:
    """SIGUSR1 to the daemon that holds ``d``'s lock, once it has written its status (from
    then on it handles the signal; before, SIGUSR1's default action would end it). Never
    this process (a daemon run in-process reconciles on its own)."""
    pid = st.get("pid")
    own = read_status(d)
    if not st.get("running") or not isinstance(pid, int) or pid <= 0 or pid == os.getpid() \
            or own is None or own.get("pid") != pid:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGUSR1)
    return True


def wait_synced(local_dir: str | os.PathLike[str], timeout: float, *,
                poll_s: float = 0.2) -> tuple[int, dict[str, Any]]:
    """Block until everything local in ``local_dir`` is committed remotely, at most
    ``timeout`` seconds; return the exit code (:func:`outcome`, or :data:`WAIT_USAGE` when
    no daemon has run there) and the last status.

    Returns at once when no daemon runs (nothing will change).
    """
    d = Path(local_dir).expanduser().absolute()
    t0 = time.time()
    deadline = time.monotonic() + max(0.0, timeout)
    asked = False
    while True:
        st = daemon_status(d)
        running = bool(st.get("running"))
        if "state" not in st and not running:
            return WAIT_USAGE, st
        if running and not asked:
            asked = _ask_reconcile(st, d)
        fresh = not running or (st.get("last_reconcile_ts") or 0) >= t0
        if st.get("in_sync") and fresh:
            return WAIT_OK, st
        if not running or time.monotonic() >= deadline:
            return outcome(st), st
        time.sleep(poll_s)


def flush_mount(st: dict[str, Any]) -> tuple[MountedRemote | None, int]:
    """Where the daemon's remote is on a FUSE mount (its status says so): flush it
    (:func:`~ckptsync.mounts.flush_tree`); return the mount (else None) and how many files
    and directories were synced.

    Raises:
        OSError: a file or directory could not be synced.
    """
    raw = st.get("remote_mount")
    mount = MountedRemote.from_dict(raw) if isinstance(raw, dict) else None
    return mount, (flush_tree(mount.path) if mount is not None else 0)


def add_subcommand(subparsers: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Add ``wait`` to an ``argparse`` subparsers object (``parents``: the common flags)."""
    p = subparsers.add_parser("wait", help=WAIT_HELP, description=WAIT_HELP,
                              epilog=WAIT_EPILOG + exit_help("wait"),
                              parents=list(parents),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("local_dir", metavar="LOCAL_DIR", help="the directory a daemon watches")
    p.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                   help="give up (exit 1, or 3 after a failed upload) after this long "
                        "(default 600)")
    if not any(a.dest == "json" for a in p._actions):
        p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.set_defaults(func=run_wait, _run=run_wait)


def run_wait(args: argparse.Namespace) -> int:
    """The ``wait`` subcommand: wait, flush a mount, print the outcome; the exit code."""
    out = getattr(args, "output", None)
    if not isinstance(out, Output):
        out = Output("wait", bool(getattr(args, "json", False)))
    d = Path(args.local_dir).expanduser().absolute()
    if not d.is_dir():
        out.diagnostic(f"ckptsync wait: error: {d} does not exist or is not a directory; "
                       "give the directory the trainer writes and `ckptsync watch` watches")
        return WAIT_USAGE
    if args.timeout < 0:
        out.diagnostic("ckptsync wait: error: --timeout must be 0 or more seconds")
        return WAIT_USAGE
    start = time.monotonic()
    code, st = wait_synced(d, args.timeout)
    waited = time.monotonic() - start
    if code == WAIT_USAGE:
        out.diagnostic(f"ckptsync wait: error: no ckptsync watch daemon has run in {d}, so "
                       "nothing reports its uploads; start one (`ckptsync watch "
                       f"{d} REMOTE_URL`), or in the trainer call Checkpointer.wait() (a "
                       "Checkpointer with remote= uploads itself)")
        return code
    try:
        mount, synced = flush_mount(st)
    except OSError as e:  # loud, and not a success: the mount may not have it all
        out.diagnostic(f"ckptsync wait: error: flushing the remote's mount failed: {e}")
        mount, synced, code = None, 0, max(code, WAIT_PENDING)
    newest = st["synced"][-1] if st.get("synced") else None
    remote = st.get("remote")
    if code == WAIT_OK:
        text = (f"every local checkpoint in {d} is committed to {remote}"
                + (f" (newest {newest})" if newest else " (there are none)"))
    elif code == WAIT_FAILED:
        text = (f"the last upload to {remote} failed and nothing newer succeeded: "
                f"{outstanding(st)}")
    elif not st.get("running"):
        text = (f"not committed remotely, and no ckptsync watch is running in {d} to upload "
                f"it: {outstanding(st)}; start `ckptsync watch {d} {remote}` (or `ckptsync "
                f"push {d} {remote}`)")
    else:
        text = f"still not committed to {remote} after {waited:.0f}s: {outstanding(st)}"
    notes = [f"note: {mount.note}", mount.guidance, mount.advice] if mount is not None else []
    doc = {"exit_code": code, "waited_s": round(waited, 3), "local_dir": str(d),
           "remote": remote, "in_sync": bool(st.get("in_sync")), "newest_synced": newest,
           "pending": st.get("pending", []), "failed": st.get("failed", []),
           "running": bool(st.get("running")), "remote_mount": st.get("remote_mount"),
           "flushed": synced}
    if out.json_lines:
        out.document(doc, "")
    elif code == WAIT_OK:
        out.line(text)
    if code != WAIT_OK:
        out.diagnostic(f"ckptsync wait: {text}")
    for line in notes:
        out.line(line)
    return code
