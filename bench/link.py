"""A bounded link: a TCP proxy on 127.0.0.1 with a bandwidth limit and a round-trip time.

``python -m bench.link HOST PORT --mb-per-s 25 --rtt-ms 50`` listens on a free port, prints it,
and relays every connection to HOST:PORT through two one-way pipes (client -> server, server
-> client), each shared by all connections as one link is: a chunk read from one side is
serialized at ``mb-per-s`` (it waits behind every earlier chunk in that direction, so parallel
connections share the bandwidth, not multiply it) and delivered half the round trip later.
A new connection waits one round trip before its first byte is relayed (TCP's handshake). It
relays bytes, not HTTP: TLS passes through untouched, and whatever the client does per request
(round trips, parallel parts) costs what it would on such a link. No fault seam here;
tests/support/fault_proxy.py cuts responses but cannot pace them.

It runs in its own process (:class:`Link`) so that its CPU is neither the client's (the
benchmarks count the client's CPU with ``getrusage``) nor competing for the client's GIL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

CHUNK = 64 * 1024
SLACK = 0.01  # s of data read ahead of the link (queued, still delivered on the link's clock)


class Pipe:
    """One direction of the link: a FIFO serializer at ``rate`` bytes/s plus ``delay`` s."""

    def __init__(self, rate: float, delay: float) -> None:
        self.rate, self.delay = rate, delay
        self.free_at = 0.0  # when the link finishes sending what it already took

    def reserve(self, n: int) -> float:
        """Take ``n`` bytes onto the link: when their last byte has been sent."""
        start = max(time.monotonic(), self.free_at)
        self.free_at = start + n / self.rate
        return self.free_at


async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pipe: Pipe) -> None:
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            at, data = await queue.get()
            if not data:
                break
            wait = at - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()

    task = asyncio.create_task(deliver())
    try:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                break
            sent = pipe.reserve(len(data))
            queue.put_nowait((sent + pipe.delay, data))
            # The sender is held back while the link is busy (backpressure), but only beyond
            # SLACK: asyncio's sleeps overshoot by ~1 ms, and sleeping out every 64 KiB chunk
            # left the link idle that long each time (38 MB/s through a 100 MB/s link).
            wait = sent - time.monotonic() - SLACK
            if wait > 0:
                await asyncio.sleep(wait)
    except OSError:
        pass
    finally:
        queue.put_nowait((0.0, b""))
        with contextlib.suppress(OSError, asyncio.CancelledError):
            await task


async def _serve(host: str, port: int, rate: float, rtt: float) -> None:
    up, down = Pipe(rate, rtt / 2), Pipe(rate, rtt / 2)

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            await asyncio.sleep(rtt)  # the handshake's round trip
            sr, sw = await asyncio.open_connection(host, port)
        except OSError:
            cw.close()
            return
        try:
            await asyncio.gather(_relay(cr, sw, up), _relay(sr, cw, down))
        finally:
            for w in (sw, cw):
                with contextlib.suppress(OSError):
                    w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, limit=CHUNK)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


class Link:
    """The proxy in a child process: ``with Link(host, port, 25, 50) as link: link.port``."""

    def __init__(self, host: str, port: int, mb_per_s: float, rtt_ms: float) -> None:
        self.host, self.target, self.mb_per_s, self.rtt_ms = host, port, mb_per_s, rtt_ms
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    @property
    def label(self) -> str:
        return f"{self.mb_per_s:g} MB/s + {self.rtt_ms:g} ms RTT"

    def floor(self, nbytes: int, round_trips: int = 1) -> float:
        """The least time ``nbytes`` can take on this link: bytes / bandwidth plus
        ``round_trips`` round trips."""
        return nbytes / (self.mb_per_s * 1e6) + round_trips * self.rtt_ms / 1e3

    def __enter__(self) -> Link:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.link", self.host, str(self.target),
             "--mb-per-s", str(self.mb_per_s), "--rtt-ms", str(self.rtt_ms)],
            cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            self.proc.kill()
            raise RuntimeError(f"bench.link did not start: {line!r}")
        self.port = int(line)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()
            self.proc = None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--mb-per-s", type=float, required=True, help="bandwidth each way (1e6 B/s)")
    ap.add_argument("--rtt-ms", type=float, required=True, help="round-trip time")
    args = ap.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.host, args.port, args.mb_per_s * 1e6, args.rtt_ms / 1e3))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
