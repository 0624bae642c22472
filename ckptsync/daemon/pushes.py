"""The daemon's pushes: what the remote lacks is pushed, newest first, through the queue.

:class:`PushQueue` reconciles: it lists the committed local checkpoints (the native ones and
the zero-code versions in the spool) and offers the daemon's
:class:`~ckptsync.transfer.queue.TransferQueue` the newest one the remote lacks of each
*source* (the native checkpoints; each zero-code rule), keyed by that source. Latest wins: a
newer checkpoint of a source replaces the one waiting, never queues behind it; one push per
source runs at a time. A failed push is retried by the queue's one policy while its error is
retryable (a retry reads the remote first: the last attempt may have committed it); an error
a retry is unlikely to fix (access denied, a conflicting remote checkpoint) is reported and
offered again by a later reconcile, after a longer back-off, while the rest keeps syncing. One
the trainer deleted meanwhile is dropped; one abandoned at a stop is cleaned up.

A push of one node's part of a multi-node checkpoint (:mod:`ckptsync.parts`) that finds
other nodes' parts missing is not a sync: the checkpoint is "waiting for nodes" (status),
and each reconcile (every ``interval``) pushes it again, which commits it where every part
is there and is a no-op once it is committed; it is synced once its whole manifest is.

Runs on the dispatcher thread; the pushes run on the queue's threads, and their outcomes come
back through the dispatcher's queue.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptsync.daemon.config import WatchConfig
from ckptsync.daemon.health import Health
from ckptsync.daemon.remote_view import RemoteView
from ckptsync.daemon.runtime import resumed_from
from ckptsync.daemon.taker import VersionTaker
from ckptsync.daemon.versions import signature_of
from ckptsync.errors import CkptSyncError, CorruptCheckpointError, RemoteError
from ckptsync.local import LocalCheckpoint, LocalStore
from ckptsync.manifest import MANIFEST_NAME, Manifest, parse_name, pending_sort_key
from ckptsync.output import EventLog
from ckptsync.parts import part_of
from ckptsync.retention import CheckpointInfo, select_for_deletion
from ckptsync.transfer.queue import Attempt, Transfer, TransferFuture, TransferQueue
from ckptsync.transfer.retry import RetryPolicy

if TYPE_CHECKING:
    from ckptsync.remote import RemoteStore

__all__ = ["GIVE_UP_AFTER", "PushQueue"]

#: A retryable failure (the remote may be failing) is retried after 1, 2, 4, ... s, at most 2 min.
RETRY = RetryPolicy(1.0, 120.0)
#: One a retry is unlikely to fix is offered again after 5, 10, 20, ... s, at most 10 min.
RETRY_PERMANENT = RetryPolicy(5.0, 600.0)
#: Failed attempts after which a drain (``--once``, the parent's exit) gives a push up.
GIVE_UP_AFTER = 3

Pushed = tuple[Manifest, "tuple[int, ...] | None", float]


def _source(ckpt: LocalCheckpoint) -> str:
    """Which stream of checkpoints ``ckpt`` belongs to: "" (native) or its zero-code rule."""
    return str(ckpt.manifest.source.get("rule") or "")


def _retryable(exc: BaseException) -> bool:
    return not isinstance(exc, CkptSyncError) or (isinstance(exc, RemoteError)
                                                  and exc.retryable)


@dataclass
class _Failure:
    error: str
    attempts: int
    retry_at: float
    retryable: bool = True  # the remote may be failing: its source waits for the back-off


class PushQueue:
    """Reconciles the local checkpoints with the remote, and runs their pushes.

    Args:
        config: the daemon's configuration.
        local: the watched directory's store; ``spool``: the zero-code spool.
        queue: the daemon's transfer queue.
        view: the remote's committed checkpoints.
        taker: the zero-code version taker (told when a spooled version is dropped).
        events, health: the event log, and where errors and the status go.
        post: puts a message on the dispatcher's queue (thread-safe).
        schedule: asks for a reconcile at a (monotonic) time.
        draining: whether the daemon is draining (``--once``, the parent exited).
    """

    def __init__(self, config: WatchConfig, store: RemoteStore, local: LocalStore,
                 spool: LocalStore, queue: TransferQueue, view: RemoteView, taker: VersionTaker,
                 events: EventLog, health: Health, *, post: Callable[[tuple[Any, ...]], None],
                 schedule: Callable[[float], None], draining: Callable[[], bool]) -> None:
        self.config = config
        self.store = store
        self.local = local
        self.spool = spool
        self.queue = queue
        self._view = view
        self._taker = taker
        self._events = events
        self._health = health
        self._post = post
        self._schedule = schedule
        self._draining = draining
        self.live: dict[str, TransferFuture[Pushed]] = {}  # name -> its push, waiting or running
        self.failed: dict[str, _Failure] = {}
        self.dropped: dict[str, str] = {}  # name -> why it is not pushed (gone)
        # Node parts uploaded, not committed: name -> (nodes missing, when to look again).
        self.waiting: dict[str, tuple[tuple[int, ...], float]] = {}
        self.skipped: set[str] = set()
        self.local_names: list[str] = []
        self.last_reconcile: float | None = None

    # ------------------------------------------------------------------ what it reports
    def pending(self) -> list[str]:
        """Local checkpoints the remote does not hold (nor will: retention, parts aside)."""
        done = self._view.committed.keys() | self.skipped | self.waiting.keys() \
            | self._view.retired
        return [n for n in self.local_names if n not in done]

    def outstanding(self) -> list[str]:
        """What is not committed remotely: like :meth:`pending`, but listed afresh (a version
        spooled since the last reconcile counts) and with the parts waiting for other nodes."""
        done = self._view.committed.keys() | self.skipped | self._view.retired
        return [c.name for c in self._local_checkpoints() if c.name not in done]

    def uploading(self) -> list[str]:
        """Pushes in the queue, not waiting for a retry's back-off."""
        return sorted(n for n in self.live if n not in self.failed)

    def idle(self) -> bool:
        """No push waiting or running."""
        return not self.live

    def drained(self) -> bool:
        """Nothing left to push (``--once`` gives up on failures after a few attempts)."""
        if self.uploading():
            return False
        if [n for n in self.pending() if n not in self.failed]:
            return False
        return all(f.attempts >= GIVE_UP_AFTER for f in self.failed.values())

    def next_retry(self) -> float | None:
        return min((f.retry_at for f in self.failed.values()), default=None)

    # ------------------------------------------------------------------ reconcile
    def _local_checkpoints(self) -> list[LocalCheckpoint]:
        out = self.local.list() + self.spool.list()
        out.sort(key=lambda c: c.manifest.sort_key())
        return out

    def reconcile(self, now: float) -> None:
        """Compare the local checkpoints with the remote's; offer each source's newest one
        the remote lacks to the queue."""
        drain = self._draining()
        local = self._local_checkpoints()
        self.local_names = [c.name for c in local]
        present = set(self.local_names)
        # A checkpoint deleted locally (the trainer's retention) can never be pushed: forget
        # its failure, or status and a drain would wait for it forever.
        for name in [n for n in self.failed if n not in present]:
            del self.failed[name]
        self.dropped = {n: why for n, why in self.dropped.items() if n in present}
        self.waiting = {n: w for n, w in self.waiting.items()
                        if n in present and n not in self._view.committed}
        doomed: set[str] = set()
        policy = self.config.policy
        if policy.active:
            union = {c.name: c.manifest for c in local}
            union.update(self._view.committed)
            # A local version not pushed yet gets its seq at its push: newer than any remote.
            infos = [CheckpointInfo(m.name, m.step, m.sort_key() if m.name in self._view.committed
                                    else pending_sort_key(m), m.metrics)
                     for m in union.values()]
            protect = resumed_from(self.local.directory)
            doomed = set(select_for_deletion(infos, policy, protect=[protect] if protect else []))
        self.skipped = {n for n in doomed if n not in self._view.committed}
        # One push per source runs at a time; the next is chosen when it ends (on_pushed asks
        # for a reconcile at once), so it is the source's newest then. Newest first, one
        # decision per source: a trainer saving faster than the link uploads never queues
        # pushes the newest has to wait behind, and the ones it deletes meanwhile are never
        # started. A newer checkpoint replaces one waiting for its retry's back-off (latest
        # wins), which then goes after the key's back-off.
        running = {f.transfer.key for f in self.queue.running()}
        decided: set[str] = set()
        for ckpt in reversed(local):
            name, src = ckpt.name, _source(ckpt)
            if (src in decided or name in self._view.committed or name in self.skipped
                    or name in self.dropped or name in self._view.retired):
                continue
            if name in self.live or src in running:
                decided.add(src)  # its push waits or runs; or the source's push runs
                continue
            waiting = self.waiting.get(name)
            if waiting is not None and (waiting[1] > now or drain):
                continue  # looked at again at the next periodic scan (not while draining)
            fail = self.failed.get(name)
            if fail is not None and drain and fail.attempts >= GIVE_UP_AFTER:
                continue  # draining (--once, or the parent exited): given up on
            if fail is not None and fail.retry_at > now:
                if fail.retryable:
                    decided.add(src)  # the remote is failing: the newest after its back-off
                continue
            self._submit(ckpt)
            decided.add(src)
        self.last_reconcile = time.time()

    def _submit(self, ckpt: LocalCheckpoint) -> None:
        def push(attempt: Attempt) -> Pushed:
            t0 = time.monotonic()
            self._events("info", "push_start", name=ckpt.name, step=ckpt.step,
                         bytes=ckpt.manifest.total_size)
            # Byte counts to the event log's listeners: the metrics' upload rate.
            m = self.store.push(ckpt, stop=attempt.stop, progress=self._events.progress(ckpt.name))
            # One node's part, not committed: which nodes' parts are missing.
            missing = self.store.waiting_for(m) if part_of(m) is not None else None
            return m, missing, time.monotonic() - t0

        fut = self.queue.submit(Transfer(
            _source(ckpt), push, name=ckpt.name, item=ckpt,
            retry=lambda e: self._retry(ckpt, e),
            failed=lambda f, e, delay: self._post(("push_failed", ckpt, e, delay))))
        self.live[ckpt.name] = fut
        fut.add_done_callback(lambda f: self._post(("pushed", f)))

    def _retry(self, ckpt: LocalCheckpoint, exc: BaseException) -> RetryPolicy | None:
        """The queue's question, in its thread: retry this failed push?"""
        if not _retryable(exc) or not (ckpt.path / MANIFEST_NAME).is_file():
            return None  # reported; a later reconcile offers it again (or it is gone)
        if isinstance(exc, CorruptCheckpointError):
            return None
        return RetryPolicy(RETRY.initial, RETRY.cap,
                           attempts=GIVE_UP_AFTER if self._draining() else None)

    # ------------------------------------------------------------------ outcomes
    def on_attempt_failed(self, ckpt: LocalCheckpoint, exc: BaseException,
                          delay: float | None, now: float) -> None:
        """A push attempt failed: report it (the outcome, if it is the last, follows)."""
        if self.queue.stop.is_set() or not (ckpt.path / MANIFEST_NAME).is_file():
            return  # abandoned at a stop, or deleted by the trainer: see on_pushed
        if isinstance(exc, CorruptCheckpointError) and ckpt.path.parent == self.spool.directory:
            return  # a spooled file rewritten in place: see on_pushed
        prev = self.failed.get(ckpt.name)
        attempts = (prev.attempts if prev else 0) + 1
        # Any error, of any type, once running: report it, keep syncing the rest, retry with
        # back-off (a later scan or a fixed remote may succeed). Errors a retry is unlikely to
        # fix (access denied, a conflicting remote checkpoint) back off longer.
        retryable = _retryable(exc)
        if delay is None:  # not retried by the queue: a later reconcile offers it again
            delay = (RETRY if retryable else RETRY_PERMANENT).delay(attempts)
            if self._draining() and attempts >= GIVE_UP_AFTER:
                self._clean_abandoned(ckpt.name)  # a drain gives this one up: clean up now
        error = f"{type(exc).__name__}: {exc}"
        self.failed[ckpt.name] = _Failure(error, attempts, now + delay, retryable)
        self._health.error(f"{ckpt.name}: {error}")
        self._events("warning" if retryable else "error", "push_failed", name=ckpt.name,
                     attempt=attempts, error=str(exc), error_type=type(exc).__name__,
                     retryable=retryable, retry_in_s=round(delay, 2))
        self._schedule(now + delay)

    def on_pushed(self, fut: TransferFuture[Pushed], now: float) -> None:
        """A push's outcome (on the dispatcher thread)."""
        ckpt: LocalCheckpoint = fut.transfer.item
        if self.live.get(ckpt.name) is fut:
            del self.live[ckpt.name]
        if fut.outcome in ("superseded", "cancelled"):
            self._schedule(now)  # offered again, after the newer one, by a reconcile
            return
        self._schedule(now)  # the source's next (newest) checkpoint may be waiting for this one
        if fut.outcome == "done":
            m, missing, seconds = fut.result()
            if missing is not None:
                self._on_part_pushed(ckpt, missing, now)
                return
            if part_of(m) is not None:  # another node committed it meanwhile
                m = part_of(m).whole  # type: ignore[union-attr]
            self.waiting.pop(m.name, None)
            self._view.add(m)
            self.failed.pop(ckpt.name, None)
            self._events("info", "pushed", name=m.name, step=m.step, bytes=m.total_size,
                         seconds=round(seconds, 3), source=m.source.get("kind", "native"))
            if self.config.policy.active:
                self._view.want_retention()
            if ckpt.path.parent == self.spool.directory:
                self._prune_spool(m)
            return
        exc = fut.error
        if self.queue.stop.is_set():
            self._events("warning", "push_abandoned", name=ckpt.name,
                         detail="stopped before its commit: nothing partial is visible")
            self._clean_abandoned(ckpt.name)
            return
        if not (ckpt.path / MANIFEST_NAME).is_file():
            # Deleted by the trainer (its own retention) before or while it was uploaded: not
            # a failure, and nothing to retry. The push never committed it.
            self.failed.pop(ckpt.name, None)
            self.dropped[ckpt.name] = "gone"
            self._events("info", "push_dropped", name=ckpt.name, step=ckpt.step, reason="gone",
                         detail="deleted locally during its upload; nothing was committed")
            return
        if isinstance(exc, CorruptCheckpointError) and ckpt.path.parent == self.spool.directory:
            self._drop_changed_spool(ckpt, exc)
        # Otherwise on_attempt_failed has reported it; a later reconcile offers it again.

    def _on_part_pushed(self, ckpt: LocalCheckpoint, missing: tuple[int, ...],
                        now: float) -> None:
        """This node's part of ``ckpt`` is uploaded, the whole is not committed: not synced."""
        first = ckpt.name not in self.waiting
        self.waiting[ckpt.name] = (missing, now + self.config.interval / 2)  # next scan
        self.failed.pop(ckpt.name, None)
        if first:
            self._events("warning", "part_pushed", name=ckpt.name, step=ckpt.step,
                         waiting_for_nodes=list(missing),
                         detail=f"part uploaded, waiting for nodes {list(missing)}: not "
                         "restorable until every node's part is uploaded (the last one commits)")

    def _drop_changed_spool(self, ckpt: LocalCheckpoint, exc: BaseException) -> None:
        """A spooled version no longer matches its manifest: a file hard-linked into the spool
        was rewritten in place by the trainer since (the upload refused it: nothing was
        committed). Not a failure to retry: drop it; the rewrite is the rule's next version."""
        self.failed.pop(ckpt.name, None)
        self.dropped[ckpt.name] = "changed"
        self._clean_abandoned(ckpt.name)
        self.spool.delete(ckpt.name)
        self._taker.forget(signature_of(ckpt.manifest))
        self._events("warning", "push_dropped", name=ckpt.name, step=ckpt.step,
                     reason="changed", error=str(exc), note="the trainer rewrote a spooled file "
                     "in place during its upload: never committed; its next version will be "
                     "taken")

    def _clean_abandoned(self, name: str) -> None:
        """Remove what an abandoned push of ``name`` wrote (its files, its unfinished
        multipart uploads), now rather than at ``gc``'s grace period. Only names this daemon
        pushed, only while uncommitted (:meth:`RemoteStore.abandon` refuses a committed one).
        Best effort: what is left is still ``gc``'s."""
        try:
            removed = self.store.abandon(name)
        except CkptSyncError as e:
            self._events("warning", "cleanup_failed", name=name, error=str(e),
                         note="gc collects it after its grace period")
            return
        if removed:
            self._events("info", "cleaned_up", name=name, removed=removed)

    def _prune_spool(self, pushed: Manifest) -> None:
        """Keep the newest spooled version of a rule; older ones are superseded."""
        rule = pushed.source.get("rule")
        for c in self.spool.list():
            if (c.manifest.source.get("rule") == rule and c.name != pushed.name
                    and parse_name(c.name) is not None
                    and c.manifest.sort_key() < pushed.sort_key()
                    and c.name not in self.live):
                self.spool.delete(c.name)
                if self.failed.pop(c.name, None) is not None:
                    self._clean_abandoned(c.name)  # superseded: its failed attempts' leftovers
