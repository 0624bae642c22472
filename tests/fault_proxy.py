"""A fault seam on the wire: an HTTP/1.1 proxy on 127.0.0.1 that cuts chosen responses.

Put it in front of a real server (SeaweedFS, moto, fake-gcs) and point the client's endpoint at
it; every request and response is relayed byte for byte, except that a :class:`Fault` cuts the
response to the Nth matching request after part of its body (a connection reset or a plain
close), as a flaky network does::

    with FaultProxy("127.0.0.1", 8333, plan=[Fault(nth=2, ranged=True)]) as proxy:
        opts = {..., "client_kwargs": {"endpoint_url": proxy.endpoint}}
        ...                                  # the second ranged GET is reset mid-body
    assert proxy.fired == ["GET /bucket/run/... (ranged): reset after 2621440 bytes"]

Each fault fires once. The proxy answers ``Expect: 100-continue`` itself (and does not pass it
on), so uploads through it are not delayed. Bounded: at most ``max_connections`` client
connections at once, every socket has a timeout, and the proxy stops by itself after
``lifetime`` seconds; leaving the ``with`` block stops it and joins its threads.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

THREAD_PREFIX = "faultproxy"
_HEAD_LIMIT = 64 * 1024


@dataclass
class Fault:
    """Cut the response to the ``nth`` request that matches.

    Attributes:
        method: the HTTP method to match.
        nth: which matching request (1 = the first).
        path_contains: only requests whose target contains this.
        ranged: True: only requests with a ``Range`` header; False: only without; None: any.
        after: body bytes relayed before the cut (None: half the body, at least one byte).
        how: ``"reset"`` (TCP RST, as a dropped connection) or ``"close"`` (a clean FIN, a
            truncated body).
    """

    method: str = "GET"
    nth: int = 1
    path_contains: str = ""
    ranged: bool | None = None
    after: int | None = None
    how: Literal["reset", "close"] = "reset"
    seen: int = field(default=0, init=False)
    done: bool = field(default=False, init=False)

    def matches(self, method: str, target: str, headers: dict[str, str]) -> bool:
        if self.done or method != self.method or self.path_contains not in target:
            return False
        return self.ranged is None or self.ranged == ("range" in headers)


class _Cut(Exception):
    """Raised inside a relay when a fault's byte budget is spent."""


