"""Retries with back-off, and stopping them: :class:`Retrier`, :func:`stopping`, :func:`backoff`.

Retries (tenacity: exponential back-off with full jitter) apply only to errors the translator
marks retryable (a connection reset or a body cut short mid-read among them). A stop event set
through :func:`stopping` ends a back-off at once with :class:`TransferAborted`.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import tenacity

from ckptsync.config import TransferConfig
from ckptsync.errors import CkptSyncError, RemoteError

__all__ = ["Retrier", "TransferAborted", "Translate", "backoff", "stopping"]

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


def backoff(attempt: int, base: float, cap: float) -> float:
    """Seconds to wait before retry number ``attempt`` (1 for the first retry): exponential
    from ``base``, at most ``cap``, with jitter (between half and all of it).

    Example::

        time.sleep(backoff(3, 1.0, 30.0))  # 2 to 4 seconds
    """
    # 2.0 ** 1023 is the largest finite power; a product past the float range is inf, so cap.
    exponent = min(max(0, attempt - 1), 1023)
    return random.uniform(0.5, 1.0) * min(cap, base * 2.0 ** exponent)


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, RemoteError) and exc.retryable and not isinstance(exc, TransferAborted)


class Retrier:
    """Runs a callable, translating backend exceptions and retrying the retryable ones.

    Args:
        config: attempts and back-off.
        translate: maps a backend exception to a :class:`CkptSyncError` (kept as ``__cause__``).
    """

    def __init__(self, config: TransferConfig, translate: Translate) -> None:
        self.config = config
        self.translate = translate

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
            log.warning(
                "%s (attempt %d of %d); retrying", exc, state.attempt_number, self.config.retries
            )

        stop = _STOP.get()

        def sleep(seconds: float) -> None:
            if stop is None:
                time.sleep(seconds)
            elif stop.wait(seconds):
                raise TransferAborted(f"{action} {url} was stopped while backing off", url=url,
                                      retryable=False)

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.config.retries),
            wait=tenacity.wait_random_exponential(
                multiplier=self.config.backoff_initial, max=self.config.backoff_max
            ),
            retry=tenacity.retry_if_exception(_retryable),
            before_sleep=before_sleep,
            sleep=sleep,
            reraise=True,
        )
        return retrying(attempt)


def _check_stop(stop: threading.Event | None, url: str) -> None:
    if stop is not None and stop.is_set():
        raise TransferAborted(f"transfer of {url} was stopped", url=url, retryable=False)
