"""The one retry policy, and stopping retries: :class:`RetryPolicy`, :class:`Retrier`,
:func:`stopping`, :func:`backoff`.

:class:`RetryPolicy` is the only back-off in ckptsync (tenacity's exponential wait with
jitter). Two things use it: :class:`Retrier` retries one call in place (a request that failed
with an error the translator marks retryable: a connection reset, a body cut short mid-read),
and :class:`~ckptsync.transfer.queue.TransferQueue` retries a whole transfer later, without
holding a thread while it waits. A stop event set through :func:`stopping` ends a
:class:`Retrier` back-off at once with :class:`TransferAborted`.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar, cast

import tenacity

from ckptsync.config import TransferConfig
from ckptsync.errors import CkptSyncError, RemoteError

__all__ = ["RetryPolicy", "Retrier", "TransferAborted", "Translate", "backoff", "check_stop",
           "stopping"]

log = logging.getLogger(__name__)

T = TypeVar("T")
Translate = Callable[[BaseException, str, str], CkptSyncError]
"""``translate(exc, url, action) -> CkptSyncError``: the one backend-exception boundary."""

# The stop event of the operation this thread works for (see :func:`stopping`).
_STOP: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar(
    "ckptsync_stop", default=None)


@contextlib.contextmanager
def stopping(stop: threading.Event | None) -> Iterator[None]:
    """Within the block, :meth:`Retrier.call` in this thread (and in the workers of
    :func:`run_parallel` started from it) ends its back-off as soon as ``stop`` is set, raising
    :class:`TransferAborted`, instead of sleeping out its retries."""
    token = _STOP.set(stop)
    try:
        yield
    finally:
        _STOP.reset(token)


class TransferAborted(RemoteError):
    """A transfer stopped because it was asked to (shutdown, or a sibling transfer failed).

    An aborted upload is never committed.
    """


# tenacity's wait strategies read only the attempt number of the state they are given.
class _Attempt:
    def __init__(self, number: int) -> None:
        self.attempt_number = number


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential back-off from ``initial`` seconds, at most ``cap``, with jitter, for at
    most ``attempts`` attempts (None: no limit; the caller stops it).

    The wait before retry ``n`` (1 for the first) is drawn between ``floor`` and all of
    ``min(cap, initial * 2 ** (n - 1))``: ``floor=0`` is full jitter (one request retried
    in place, :class:`Retrier`), ``floor=0.5`` (the default) keeps at least half, so that a
    failing remote is never retried in a burst (whole transfers, the queue).

    Example::

        RetryPolicy(1.0, 30.0).delay(3)  # 2 to 4 seconds
    """

    initial: float
    cap: float
    attempts: int | None = None
    floor: float = 0.5

    def wait(self) -> tenacity.wait.wait_base:
        """The tenacity wait strategy of this policy."""
        fixed, jitter = self.floor, 1.0 - self.floor
        return (tenacity.wait_exponential(multiplier=self.initial * fixed, max=self.cap * fixed)
                + tenacity.wait_random_exponential(multiplier=self.initial * jitter,
                                                   max=self.cap * jitter))

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1 for the first)."""
        # Past 64 doublings every wait is at its cap; the clamp keeps the power finite.
        state = _Attempt(min(max(1, attempt), 64))
        return float(self.wait()(cast(tenacity.RetryCallState, state)))

    def exhausted(self, attempts: int) -> bool:
        """True once ``attempts`` attempts were made and no more are allowed."""
        return self.attempts is not None and attempts >= self.attempts


def backoff(attempt: int, base: float, cap: float) -> float:
    """:meth:`RetryPolicy.delay` of ``RetryPolicy(base, cap)``: between half and all of
    ``min(cap, base * 2 ** (attempt - 1))``.

    Example::

        backoff(3, 1.0, 30.0)  # 2 to 4 seconds
    """
    return RetryPolicy(base, cap).delay(attempt)


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, RemoteError) and exc.retryable and not isinstance(exc, TransferAborted)


class Retrier:
    """Runs a callable, translating backend exceptions and retrying the retryable ones.

    Args:
        config: attempts and back-off.
        translate: maps a backend exception to a :class:`CkptSyncError` (kept as ``__cause__``).
        policy: the back-off and attempts, where not the config's (full jitter, at most
            ``config.retries`` attempts).
    """

    def __init__(self, config: TransferConfig, translate: Translate,
                 policy: RetryPolicy | None = None) -> None:
        self.config = config
        self.translate = translate
        self.policy = policy or RetryPolicy(config.backoff_initial, config.backoff_max,
                                            attempts=config.retries, floor=0.0)
        self.attempts = self.policy.attempts or config.retries

    def call(self, fn: Callable[[], T], *, url: str, action: str) -> T:
        """``fn()``, retried with back-off and jitter while it fails with a retryable error.

        Raises:
            CkptSyncError: the translated error of the last attempt.
        """

        def attempt() -> T:
            try:
                return fn()
            except CkptSyncError:
                raise
            except Exception as e:
                err = self.translate(e, url, action)
                # The translator may swap the cause for a stand-in without secrets in its text.
                raise err from (err.__cause__ or e)

        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.warning("%s (attempt %d of %d); retrying", exc, state.attempt_number,
                        self.attempts)

        stop = _STOP.get()

        def sleep(seconds: float) -> None:
            if stop is None:
                time.sleep(seconds)
            elif stop.wait(seconds):
                raise TransferAborted(f"{action} {url} was stopped while backing off", url=url,
                                      retryable=False)

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.attempts),
            wait=self.policy.wait(),
            retry=tenacity.retry_if_exception(_retryable),
            before_sleep=before_sleep,
            sleep=sleep,
            reraise=True,
        )
        return retrying(attempt)


def check_stop(stop: threading.Event | None, url: str) -> None:
    """Raise :class:`TransferAborted` (naming ``url``) if ``stop`` is set."""
    if stop is not None and stop.is_set():
        raise TransferAborted(f"transfer of {url} was stopped", url=url, retryable=False)
