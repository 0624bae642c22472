"""A fault seam on the wire: an HTTP/1.1 proxy on 127.0.0.1 that cuts chosen responses.

Put it in front of a real server (SeaweedFS, moto, fake-gcs) and point the client's endpoint at
it; every request and response is relayed byte for byte, except that a :class:`Fault` cuts the
response to the Nth matching request after part of its body (a connection reset or a plain
close), as a flaky network does::

    with FaultProxy("127.0.0.1", 8333, plan=[Fault(nth=2, ranged=True)]) as proxy:
        opts = {..., "client_kwargs": {"endpoint_url": proxy.endpoint}}
        ...                                  # the second ranged GET is reset mid-body
    assert proxy.fired == ["GET /bucket/run/... (ranged): reset after 2621440 bytes"]

Each fault fires once. For soak tests, a :class:`Chaos` plan instead faults a seeded random share
of all requests, with every way a network or a server misbehaves::

    with FaultProxy(host, port, chaos=Chaos(rate=0.3, seed=7)) as proxy:
        ...                                  # ~30% of requests meet one of Chaos.KINDS
    print(proxy.injected)                    # Counter({"503": 4, "drop": 3, ...})

Credentials that expire: after :meth:`FaultProxy.revoke`, a request signed with that access
key is answered 403 InvalidAccessKeyId (not forwarded), as a server answers a deleted key.
:attr:`FaultProxy.connections` counts the client connections accepted (a client that reuses
its connections opens no new one).

A slow or dead link: :meth:`FaultProxy.stall` holds every new request (none is forwarded,
none answered) until :meth:`FaultProxy.unstall`; ``rate`` (bytes per second) throttles the
request bodies relayed to the server, as an upload over a slow link::

    with FaultProxy(host, port, rate=2e6) as proxy:   # uploads at ~2 MB/s
        proxy.stall()                                 # the link goes dead ...
        proxy.unstall()                               # ... and comes back
        proxy.stall(path_contains="/step-2/")         # only these requests hang

The proxy answers ``Expect: 100-continue`` itself (and does not pass it
on), so uploads through it are not delayed. Bounded: at most ``max_connections`` client
connections at once, every socket has a timeout, and the proxy stops by itself after
``lifetime`` seconds; leaving the ``with`` block stops it and joins its threads.
"""

from __future__ import annotations

