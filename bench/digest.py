"""What a manifest digest costs per byte: sha256 (the format's) against faster ones.

``python -m bench.digest [--runs N]`` hashes the same 256 MiB of random bytes in 16 MiB
pieces (a save's writes are this large) with each digest, on one thread, and prints the CPU
seconds per GB (the calling thread's CPU time, medians of N) and the ratio to sha256.

Why: every byte ckptsync saves, uploads or downloads is hashed once for the manifest, and on
a machine whose cores the training loop keeps busy that CPU is training time lost (see the
README, "What it costs"). DESIGN.md fixes the digest to sha256; this measures what another
choice would cost. BLAKE3 is a cryptographic hash like sha256; xxh3-128 only detects
accidental corruption. The candidates outside the standard library come from
``requirements/bench.txt``; one that is not installed prints ``unavailable``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import UNAVAILABLE, Table

SIZE = 256 << 20
PIECE = 16 << 20


def _candidates() -> dict[str, Callable[[], Any] | None]:
    import hashlib

    found: dict[str, Callable[[], Any] | None] = {
        "sha256 (hashlib, the format's)": hashlib.sha256,
        "sha1 (hashlib)": hashlib.sha1,
        "blake2b (hashlib)": hashlib.blake2b,
    }
    try:
        import blake3

        found["blake3 (one thread)"] = lambda: blake3.blake3(max_threads=1)
    except ImportError as e:
        found["blake3 (one thread)"] = None
        UNAVAILABLE["blake3 (one thread)"] = str(e)
    try:
        import xxhash

        found["xxh3-128 (not cryptographic)"] = xxhash.xxh3_128
    except ImportError as e:
        found["xxh3-128 (not cryptographic)"] = None
        UNAVAILABLE["xxh3-128 (not cryptographic)"] = str(e)
    return found


def cpu_per_gb(make: Callable[[], Any], data: memoryview) -> float:
    """CPU seconds of this thread per GB to hash ``data`` piece by piece."""
    t0 = time.thread_time()
    h = make()
    for i in range(0, len(data), PIECE):
        h.update(data[i:i + PIECE])
    h.hexdigest()
    return (time.thread_time() - t0) / (len(data) / 1e9)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7, help="measured runs after one warm-up")
    args = ap.parse_args()
    data = memoryview(os.urandom(SIZE))
    makers = _candidates()
    rows: dict[str, list[float]] = {name: [] for name in makers}
    live = {name: make for name, make in makers.items() if make is not None}
    for make in live.values():  # warm-up
        cpu_per_gb(make, data)
    for _ in range(args.runs):  # alternating, so that a noisy neighbour hurts all alike
        for name, make in live.items():
            rows[name].append(cpu_per_gb(make, data))
    sha = statistics.median(rows["sha256 (hashlib, the format's)"])
    print(Table(
        f"digest cost, {SIZE >> 20} MiB in {PIECE >> 20} MiB pieces, one thread",
        "CPU-s per GB", rows, baseline="sha256 (hashlib, the format's)",
        notes=[f"sha256 runs at {1 / sha:.2f} GB/s per core here; a local save costs at least "
               "torch.save's own CPU plus one digest of every byte"],
    ).render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
