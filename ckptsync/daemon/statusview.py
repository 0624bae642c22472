"""``ckptsync status``: its exit code (a script's gate) and its live view (``--follow``).

Exit codes (the one table, :mod:`ckptsync.exits`): 0 every local checkpoint is committed
remotely; 1 some are pending; 3 the last upload attempt failed and nothing newer succeeded (or
the daemon stopped on an error); 2 the directory is missing or no daemon ever ran there. The
same as ``ckptsync wait``'s.

``--follow`` redraws one screen every second with rich's ``Live`` (no hand-written terminal
control): the daemon, the lag in checkpoints, steps and seconds, each upload in flight with its
MB/s, the last error and when the next retry is due. It reads what the daemon writes
(``status.json``, and the monitor's ``monitor.json``: :mod:`ckptsync.daemon.metrics`), so it
works from any shell on the machine.

Example::

    ckptsync status checkpoints && echo "all on the remote"
    ckptsync status checkpoints --follow
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ckptsync.daemon.metrics import lag, read_monitor
from ckptsync.daemon.runtime import daemon_status
from ckptsync.manifest import name_sort_key, parse_name
from ckptsync.output import human_size

__all__ = ["STATUS_FAILED", "STATUS_OK", "STATUS_PENDING", "STATUS_USAGE", "follow",
           "outcome", "render"]

STATUS_OK, STATUS_PENDING, STATUS_USAGE, STATUS_FAILED = 0, 1, 2, 3


def outcome(st: dict[str, Any]) -> int:
    """The exit code of a :func:`daemon_status`: 0 in sync; 3 when the newest failed
    checkpoint is newer than every one synced (or the daemon stopped on an error); 2 when no
    daemon ever ran; else 1 (pending). (``ckptsync wait`` answers the same way.)"""
    if "state" not in st:
        return STATUS_USAGE
    if st.get("in_sync"):
        return STATUS_OK
    if st.get("error"):
        return STATUS_FAILED
    failed = [f["name"] for f in st.get("failed", []) if isinstance(f, dict) and f.get("name")]
    if failed:
        newest = max(name_sort_key(n) for n in failed)
        if not any(name_sort_key(n) > newest for n in st.get("synced", [])):
            return STATUS_FAILED
    return STATUS_PENDING


def _step(name: str) -> str:
    parsed = parse_name(name)
    return f"step {parsed[0]}" if parsed and parsed[0] is not None else name


def _ago(ts: float | None, now: float) -> str:
    if not ts:
        return "never"
    s = max(0.0, now - ts)
    return f"{s:.0f} s ago" if s < 120 else f"{s / 60:.0f} min ago" if s < 7200 \
        else f"{s / 3600:.1f} h ago"


def render(st: dict[str, Any], mon: dict[str, Any], now: float | None = None) -> Any:
    """One screen of status as a rich renderable (a table)."""
    from rich.table import Table

    now = time.time() if now is None else now
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold")
    t.add_column()
    running = (f"[green]running[/] (pid {st.get('pid')})" if st.get("running")
               else f"[red]not running[/] (last state: {st.get('state')})")
    t.add_row("directory", str(st.get("local_dir")))
    t.add_row("remote", str(st.get("remote")))
    t.add_row("daemon", running)
    behind = lag(st, now)
    code = outcome(st)
    state = {STATUS_OK: "[green]in sync[/]", STATUS_PENDING: "[yellow]pending[/]",
             STATUS_FAILED: "[red]last attempt failed[/]"}.get(code, "unknown")
    t.add_row("sync", f"{state}: {len(st.get('synced') or [])} committed, "
              f"{behind['checkpoints']} not yet")
    t.add_row("lag", f"{behind['checkpoints']} checkpoints, {behind['steps']} steps, "
              f"{behind['seconds']:.0f} s")
    for up in mon.get("uploading") or []:
        t.add_row("uploading", f"{_step(up['name'])}: {human_size(up['sent'])} of "
                  f"{human_size(up['total'])}, {up['mb_s']:.1f} MB/s, {up['seconds']:.0f} s")
    if not mon.get("uploading"):
        rate = mon.get("last_upload_mb_s")
        t.add_row("uploading", "nothing" + (f" (last upload {rate:.1f} MB/s)" if rate else ""))
    t.add_row("last success", _ago(mon.get("last_success_ts"), now))
    failure = mon.get("last_failure") or {}
    error = st.get("error") or failure.get("error") or st.get("last_error")
    t.add_row("last error", f"[red]{error}[/]" if error else "none")
    retry = failure.get("next_retry")
    if st.get("failed"):
        t.add_row("next retry", f"in {max(0.0, retry - now):.0f} s ({_step(failure['name'])})"
                  if retry else "at the next reconcile")
    return t


def follow(local_dir: str | Path, *, console: Any = None, interval: float = 1.0,
           iterations: int | None = None) -> int:
    """Redraw :func:`render` every ``interval`` seconds until interrupted (or for
    ``iterations`` frames); return the exit code of the last status."""
    from rich.live import Live

    st = daemon_status(local_dir)
    with Live(render(st, read_monitor(local_dir)), console=console, auto_refresh=False,
              transient=False) as live:
        n = 0
        while iterations is None or n < iterations:
            st = daemon_status(local_dir)
            live.update(render(st, read_monitor(local_dir)), refresh=True)
            n += 1
            if iterations is None or n < iterations:
                time.sleep(interval)
    return outcome(st)
