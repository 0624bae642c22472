"""What an operator watches: the daemon's counters, its lag, Prometheus metrics, a health
endpoint, and alert commands.

:class:`Monitor` listens to the daemon's event log (:meth:`ckptsync.output.EventLog.listen`):
it counts committed checkpoints, bytes, failed attempts and retries, follows the uploads in
flight (bytes sent, MB/s), and every second writes what it knows to
``LOCAL_DIR/.ckptsync-watch/monitor.json`` (read by ``ckptsync status``, whose ``--follow``
view shows it). It also:

- serves ``/metrics`` (Prometheus text, through ``prometheus_client``) and ``/healthz`` (200
  while the daemon is running and its status is fresh, else 503: a Kubernetes probe, the
  systemd unit's check) on ``--metrics-addr`` (127.0.0.1 by default) ``--metrics-port``;
- runs ``--on-failure CMD`` when a checkpoint's upload fails (once per failing checkpoint,
  again only after it or a newer one succeeded) and ``--on-lag N CMD`` when N or more local
  checkpoints are not committed remotely (again only once the lag fell below N), each with
  the event as one JSON object on its stdin, through ``sh -c``, never blocking the daemon.

:func:`lag` is the one definition of lag (checkpoints, steps, seconds) the metrics, the
alerts and ``status`` use.

Example::

    monitor = Monitor(Path("checkpoints"), hooks=Hooks(on_failure="notify-me"))
    events = EventLog()
    events.listen(monitor.on_event)
    with monitor.running(), serving(monitor, "127.0.0.1", 9108):   # daemon/exporter.py
        run_daemon(config, events=events)
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptsync.daemon.runtime import daemon_status, watch_dir
from ckptsync.local import write_json_atomic
from ckptsync.manifest import parse_name

__all__ = ["MONITOR_NAME", "Hooks", "Monitor", "lag", "read_monitor"]

log = logging.getLogger("ckptsync.watch")

MONITOR_NAME = "monitor.json"
#: How often the monitor file is written and the lag alert checked, in seconds.
TICK_S = 1.0
#: A hook command that runs longer than this is killed (it must not pile up).
HOOK_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Hooks:
    """Alert commands (``sh -c``), each given the event as JSON on stdin.

    Attributes:
        on_failure: run when a checkpoint's upload fails.
        on_lag: run when ``lag_threshold`` or more checkpoints are not committed remotely.
        lag_threshold: the ``N`` of ``--on-lag N CMD``.
    """

    on_failure: str | None = None
    on_lag: str | None = None
    lag_threshold: int | None = None


def _stamp_time(name: str) -> float | None:
    """The creation time a checkpoint name carries (``...-20260101T120000123456Z-...``)."""
    parsed = parse_name(name)
    if parsed is None:
        return None
    stamp = parsed[1]
    with contextlib.suppress(ValueError):
        from datetime import datetime, timezone

        return datetime.strptime(stamp[:15], "%Y%m%dT%H%M%S").replace(
            tzinfo=timezone.utc).timestamp()
    return None


def lag(st: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """How far the remote is behind the local directory, from a :func:`daemon_status`:
    ``checkpoints`` not committed remotely, ``steps`` (newest local step minus newest synced
    step), ``seconds`` (since the oldest one not committed was saved)."""
    now = time.time() if now is None else now
    waiting = list(st.get("pending") or []) + [
        f["name"] for f in st.get("failed") or [] if isinstance(f, dict)
        and f.get("name") not in (st.get("pending") or [])]
    steps_of = [(parse_name(n) or (None, ""))[0] for n in waiting]
    synced = [(parse_name(n) or (None, ""))[0] for n in st.get("synced") or []]
    newest_local = max([s for s in steps_of + synced if s is not None], default=None)
    newest_synced = max([s for s in synced if s is not None], default=None)
    steps = 0 if not waiting or newest_local is None else \
        newest_local - (newest_synced if newest_synced is not None else 0)
    saved = [t for t in map(_stamp_time, waiting) if t is not None]
    return {"checkpoints": len(waiting) + len(st.get("settling") or []),
            "steps": max(steps, 0),
            "seconds": round(max(0.0, now - min(saved)), 1) if saved else 0.0}


def read_monitor(local_dir: str | Path) -> dict[str, Any]:
    """What the daemon's monitor last wrote for ``local_dir`` ({} if nothing)."""
    path = watch_dir(Path(local_dir).expanduser().absolute()) / MONITOR_NAME
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class Monitor:
    """Counts, lag, metrics, health and alerts of one daemon (see the module doc).

    Args:
        local_dir: the watched directory (its status file is the daemon's state).
        hooks: the alert commands.
        interval: the daemon's reconcile interval: a status older than a few of them (or
            30 s) makes ``/healthz`` answer 503.
    """

    def __init__(self, local_dir: Path, hooks: Hooks | None = None,
                 interval: float = 5.0) -> None:
        self.local_dir = Path(local_dir).expanduser().absolute()
        self.hooks = hooks or Hooks()
        self.stale_s = max(30.0, 4 * interval)
        self._lock = threading.Lock()
        self.counters = {"committed": 0, "bytes": 0, "failures": 0, "retries": 0}
        self.last_success: float | None = None
        self.last_failure: dict[str, Any] | None = None
        self.in_flight: dict[str, dict[str, Any]] = {}
        self.last_rate: float | None = None  # MB/s of the last finished upload
        self._alerted: set[str] = set()  # checkpoints on-failure already ran for
        self._lag_alerted = False
        self._stop = threading.Event()
        self._hook_lock = threading.Lock()

    # ------------------------------------------------------------------ events
    def on_event(self, level: str, event: str, fields: dict[str, Any]) -> None:
        """The event log's listener: update the counters (quick; any thread)."""
        now = time.time()
        name = str(fields.get("name", ""))
        fire = False
        with self._lock:
            if event == "push_start":
                self.in_flight[name] = {"name": name, "step": fields.get("step"),
                                        "total": int(fields.get("bytes") or 0), "sent": 0,
                                        "started": now}
            elif event == "upload_progress":
                up = self.in_flight.get(name)
                if up is not None:
                    up["sent"] = max(0, up["sent"] + int(fields.get("bytes") or 0))
            elif event == "pushed":
                self.in_flight.pop(name, None)
                size, seconds = int(fields.get("bytes") or 0), float(fields.get("seconds") or 0)
                self.counters["committed"] += 1
                self.counters["bytes"] += size
                self.last_success = now
                if seconds > 0:
                    self.last_rate = round(size / seconds / 1e6, 2)
                self._alerted.clear()  # a success: the next failure alerts again
            elif event == "push_failed":
                self.in_flight.pop(name, None)
                self.counters["failures"] += 1
                if fields.get("retry_in_s") is not None:
                    self.counters["retries"] += 1
                self.last_failure = {"name": name, "error": fields.get("error"), "ts": now,
                                     "next_retry": now + float(fields.get("retry_in_s") or 0)
                                     if fields.get("retry_in_s") is not None else None,
                                     "attempt": fields.get("attempt")}
                fire = self.hooks.on_failure is not None and name not in self._alerted
                self._alerted.add(name)
            elif event in ("push_abandoned", "push_dropped"):
                self.in_flight.pop(name, None)
            elif event == "log" and "retrying" in str(fields.get("msg", "")):
                self.counters["retries"] += 1
        if fire:
            self._run_hook(self.hooks.on_failure, {"event": "upload_failed", **fields})

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """What the monitor knows now (what ``monitor.json`` holds)."""
        now = time.time() if now is None else now
        with self._lock:
            flight = []
            for up in self.in_flight.values():
                took = max(now - up["started"], 1e-6)
                flight.append({**up, "mb_s": round(up["sent"] / took / 1e6, 2),
                               "seconds": round(took, 1)})
            return {"updated_ts": now, **self.counters, "last_success_ts": self.last_success,
                    "last_failure": self.last_failure, "uploading": flight,
                    "last_upload_mb_s": self.last_rate}

    # ------------------------------------------------------------------ alerts
    def _run_hook(self, command: str | None, event: dict[str, Any]) -> None:
        if command is None:
            return
        payload = json.dumps({"local_dir": str(self.local_dir), "ts": time.time(), **event},
                             default=str)

        def run() -> None:
            with self._hook_lock:  # one at a time: alerts never pile up
                try:
                    subprocess.run(["sh", "-c", command], input=payload, text=True,
                                   timeout=HOOK_TIMEOUT_S, check=False)
                except (OSError, subprocess.SubprocessError) as e:
                    log.error("alert command %r failed: %s", command, e)

        threading.Thread(target=run, name="ckptsync-alert", daemon=True).start()

    def check_lag(self, st: dict[str, Any]) -> None:
        """Run ``--on-lag`` when the lag reaches its threshold (once until it falls below)."""
        n = self.hooks.lag_threshold
        if self.hooks.on_lag is None or n is None:
            return
        behind = lag(st)
        if behind["checkpoints"] >= n and not self._lag_alerted:
            self._lag_alerted = True
            self._run_hook(self.hooks.on_lag, {"event": "lag", "threshold": n,
                                               "lag": behind, "pending": st.get("pending")})
        elif behind["checkpoints"] < n:
            self._lag_alerted = False

    # ------------------------------------------------------------------ health
    def health(self, st: dict[str, Any] | None = None) -> tuple[bool, str]:
        """``(healthy, why)``: the daemon runs, its state is not failed, and its status was
        written within :attr:`stale_s` seconds."""
        st = daemon_status(self.local_dir) if st is None else st
        state = st.get("state")
        age = time.time() - float(st.get("updated_ts") or 0)
        if state in ("failed", "stopped") or st.get("error"):
            return False, f"daemon {state}: {st.get('error') or 'not running'}"
        if state is None:
            return False, "the daemon has not written its status yet"
        if age > self.stale_s:
            return False, f"the daemon's status is {age:.0f} s old (stuck?)"
        return True, f"daemon {state}"

    # ------------------------------------------------------------------ running
    def _tick(self) -> None:
        st = daemon_status(self.local_dir)
        with contextlib.suppress(OSError):
            write_json_atomic(watch_dir(self.local_dir) / MONITOR_NAME,
                              {**self.snapshot(), "lag": lag(st)}, durable=False)
        self.check_lag(st)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Within the block: the monitor file and the lag alert every :data:`TICK_S`
        seconds (the metrics and health endpoint: :func:`ckptsync.daemon.exporter.serving`)."""

        def loop() -> None:
            while not self._stop.wait(TICK_S):
                try:
                    self._tick()
                except Exception as e:  # reported, never the daemon's end
                    log.warning("monitor: %s: %s", type(e).__name__, e)

        t = threading.Thread(target=loop, name="ckptsync-monitor", daemon=True)
        t.start()
        try:
            yield
        finally:
            self._stop.set()
            t.join(timeout=5)
            with contextlib.suppress(Exception):
                self._tick()  # the last word: what the daemon left
