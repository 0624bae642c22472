"""The watch daemon on a thread of this process, as ``ckptsync watch`` runs it: its remote can
be a fault seam (a ``RemoteStore`` over ``FaultFS``), its spool a ``FaultOps``, and its JSON
event log is kept, each event with its arrival time.

``daemons`` (tests/conftest.py) stops every daemon a test started::

    d = InProcessDaemon(local, store=store, interval=0.5)
    daemons.append(d)
    wait_for(lambda: d.events("pushed"), "the first push")
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import IO, Any, cast

from ckptsync.daemon import EventLog, WatchConfig, Watcher, daemon_status
from ckptsync.local import FileOps
from ckptsync.remote import RemoteStore
from ckptsync.zerocode import WatchRule
from tests.support.watchkit import wait_for


class EventLines:
    """A stream for :class:`EventLog` (JSON lines) that keeps each event with its arrival
    time, readable while the daemon runs."""

    def __init__(self) -> None:
        self._events: list[tuple[float, dict[str, Any]]] = []
        self._lock = threading.Lock()

    def write(self, line: str) -> int:
        if line.strip():
            with self._lock:
                self._events.append((time.monotonic(), json.loads(line)))
        return len(line)

    def flush(self) -> None:
        pass

    def timed(self, name: str | None = None) -> list[tuple[float, dict[str, Any]]]:
        """``(arrival time, event)`` of every event named ``name`` (None: every event)."""
        with self._lock:
            return [(t, e) for t, e in self._events if name is None or e["event"] == name]

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        return [e for _, e in self.timed(name)]


class InProcessDaemon:
    """A :class:`Watcher` of ``local`` running on a thread; :meth:`stop` returns its exit code.

    Args:
        local: the watched directory.
        url: the remote URL (when no ``store`` is given).
        store: the remote store (a fault seam); its URL is the config's remote.
        rules: zero-code watch rules (``"file:ckpt.pt"``, ...).
        spool_ops: file system calls into the spool (a fault seam).
        wait_running: return only once the daemon's status says it is running.
        settings: any other :class:`WatchConfig` field (``interval``, ``settle``, ...).
    """

    def __init__(self, local: Path, url: str | None = None, *, store: RemoteStore | None = None,
                 rules: tuple[str, ...] | list[str] = (), spool_ops: FileOps | None = None,
                 wait_running: bool = False, **settings: Any) -> None:
        remote = store.url if store is not None else url
        assert remote is not None, "give the daemon a url or a store"
        self.local = local
        self.log = EventLines()
        config = WatchConfig(local_dir=local, remote=remote,
                             rules=tuple(WatchRule.parse(r) for r in rules), **settings)
        self.watcher = Watcher(config, store=store,
                               events=EventLog(cast(IO[str], self.log), fmt="json"),
                               spool_ops=spool_ops)
        self.code: int | None = None
        self.thread = threading.Thread(target=self._run, name="test-daemon")
        self.thread.start()
        if wait_running:
            wait_for(lambda: daemon_status(local).get("state") == "running"
                     or self.code is not None, "the daemon to start")

    def _run(self) -> None:
        self.code = self.watcher.run()

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The events logged so far named ``name`` (None: all of them)."""
        return self.log.events(name)

    def alive(self) -> bool:
        return self.thread.is_alive()

    def status(self) -> dict[str, Any]:
        return daemon_status(self.local)

    def stop(self) -> int | None:
        """Stop the daemon (as SIGTERM does) and return its exit code."""
        self.watcher.request_stop()
        self.thread.join(60)
        assert not self.thread.is_alive(), "the daemon did not stop"
        return self.code
