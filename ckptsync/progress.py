"""Progress reporters: what a transfer tells about the bytes it moves (torch-free).

:class:`Progress` is the protocol transfers call (from worker threads); :class:`NullProgress`
ignores everything (the default); :class:`TqdmProgress` draws a tqdm bar on stderr (the CLI's
and the demo's). tqdm is imported only when a bar starts.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Protocol

__all__ = ["NullProgress", "Progress", "TqdmProgress"]


class Progress(Protocol):
    """Receives byte counts from transfers; called from worker threads."""

    def start(self, total: int, description: str) -> None: ...

    def update(self, n: int) -> None: ...

    def close(self) -> None: ...


class NullProgress:
    """A progress sink that ignores everything (the default)."""

    def start(self, total: int, description: str) -> None:
        pass

    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


class TqdmProgress:
    """A :class:`Progress` drawing a tqdm bar on stderr (thread-safe)."""

    def __init__(self) -> None:
        self._bar: Any = None
        self._lock = threading.Lock()

    def start(self, total: int, description: str) -> None:
        from tqdm import tqdm

        tqdm.monitor_interval = 0  # no monitor thread: our bars are closed by us
        with self._lock:
            if self._bar is not None:
                self._bar.close()
            self._bar = tqdm(total=total, desc=description[:40], unit="B", unit_scale=True,
                             unit_divisor=1024, file=sys.stderr, leave=False)

    def update(self, n: int) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.update(n)

    def close(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
