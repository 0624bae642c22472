"""A one-shot command's deadline (``--timeout``): no command waits on a silent remote for
longer than the user allows, whatever the retry layers below it do.

Retries are bounded per layer (ckptsync's :class:`~ckptsync.transfer.Retrier`, one botocore
attempt per call, connect and read timeouts), but a remote that accepts connections and
never answers still costs every layer its full wait. The deadline bounds the whole: once the
command has moved no byte for ``seconds`` (a transfer's progress keeps it off; a listing has
none, so for it the deadline is total), :class:`DeadlineExceeded` is raised in the main
thread, between two bytecodes, as Ctrl-C raises ``KeyboardInterrupt``: every ``finally`` and
``with`` block on the way out runs (an upload in flight is abandoned, never committed).

Only in the main thread (``signal.setitimer``); elsewhere, or with ``seconds`` 0, it does
nothing.

Example::

    with Deadline(300, "ls s3://bucket/run") as deadline:
        deadline.where = "s3://bucket/run (endpoint http://10.0.0.1:9000)"
        ...
"""

from __future__ import annotations

import os
import signal
import threading
import time
from types import FrameType, TracebackType

from ckptsync.errors import ConfigError, RemoteError

__all__ = ["DEFAULT_TIMEOUT", "Deadline", "DeadlineExceeded", "resolve_timeout"]

#: Seconds without progress before a command gives up (``CKPTSYNC_TIMEOUT``, ``--timeout``).
DEFAULT_TIMEOUT = 300.0


class DeadlineExceeded(RemoteError):
    """The command made no progress for its ``--timeout``: the remote does not answer."""


def resolve_timeout(value: float | None) -> float:
    """``--timeout`` > ``CKPTSYNC_TIMEOUT`` > :data:`DEFAULT_TIMEOUT` (0: no deadline).

    Raises:
        ConfigError: a negative or non-numeric value.
    """
    if value is None:
        raw = os.environ.get("CKPTSYNC_TIMEOUT", "").strip()
        try:
            value = float(raw) if raw else DEFAULT_TIMEOUT
        except ValueError:
            raise ConfigError(f"CKPTSYNC_TIMEOUT={raw!r} is not a number of seconds") from None
    if not value >= 0:
        raise ConfigError(f"--timeout must be a number of seconds >= 0, got {value!r}")
    return float(value)


class Deadline:
    """Raise :class:`DeadlineExceeded` in the main thread once ``seconds`` pass without a
    :meth:`touch` (see the module doc). ``what`` is the command, ``where`` the remote (its
    endpoint) the message names."""

    def __init__(self, seconds: float, what: str) -> None:
        self.seconds = seconds
        self.what = what
        self.where = ""
        self._last = time.monotonic()
        self._armed = False
        self._old: object = None

    def touch(self) -> None:
        """Progress was made (any thread): the deadline starts again from now."""
        self._last = time.monotonic()

    def __enter__(self) -> Deadline:
        if self.seconds > 0 and threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGALRM, self._fire)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
            self._armed = True
        return self

    def _fire(self, signum: int, frame: FrameType | None) -> None:
        idle = time.monotonic() - self._last
        if idle < self.seconds:  # progress since: wait for the rest
            signal.setitimer(signal.ITIMER_REAL, max(0.01, self.seconds - idle))
            return
        where = f" {self.where}" if self.where else ""
        # Armed again: should anything on the way out swallow this one, the next ends it.
        signal.setitimer(signal.ITIMER_REAL, 1.0)
        raise DeadlineExceeded(
            f"{self.what}: the remote{where} made no progress for {self.seconds:g} s "
            "(--timeout, CKPTSYNC_TIMEOUT): it does not answer, or answers too slowly. Check "
            "the endpoint and the network, or raise --timeout; nothing partial was committed",
            url=self.where or None, retryable=False)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._old)  # type: ignore[arg-type]
            self._armed = False
