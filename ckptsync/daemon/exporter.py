"""The daemon's HTTP endpoint: ``/metrics`` (Prometheus, through ``prometheus_client``) and
``/healthz`` (for a Kubernetes probe or a service check), both from a
:class:`~ckptsync.daemon.metrics.Monitor`.

Metrics (names prefixed ``ckptsync_``): ``checkpoints_committed_total``,
``uploaded_bytes_total``, ``upload_failures_total``, ``upload_retries_total``,
``lag_checkpoints``, ``lag_steps``, ``lag_seconds``, ``last_success_timestamp_seconds``,
``in_sync`` and ``up`` (1 while ``/healthz`` answers 200). Each scrape reads the daemon's status
afresh: nothing is cached between scrapes.

Example::

    server = serve(monitor, "127.0.0.1", 9108)   # curl 127.0.0.1:9108/healthz
    ...
    server.shutdown()
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from ckptsync.daemon.runtime import daemon_status
from ckptsync.errors import ConfigError
from ckptsync.output import Output

if TYPE_CHECKING:
    from ckptsync.daemon.metrics import Monitor

__all__ = ["MonitorCollector", "serve", "serving"]


class MonitorCollector:
    """A ``prometheus_client`` collector of one :class:`Monitor` (read at each scrape)."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from ckptsync.daemon.metrics import lag

        st = daemon_status(self.monitor.local_dir)
        snap = self.monitor.snapshot()
        behind = lag(st)
        labels = ["local_dir"]
        where = [str(self.monitor.local_dir)]

        def counter(name: str, doc: str, value: float) -> Any:
            m = CounterMetricFamily(f"ckptsync_{name}", doc, labels=labels)
            m.add_metric(where, value)
            return m

        def gauge(name: str, doc: str, value: float) -> Any:
            m = GaugeMetricFamily(f"ckptsync_{name}", doc, labels=labels)
            m.add_metric(where, value)
            return m

        yield counter("checkpoints_committed", "checkpoints this daemon committed remotely",
                      snap["committed"])
        yield counter("uploaded_bytes", "bytes of the checkpoints this daemon committed",
                      snap["bytes"])
        yield counter("upload_failures", "failed upload attempts", snap["failures"])
        yield counter("upload_retries", "upload attempts and requests retried",
                      snap["retries"])
        yield gauge("lag_checkpoints", "local checkpoints not committed remotely yet",
                    behind["checkpoints"])
        yield gauge("lag_steps", "newest local step minus newest step committed remotely",
                    behind["steps"])
        yield gauge("lag_seconds", "seconds since the oldest checkpoint not committed "
                    "remotely was saved", behind["seconds"])
        yield gauge("last_success_timestamp_seconds", "when the last checkpoint was "
                    "committed remotely (unix time; 0: none yet)", snap["last_success_ts"] or 0)
        yield gauge("in_sync", "1 when every local checkpoint is committed remotely",
                    1 if st.get("in_sync") else 0)
        yield gauge("up", "1 while the daemon is healthy (/healthz answers 200)",
                    1 if self.monitor.health(st)[0] else 0)


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every few seconds is not news


def _app(monitor: Monitor) -> Callable[..., Iterable[bytes]]:
    from prometheus_client import CollectorRegistry, make_wsgi_app

    registry = CollectorRegistry(auto_describe=False)
    registry.register(MonitorCollector(monitor))
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path in ("/healthz", "/health", "/livez", "/readyz"):
            ok, why = monitor.health()
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "text/plain; charset=utf-8")])
            return [f"{'ok' if ok else 'unhealthy'}: {why}\n".encode()]
        if path == "/metrics" or path == "/":
            return metrics(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: /metrics or /healthz\n"]

    return app


@contextlib.contextmanager
def serving(monitor: Monitor, addr: str, port: int | None) -> Iterator[WSGIServer | None]:
    """Within the block, with ``port``: ``/metrics`` and ``/healthz`` served (:func:`serve`);
    without one, nothing."""
    server = serve(monitor, addr, port) if port is not None else None
    try:
        yield server
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()


def serve(monitor: Monitor, addr: str, port: int) -> WSGIServer:
    """Serve ``/metrics`` and ``/healthz`` on ``addr:port`` from a daemon thread; returns the
    server (``shutdown()`` stops it). Port 0 takes a free port (``server.server_port``).

    Raises:
        ConfigError: the address cannot be bound (in use, not local), said with the fix.
    """
    try:
        server = make_server(addr, port, _app(monitor), handler_class=_Quiet)
    except OSError as e:
        raise ConfigError(f"cannot serve metrics on {addr}:{port}: {e.strerror or e}; choose "
                          "another --metrics-port (or --metrics-addr)") from e
    threading.Thread(target=server.serve_forever, name="ckptsync-metrics",
                     daemon=True).start()
    return server


def check(where: str, wait: float = 0.0) -> int:
    """Probe ``http://HOST:PORT/healthz`` until it answers 200 (exit 0) or ``wait`` seconds
    pass (exit 1, the last answer on stderr): the systemd unit's start check."""
    import time
    import urllib.error
    import urllib.request

    out = Output("healthz", json_lines=False)
    deadline = time.monotonic() + wait
    last = "no answer"
    while True:
        try:
            with urllib.request.urlopen(f"http://{where}/healthz", timeout=5) as r:
                out.line(r.read().decode().strip())
                return 0
        except urllib.error.HTTPError as e:
            last = f"{e.code}: {e.read().decode(errors='replace').strip()}"
        except OSError as e:
            last = str(e)
        if time.monotonic() >= deadline:
            out.diagnostic(f"ckptsync: {where}/healthz: {last}")
            return 1
        time.sleep(1)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(prog="python -m ckptsync.daemon.exporter",
                                description="probe a ckptsync watch daemon's /healthz")
    p.add_argument("--check", required=True, metavar="HOST:PORT")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="keep trying this long (default: once)")
    a = p.parse_args()
    raise SystemExit(check(a.check, a.wait))