import contextlib
import random
import select
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
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
            truncated body); ``"drop"``: the request reaches the server, which acts on it, and
            its whole reply is lost (read and thrown away, the client's connection reset: an
            ambiguous outcome, as :data:`KINDS`' ``drop``); or ``"flip"``: the *request*
            body (one with a Content-Length) reaches the server with one byte flipped, at
            offset ``after`` (None: its middle), as bytes damaged in transit, and the reply is
            relayed whole (its status recorded); or ``"416"``: the request never reaches the
            server, and the proxy answers it 416 Range Not Satisfiable (S3's ``InvalidRange``),
            as a server briefly answers a ranged read of an object it has not settled.
    """

    method: str = "GET"
    nth: int = 1
    path_contains: str = ""
    ranged: bool | None = None
    after: int | None = None
    how: Literal["reset", "close", "drop", "flip", "416"] = "reset"
    seen: int = field(default=0, init=False)
    done: bool = field(default=False, init=False)

    def matches(self, method: str, target: str, headers: dict[str, str]) -> bool:
        if self.done or method != self.method or self.path_contains not in target:
            return False
        return self.ranged is None or self.ranged == ("range" in headers)


# What each Chaos kind does to one request (the server "acted" when it got the request):
#   reset      the request is read, never forwarded; the connection is reset (RST)
#   close      the request is read, never forwarded; the connection is closed without a reply
#   500        answered by the proxy: 500 InternalError (not forwarded)
#   503        answered by the proxy: 503 SlowDown, S3's throttling reply (not forwarded)
#   latency    forwarded after a random delay (Chaos.latency_s), relayed whole
#   short      forwarded; the reply's head (its real Content-Length) and half its body are
#              relayed, then the connection is closed: a body cut short
#   drop       forwarded; the server's whole reply is read and thrown away, then the client's
#              connection is reset: the server acted, the client cannot know it (ambiguous)
#   blackhole  the request is read, never forwarded, never answered; the connection stays open
#              until the client gives up (its read timeout) or the proxy stops
KINDS = ("reset", "close", "500", "503", "latency", "short", "drop", "blackhole")

_ERROR_BODIES = {
    "500": (b"500 Internal Server Error", "InternalError",
            "We encountered an internal error. Please try again."),
    "503": (b"503 Slow Down", "SlowDown", "Please reduce your request rate."),
    "416": (b"416 Requested Range Not Satisfiable", "InvalidRange",
            "The requested range is not satisfiable"),
    "revoked": (b"403 Forbidden", "InvalidAccessKeyId",
                "The AWS Access Key Id you provided does not exist in our records."),
}


def _error_reply(kind: str, dialect: str) -> bytes:
    status, code, message = _ERROR_BODIES[kind]
    if dialect == "gcs":
        body = (b'{"error": {"code": %s, "message": "%s", "errors": [{"reason": "%s"}]}}'
                % (status[:3], message.encode(), code.encode()))
        ctype = b"application/json"
    else:
        body = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>%s</Code>'
                b"<Message>%s</Message><RequestId>faultproxy</RequestId></Error>"
                % (code.encode(), message.encode()))
        ctype = b"application/xml"
    return (b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s"
            % (status, ctype, len(body), body))


@dataclass
class Chaos:
    """Fault a seeded random share of all requests.

    Attributes:
        rate: the probability that one request meets a fault (0.1 = 10%).
        seed: seeds the draws (the order of concurrent requests still varies between runs,
            so a seed fixes the sequence of faults, not which request gets which).
        kinds: which of :data:`KINDS` to draw from (uniformly).
        latency_s: the range of a ``latency`` fault's delay.
        dialect: ``"s3"`` (XML error bodies) or ``"gcs"`` (JSON error bodies).
        spare: requests whose target contains any of these are never faulted.
    """

    rate: float
    seed: int
    kinds: Sequence[str] = KINDS
    latency_s: tuple[float, float] = (0.05, 0.5)
    dialect: str = "s3"
    spare: Sequence[str] = ()

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(KINDS)
        if unknown or not self.kinds:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {KINDS}")
        self._rng = random.Random(self.seed)

    def draw(self, target: str) -> tuple[str, float] | None:
        """The fault for the next request (kind, delay), or None. Call under a lock."""
        if any(s in target for s in self.spare):
            return None
        if self._rng.random() >= self.rate:
            return None
        kind = self._rng.choice(list(self.kinds))
        return kind, self._rng.uniform(*self.latency_s)


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


def _flipping(send: Callable[[bytes], None], at: int) -> Callable[[bytes], None]:
    """``send``, with the byte at offset ``at`` of what goes through it inverted."""
    seen = [0]

    def flip(data: bytes) -> None:
        start, seen[0] = seen[0], seen[0] + len(data)
        if start <= at < seen[0]:
            b = bytearray(data)
            b[at - start] ^= 0xFF
            data = bytes(b)
        send(data)

    return flip


class FaultProxy:
    """An HTTP/1.1 proxy on 127.0.0.1 in front of ``upstream_host:upstream_port``.

    Args:
        upstream_host, upstream_port: the real server.
        plan: the faults to inject (each fires once).
        chaos: a random plan applied to every request the ``plan`` does not fault.
        lifetime: seconds after which the proxy stops by itself.
        max_connections: client connections served at once (more wait in the backlog).
        timeout: seconds any socket may stay silent before its connection is dropped.
        rate: bytes per second at which request bodies are relayed (None: as fast as they come).
        tls: ``(certificate, key)`` files: clients speak https to the proxy (it terminates TLS
            and relays plain http upstream), so it sees what a client sends over TLS.

    Attributes:
        endpoint: ``http://127.0.0.1:<port>`` (``https://`` with ``tls``), the URL to give
            the client.
        fired: one line per fault that fired (method, target, what was done).
        injected: how many faults of each kind fired (a ``plan`` fault counts as "cut").
        requests: ``(method, target)`` of every request relayed, in order.
        heads: ``(method, target, headers)`` of every request, in order (header names in
            lower case): what the client sent, e.g. the checksum it declared.
        body_bytes: request body bytes relayed to the server (what the client uploaded).
        connections: client connections accepted so far.
    """

    def __init__(self, upstream_host: str, upstream_port: int, *,
                 plan: Sequence[Fault] = (), chaos: Chaos | None = None,
                 lifetime: float = 300.0,
                 max_connections: int = 64, timeout: float = 30.0,
                 rate: float | None = None,
                 tls: tuple[Path, Path] | None = None) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._tls: ssl.SSLContext | None = None
        if tls is not None:
            self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._tls.load_cert_chain(str(tls[0]), str(tls[1]))
        self.rate = rate
        self._open = threading.Event()  # cleared while the link is stalled
        self._open.set()
        self._stall_match: str | None = None
        self.plan = list(plan)
        self.lifetime = lifetime
        self.timeout = timeout
        self.chaos = chaos
        self.fired: list[str] = []
        self.injected: Counter[str] = Counter()
        self.requests: list[tuple[str, str]] = []
        self.heads: list[tuple[str, str, dict[str, str]]] = []
        self.body_bytes = 0
        self.connections = 0
        self._revoked: set[str] = set()
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_connections)
        self._stop = threading.Event()
        self._socks: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self.endpoint = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
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

    def stall(self, path_contains: str | None = None) -> None:
        """From now on, hold every request (not forwarded, not answered) until :meth:`unstall`;
        a request already relayed completes. With ``path_contains``, hold only the requests
        whose target contains it (one checkpoint's uploads, say) and relay the others."""
        self._stall_match = path_contains
        self._open.clear()

    def unstall(self) -> None:
        """Forward the held requests and every later one."""
        self._open.set()

    def revoke(self, access_key: str) -> None:
        """From now on, answer a request signed (SigV4) with ``access_key`` with 403
        InvalidAccessKeyId, without forwarding it: the key was deleted."""
        with self._lock:
            self._revoked.add(access_key)

    # ------------------------------------------------------------------ internals

    def _throttled(self, send: Callable[[bytes], None]) -> Callable[[bytes], None]:
        """``send`` paced at ``rate`` bytes per second (in pieces of at most 64 KiB), and
        counted in :attr:`body_bytes`."""
        rate = self.rate
        start, sent = time.monotonic(), [0]

        def counted(data: bytes) -> None:
            send(data)
            with self._lock:
                self.body_bytes += len(data)

        if rate is None:
            return counted

        def paced(data: bytes) -> None:
            for i in range(0, len(data), 64 * 1024):
                piece = data[i:i + 64 * 1024]
                ahead = start + (sent[0] + len(piece)) / rate - time.monotonic()
                if ahead > 0 and self._stop.wait(ahead):
                    raise OSError("proxy stopped")
                counted(piece)
                sent[0] += len(piece)

        return paced

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
            with self._lock:
                self.connections += 1
            t = threading.Thread(target=self._serve, args=(client,),
                                 name=f"{THREAD_PREFIX}-conn", daemon=True)
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()
        self._stop.set()

    def _track(self, s: socket.socket) -> socket.socket:
        s.settimeout(self.timeout)
        # A head and its body are relayed in separate sends: without this, Nagle holds the
        # second until the first is acknowledged (a delayed ACK: ~40 ms per request).
        with contextlib.suppress(OSError):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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

    def _pick(self, method: str, target: str,
              headers: dict[str, str]) -> Fault | tuple[str, float] | None:
        with self._lock:
            self.requests.append((method, target))
            self.heads.append((method, target, dict(headers)))
            for f in self.plan:
                if f.matches(method, target, headers):
                    f.seen += 1
                    if f.seen == f.nth:
                        f.done = True
                        return f
            return self.chaos.draw(target) if self.chaos is not None else None

    def _record(self, kind: str, line: str) -> None:
        with self._lock:
            self.injected[kind] += 1
            self.fired.append(line)

    def _hold(self, client: socket.socket) -> None:
        """A black hole: say nothing until the client hangs up or the proxy stops."""
        while not self._stop.is_set():
            ready, _, _ = select.select([client], [], [], 0.2)
            if ready and not client.recv(64 * 1024):
                return

    def _serve(self, client_sock: socket.socket) -> None:
        client = self._track(client_sock)
        upstream: socket.socket | None = None
        reset = False
        try:
            if self._tls is not None:
                wrapped = self._tls.wrap_socket(client, server_side=True)  # handshakes
                with self._lock:
                    self._socks.discard(client)
                    self._socks.add(wrapped)
                client = wrapped
            upstream = self._track(socket.create_connection(self.upstream, timeout=self.timeout))
            creader, ureader = _Reader(client), _Reader(upstream)
            while not self._stop.is_set():
                head = creader.head()
                if head is None:
                    return
                request_line, headers = _parse(head)
                method, target = [*request_line.split(" "), "", ""][:2]
                while (self._stall_match is None or self._stall_match in target) \
                        and not self._open.wait(0.1):  # stalled: hold the request
                    if self._stop.is_set():
                        return
                if headers.get("expect", "").lower() == "100-continue":
                    client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                    head = b"\r\n".join(ln for ln in head.split(b"\r\n")
                                        if not ln.lower().startswith(b"expect:"))
                picked = self._pick(method, target, headers)
                with self._lock:
                    revoked = any(f"Credential={k}/" in headers.get("authorization", "")
                                  for k in self._revoked)
                if revoked:
                    _relay_body(creader, headers, lambda _b: None, to_eof=False)
                    self._record("revoked", f"{method} {target}: revoked key")
                    client.sendall(_error_reply("revoked", "s3"))
                    continue
                fault = picked if isinstance(picked, Fault) else None
                kind, delay = picked if isinstance(picked, tuple) else ("", 0.0)
                if fault is not None and fault.how == "416":  # answered here, not forwarded
                    _relay_body(creader, headers, lambda _b: None, to_eof=False)
                    self._record("416", f"{method} {target}: answered 416")
                    client.sendall(_error_reply("416", "s3"))
                    continue
                if fault is not None and fault.how == "drop":
                    fault, kind = None, "drop"
                what = f"{method} {target}"
                if kind in ("reset", "close", "500", "503", "blackhole"):
                    # Not forwarded: the server never sees this request.
                    _relay_body(creader, headers, lambda _b: None, to_eof=False)
                    self._record(kind, f"{what}: {kind}")
                    if kind in ("500", "503"):
                        client.sendall(_error_reply(kind, self.chaos.dialect
                                                    if self.chaos else "s3"))
                        continue
                    if kind == "blackhole":
                        self._hold(client)
                    reset = kind == "reset"
                    return
                if kind == "latency":
                    self._record(kind, f"{what}: delayed {delay:.2f} s")
                    if self._stop.wait(delay):
                        return
                upstream.sendall(head)
                forward = self._throttled(upstream.sendall)
                flipped: int | None = None
                if fault is not None and fault.how == "flip" and "content-length" in headers:
                    length = int(headers["content-length"])
                    flipped = fault.after if fault.after is not None else length // 2
                    forward = _flipping(forward, flipped)
                _relay_body(creader, headers, forward, to_eof=False)
                while True:
                    rhead = ureader.head()
                    if rhead is None:
                        return
                    status_line, rheaders = _parse(rhead)
                    status = int(status_line.split(" ")[1])
                    if status >= 200:
                        break  # 1xx interim answers: the client already got its 100 Continue
                no_body = method == "HEAD" or status in (204, 304)
                size = int(rheaders.get("content-length", "0") or 0)
                chunked = "chunked" in rheaders.get("transfer-encoding", "").lower()
                if kind == "short" and (no_body or (size < 2 and not chunked)):
                    kind = "drop"  # no body to cut short: lose the whole reply instead
                if kind == "drop":
                    if not no_body:
                        _relay_body(ureader, rheaders, lambda _b: None, to_eof=True)
                    self._record(kind, f"{what}: {status} dropped after the server acted")
                    reset = True
                    return
                if flipped is not None:
                    self._record("flip", f"{what}: byte {flipped} flipped, answered {status}")
                    fault = None  # the reply goes back whole
                client.sendall(rhead)
                if no_body:
                    continue
                send: Callable[[bytes], None] = client.sendall
                budget = 0
                if fault is not None:
                    budget = fault.after if fault.after is not None else max(1, size // 2)
                    send = self._budgeted(client, budget)
                elif kind == "short":
                    budget = size // 2 if size else 16
                    send = self._budgeted(client, budget)
                try:
                    _relay_body(ureader, rheaders, send, to_eof=True)
                except _Cut:
                    ranged = " (ranged)" if "range" in headers else ""
                    if fault is not None:
                        cut = "reset" if fault.how == "reset" else "closed"
                        self._record("cut", f"{what}{ranged}: {cut} after {budget} bytes")
                        reset = fault.how == "reset"
                    else:
                        self._record(kind, f"{what}{ranged}: closed after {budget} of "
                                           f"{size if size else '?'} bytes")
                    # Let the client read the head and the first bytes before the cut.
                    time.sleep(0.2)
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
