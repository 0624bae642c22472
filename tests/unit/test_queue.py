"""The one transfer queue: latest wins per key, bounded, cancellable, one retry policy."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError

import pytest

from ckptsync.transfer.queue import Attempt, Transfer, TransferFuture, TransferQueue
from ckptsync.transfer.retry import RetryPolicy

pytestmark = pytest.mark.core

QUICK = RetryPolicy(0.01, 0.02)


class Gate:
    """A transfer body that blocks until opened, recording what ran, in order."""

    def __init__(self) -> None:
        self.ran: list[str] = []
        self.started = threading.Event()
        self.open = threading.Event()

    def body(self, label: str, *, block: bool = False) -> Callable[[Attempt], str]:
        def run(attempt: Attempt) -> str:
            self.ran.append(label)
            if block:
                self.started.set()
                assert self.open.wait(10), "the test never opened the gate"
            return label

        return run


@pytest.fixture
def queue() -> TransferQueue:
    q = TransferQueue(1, name="test-queue")
    yield q
    q.close()
    q.abort()
    assert q.join(10), "a queue thread outlived the test"


def test_a_newer_version_replaces_the_waiting_one_and_never_runs_behind_older_work(
        queue: TransferQueue) -> None:
    g = Gate()
    busy = queue.submit(Transfer("other", g.body("other", block=True)))
    assert g.started.wait(5)
    old_last = queue.submit(Transfer("last.ckpt", g.body("last@1")))
    topk = queue.submit(Transfer("epoch=1.ckpt", g.body("epoch=1")))
    new_last = queue.submit(Transfer("last.ckpt", g.body("last@2")))
    assert old_last.wait(1) and old_last.outcome == "superseded"
    with pytest.raises(CancelledError):
        old_last.result()
    g.open.set()
    assert queue.wait_idle(10)
    # last.ckpt's newest version went in the place its key had in line: before the top-k
    # file queued after it, and its older version never ran.
    assert g.ran == ["other", "last@2", "epoch=1"]
    assert busy.result() == "other" and new_last.result() == "last@2"
    assert topk.result() == "epoch=1"


def test_at_most_one_transfer_per_key_runs_however_many_workers() -> None:
    q = TransferQueue(4, name="test-queue")
    inside, most = 0, 0
    lock = threading.Lock()

    def body(attempt: Attempt) -> None:
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
        time.sleep(0.05)
        with lock:
            inside -= 1

    try:
        futs = [q.submit(Transfer("one-key", body)) for _ in range(3)]
        others = [q.submit(Transfer(f"key{i}", lambda a: None)) for i in range(3)]
        assert q.wait_idle(10)
    finally:
        q.close()
        assert q.join(5)
    assert most == 1
    # The newest always runs; an older one ran only if it started before a newer came.
    assert futs[-1].outcome == "done"
    assert {f.outcome for f in futs[:-1]} <= {"done", "superseded"}
    assert all(f.outcome == "done" for f in others)


def test_a_failed_attempt_is_retried_by_the_policy_and_told_it_is_a_retry(
        queue: TransferQueue) -> None:
    seen: list[tuple[int, bool]] = []
    reported: list[tuple[int, float | None]] = []

    def flaky(attempt: Attempt) -> str:
        seen.append((attempt.number, attempt.first))
        if attempt.number < 3:
            raise ConnectionError("injected: reset")
        return "committed"

    def failed(fut: TransferFuture[str], exc: BaseException, delay: float | None) -> None:
        reported.append((fut.attempts, delay))

    fut = queue.submit(Transfer("k", flaky, retry=lambda e: QUICK, failed=failed))
    assert fut.result(10) == "committed"
    assert seen == [(1, True), (2, False), (3, False)]
    assert [a for a, _ in reported] == [1, 2]
    assert all(d is not None and 0.005 <= d <= 0.02 for _, d in reported)
    assert queue.failures("k") == 0  # reset by the success


def test_an_error_the_policy_does_not_retry_fails_the_transfer(queue: TransferQueue) -> None:
    def broken(attempt: Attempt) -> None:
        raise PermissionError("injected: access denied")

    fut = queue.submit(Transfer("k", broken, retry=lambda e: None))
    assert fut.wait(5) and fut.outcome == "failed"
    with pytest.raises(PermissionError, match="access denied"):
        fut.result()
    assert fut.attempts == 1 and queue.failures("k") == 1


def test_a_policy_with_a_limit_gives_up_after_it(queue: TransferQueue) -> None:
    def broken(attempt: Attempt) -> None:
        raise ConnectionError("injected: down")

    limited = RetryPolicy(0.001, 0.002, attempts=3)
    fut = queue.submit(Transfer("k", broken, retry=lambda e: limited))
    assert fut.wait(5) and fut.outcome == "failed" and fut.attempts == 3


def test_a_newer_version_of_a_failing_key_goes_instead_after_the_back_off(
        queue: TransferQueue) -> None:
    g = Gate()
    tries: list[str] = []

    def failing(attempt: Attempt) -> None:
        tries.append("v1")
        assert g.open.wait(10)
        raise ConnectionError("injected: down")

    slow = RetryPolicy(0.3, 0.3)
    v1 = queue.submit(Transfer("ckpts", failing, retry=lambda e: slow))
    while not tries:
        time.sleep(0.01)
    v2 = queue.submit(Transfer("ckpts", g.body("v2")))  # waits behind the one running
    t0 = time.monotonic()
    g.open.set()
    assert v2.result(10) == "v2"
    # v1 failed with a newer version waiting: v1 is superseded (never retried), and v2
    # waited for the key's back-off (the remote was failing).
    assert v1.outcome == "superseded" and isinstance(v1.error, ConnectionError)
    assert tries == ["v1"] and time.monotonic() - t0 >= 0.14


def test_close_cancels_what_waits_and_abort_stops_what_runs(queue: TransferQueue) -> None:
    stopped = threading.Event()
    running = threading.Event()

    def long_upload(attempt: Attempt) -> None:
        running.set()
        assert attempt.stop.wait(10), "abort() never reached the running transfer"
        stopped.set()
        raise ConnectionError("stopped mid-upload")

    first = queue.submit(Transfer("a", long_upload, retry=lambda e: QUICK))
    assert running.wait(5)
    queued = queue.submit(Transfer("b", lambda a: None))
    assert queue.close() == [queued] and queued.outcome == "cancelled"
    queue.abort()
    assert queue.join(5) and stopped.is_set()
    # Stopped by abort(): not retried, whatever the policy says.
    assert first.outcome == "failed" and first.attempts == 1
    late = queue.submit(Transfer("c", lambda a: None))
    assert late.outcome == "cancelled"


def test_discard_drops_a_waiting_transfer_of_a_key(queue: TransferQueue) -> None:
    g = Gate()
    queue.submit(Transfer("busy", g.body("busy", block=True)))
    assert g.started.wait(5)
    gone = queue.submit(Transfer("epoch=0.ckpt", g.body("epoch=0")))
    assert queue.discard("epoch=0.ckpt") is gone and gone.outcome == "cancelled"
    assert queue.discard("epoch=0.ckpt") is None
    g.open.set()
    assert queue.wait_idle(5) and g.ran == ["busy"]


def test_the_policy_grows_to_its_cap_with_jitter_and_full_jitter_may_be_asked() -> None:
    half = RetryPolicy(1.0, 30.0)
    for attempt, full in ((1, 1.0), (3, 4.0), (6, 30.0), (10**6, 30.0)):
        waits = [half.delay(attempt) for _ in range(100)]
        assert all(full / 2 <= w <= full for w in waits) and len(set(waits)) > 1
    assert all(0 <= RetryPolicy(1.0, 30.0, floor=0.0).delay(3) <= 4.0 for _ in range(100))
    assert RetryPolicy(1.0, 2.0, attempts=2).exhausted(2)
    assert not RetryPolicy(1.0, 2.0).exhausted(10**6)