class _Reader:
    """Buffered reads from a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _more(self) -> bool:
        data = self.sock.recv(256 * 1024)
        if not data:
            return False
        self.buf += data
        return True

    def head(self) -> bytes | None:
        """Bytes up to and including the blank line after the headers; None at a clean EOF."""
        while b"\r\n\r\n" not in self.buf:
            if len(self.buf) > _HEAD_LIMIT:
                raise ValueError("HTTP head too large")
            if not self._more():
                if self.buf:
                    raise ConnectionError("connection closed inside an HTTP head")
                return None
        end = self.buf.index(b"\r\n\r\n") + 4
        out, self.buf = self.buf[:end], self.buf[end:]
        return out

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._more():
                raise ConnectionError("connection closed inside a chunked body")
        end = self.buf.index(b"\r\n") + 2
        out, self.buf = self.buf[:end], self.buf[end:]
        return out

    def relay(self, n: int, send: Callable[[bytes], None]) -> None:
        """Relay exactly ``n`` bytes."""
        while n > 0:
            if not self.buf and not self._more():
                raise ConnectionError("connection closed inside a body")
            piece, self.buf = self.buf[:n], self.buf[n:]
            send(piece)
            n -= len(piece)

    def relay_to_eof(self, send: Callable[[bytes], None]) -> None:
        while True:
            if self.buf:
                piece, self.buf = self.buf, b""
                send(piece)
            if not self._more():
                return


def _parse(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for ln in lines[1:]:
        if ":" in ln:
            k, _, v = ln.partition(":")
            headers[k.strip().lower()] = v.strip()
    return lines[0], headers


def _relay_body(src: _Reader, headers: dict[str, str], send: Callable[[bytes], None],
                *, to_eof: bool) -> None:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = src.line()
            send(size_line)
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (trailer := src.line()) != b"\r\n":
                    send(trailer)
                send(b"\r\n")
                return
            src.relay(size + 2, send)
    elif "content-length" in headers:
        src.relay(int(headers["content-length"]), send)
    elif to_eof:
        src.relay_to_eof(send)


class FaultProxy:
    """An HTTP/1.1 proxy on 127.0.0.1 in front of ``upstream_host:upstream_port``.

    Args:
        upstream_host, upstream_port: the real server.
        plan: the faults to inject (each fires once).
        lifetime: seconds after which the proxy stops by itself.
        max_connections: client connections served at once (more wait in the backlog).
        timeout: seconds any socket may stay silent before its connection is dropped.

    Attributes:
        endpoint: ``http://127.0.0.1:<port>``, the URL to give the client.
        fired: one line per fault that fired (method, target, bytes relayed before the cut).
        requests: ``(method, target)`` of every request relayed, in order.
    """

    def __init__(self, upstream_host: str, upstream_port: int, *,
                 plan: Sequence[Fault] = (), lifetime: float = 300.0,
                 max_connections: int = 64, timeout: float = 30.0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.plan = list(plan)
        self.lifetime = lifetime
        self.timeout = timeout
        self.fired: list[str] = []
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_connections)
        self._stop = threading.Event()
        self._socks: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._acceptor = threading.Thread(target=self._accept, name=f"{THREAD_PREFIX}-accept",
                                          daemon=True)

    def __enter__(self) -> FaultProxy:
        self._acceptor.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop accepting, drop every open connection and join every thread."""
        self._stop.set()
        if self._acceptor.is_alive():
            self._acceptor.join()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for t in list(self._threads):
            t.join()
        self._listener.close()

    # ------------------------------------------------------------------ internals

    def _accept(self) -> None:
        deadline = time.monotonic() + self.lifetime
        while not self._stop.is_set() and time.monotonic() < deadline:
            if not self._slots.acquire(timeout=0.2):
                continue
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                self._slots.release()
                continue
            t = threading.Thread(target=self._serve, args=(client,),
                                 name=f"{THREAD_PREFIX}-conn", daemon=True)
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()
        self._stop.set()

    def _track(self, s: socket.socket) -> socket.socket:
        s.settimeout(self.timeout)
        with self._lock:
            self._socks.add(s)
        return s

    def _close(self, s: socket.socket, *, reset: bool = False) -> None:
        with self._lock:
            self._socks.discard(s)
        if reset:
            # Linger 0: close() sends RST, as a dropped connection does.
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            s.close()

    def _pick(self, method: str, target: str, headers: dict[str, str]) -> Fault | None:
        with self._lock:
            self.requests.append((method, target))
            for f in self.plan:
                if f.matches(method, target, headers):
                    f.seen += 1
                    if f.seen == f.nth:
                        f.done = True
                        return f
        return None

    def _serve(self, client_sock: socket.socket) -> None:
        client = self._track(client_sock)
        upstream: socket.socket | None = None
        reset = False
        try:
            upstream = self._track(socket.create_connection(self.upstream, timeout=self.timeout))
            creader, ureader = _Reader(client), _Reader(upstream)
            while not self._stop.is_set():
                head = creader.head()
                if head is None:
                    return
                request_line, headers = _parse(head)
                method, target = [*request_line.split(" "), "", ""][:2]
                if headers.get("expect", "").lower() == "100-continue":
                    client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                    head = b"\r\n".join(ln for ln in head.split(b"\r\n")
                                        if not ln.lower().startswith(b"expect:"))
                upstream.sendall(head)
                _relay_body(creader, headers, upstream.sendall, to_eof=False)
                fault = self._pick(method, target, headers)
                while True:
                    rhead = ureader.head()
                    if rhead is None:
                        return
                    status_line, rheaders = _parse(rhead)
                    status = int(status_line.split(" ")[1])
                    if status >= 200:
                        break  # 1xx interim answers: the client already got its 100 Continue
                client.sendall(rhead)
                if method == "HEAD" or status in (204, 304):
                    continue
                send = client.sendall
                if fault is not None:
                    size = int(rheaders.get("content-length", "0") or 0)
                    budget = fault.after if fault.after is not None else max(1, size // 2)
                    send = self._budgeted(client, budget)
                try:
                    _relay_body(ureader, rheaders, send, to_eof=True)
                except _Cut:
                    assert fault is not None
                    what = "reset" if fault.how == "reset" else "closed"
                    ranged = " (ranged)" if "range" in headers else ""
                    with self._lock:
                        self.fired.append(f"{method} {target}{ranged}: {what} after "
                                          f"{budget} bytes")
                    # Let the client read the head and the first bytes before the cut.
                    time.sleep(0.2)
                    reset = fault.how == "reset"
                    return
                if "close" in (headers.get("connection", "").lower(),
                               rheaders.get("connection", "").lower()):
                    return
        except (OSError, ValueError, IndexError):
            return  # a client or server that went away, or garbage: drop the connection
        finally:
            if upstream is not None:
                self._close(upstream)
            self._close(client, reset=reset)
            self._slots.release()

    @staticmethod
    def _budgeted(client: socket.socket, budget: int) -> Callable[[bytes], None]:
        left = [budget]

        def send(data: bytes) -> None:
            if len(data) >= left[0]:
                client.sendall(data[: left[0]])
                left[0] = 0
                raise _Cut
            client.sendall(data)
            left[0] -= len(data)

        return send
