"""The daemon's reconcile and pushes: what the remote lacks is pushed, newest first.

A mixin of :class:`~ckptsync.daemon.watcher.Watcher`. A reconcile lists the committed local
checkpoints (the native ones and the zero-code versions in the spool) and pushes those the
remote does not hold, newest first, one push in flight per source (the native checkpoints;
each zero-code rule). A failed push is reported and retried with back-off; one the trainer
deleted meanwhile is dropped; one abandoned at a stop is cleaned up.

A push of one node's part of a multi-node checkpoint (:mod:`ckptsync.parts`) that finds
other nodes' parts missing is not a sync: the checkpoint is "waiting for nodes" (status),
and each reconcile (every ``interval``) pushes it again, which commits it where every part
is there and is a no-op once it is committed; it is synced once its whole manifest is.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Any

from ckptsync.daemon.versions import signature_of
from ckptsync.daemon.watcher_remote import RemoteView
from ckptsync.daemon.watcher_state import _Failure
from ckptsync.errors import CkptSyncError, CorruptCheckpointError, RemoteError
from ckptsync.local import LocalCheckpoint
from ckptsync.manifest import MANIFEST_NAME, Manifest, parse_name, pending_sort_key
from ckptsync.parts import part_of
from ckptsync.retention import CheckpointInfo, select_for_deletion
from ckptsync.transfer import backoff

__all__ = ["PushPipeline"]

_REMOTE_REFRESH_S = 60.0


def _source(ckpt: LocalCheckpoint) -> str:
    """Which stream of checkpoints ``ckpt`` belongs to: "" (native) or its zero-code rule."""
    return str(ckpt.manifest.source.get("rule") or "")


class PushPipeline(RemoteView):
    """Reconciles local checkpoints with the remote and runs their pushes."""

    # ------------------------------------------------------------------ reconcile
    def _local_checkpoints(self) -> list[LocalCheckpoint]:
        out = self.local.list() + self.spool.list()
        out.sort(key=lambda c: c.manifest.sort_key())
        return out

    def _reconcile(self) -> None:
        now = time.monotonic()
        self._reconcile_at = now + self.config.interval
        if now - self._remote_refreshed > max(_REMOTE_REFRESH_S, 12 * self.config.interval) \
                and not self._inflight and not self._retention_running:
            self._refresh_remote()
            if self._fatal:
                return
        local = self._local_checkpoints()
        self._local_names = [c.name for c in local]
        present = set(self._local_names)
        # A checkpoint deleted locally (the trainer's retention) can never be pushed: forget
        # its failure, or status and a drain would wait for it forever.
        for name in [n for n in self._failed if n not in present]:
            del self._failed[name]
        self._dropped = {n: why for n, why in self._dropped.items() if n in present}
        self._waiting = {n: w for n, w in self._waiting.items()
                         if n in present and n not in self._remote}
        doomed: set[str] = set()
        policy = self.config.policy
        if policy.active:
            union = {c.name: c.manifest for c in local}
            union.update(self._remote)
            # A local version not pushed yet gets its seq at its push: newer than any remote.
            infos = [CheckpointInfo(m.name, m.step, m.sort_key() if m.name in self._remote
                                    else pending_sort_key(m), m.metrics)
                     for m in union.values()]
            doomed = set(select_for_deletion(infos, policy, protect=self._protected()))
        self._skipped = {n for n in doomed if n not in self._remote}
        # Newest first, one push in flight per source: a trainer saving faster than the link
        # uploads never queues pushes the newest has to wait behind, and the ones it deletes
        # meanwhile are never started.
        busy = set(self._inflight_src.values())
        for ckpt in reversed(local):
            name, src = ckpt.name, _source(ckpt)
            if (src in busy or name in self._remote or name in self._inflight
                    or name in self._skipped or name in self._dropped):
                continue
            waiting = self._waiting.get(name)
            if waiting is not None and (waiting[1] > now or self._drain):
                continue  # looked at again at the next periodic scan (not while draining)
            fail = self._failed.get(name)
            if fail is not None and self._drain and fail.attempts >= 3:
                continue  # draining (--once, or the parent exited): given up on
            if fail is not None and fail.retry_at > now:
                if fail.retryable:
                    busy.add(src)  # the remote is failing: retry the newest after its back-off
                continue
            self._submit_push(ckpt)
            busy.add(src)
        self._last_reconcile = time.time()
        self._write_status()

    def _submit_push(self, ckpt: LocalCheckpoint) -> None:
        t0 = time.monotonic()
        self.events("info", "push_start", name=ckpt.name, step=ckpt.step,
                    bytes=ckpt.manifest.total_size)

        def job() -> tuple[Manifest, tuple[int, ...] | None]:
            m = self.store.push(ckpt, stop=self._abort)
            # One node's part, not committed: which nodes' parts are missing.
            return m, self.store.waiting_for(m) if part_of(m) is not None else None

        fut = self._pool.submit(job)
        self._inflight[ckpt.name] = fut
        self._inflight_src[ckpt.name] = _source(ckpt)
        fut.add_done_callback(lambda f: self._q.put(("pushed", ckpt, (f, t0))))

    def _on_pushed(self, ckpt: LocalCheckpoint, info: tuple[Future[Any], float],
                   now: float) -> None:
        fut, t0 = info
        self._inflight.pop(ckpt.name, None)
        self._inflight_src.pop(ckpt.name, None)
        if fut.cancelled():
            return
        self._schedule(now)  # the source's next (newest) checkpoint may be waiting for this one
        exc = fut.exception()
        if exc is None:
            m, missing = fut.result()
            if missing is not None:
                self._on_part_pushed(ckpt, m, missing, now)
                return
            if part_of(m) is not None:  # another node committed it meanwhile
                m = part_of(m).whole  # type: ignore[union-attr]
            self._waiting.pop(m.name, None)
            self._remote[m.name] = m
            self._failed.pop(ckpt.name, None)
            self.events("info", "pushed", name=m.name, step=m.step, bytes=m.total_size,
                        seconds=round(now - t0, 3),
                        source=m.source.get("kind", "native"))
            self._retention_due = self.config.policy.active
            if ckpt.path.parent == self.spool.directory:
                self._prune_spool(m)
            self._write_status()
            return
        if self._abort.is_set():
            self.events("warning", "push_abandoned", name=ckpt.name,
                        detail="stopped before its commit: nothing partial is visible")
            self._clean_abandoned(ckpt.name)
            return
        if not (ckpt.path / MANIFEST_NAME).is_file():
            # Deleted by the trainer (its own retention) before or while it was uploaded: not
            # a failure, and nothing to retry. The push never committed it.
            self._failed.pop(ckpt.name, None)
            self._dropped[ckpt.name] = "gone"
            self.events("info", "push_dropped", name=ckpt.name, step=ckpt.step, reason="gone",
                        detail="deleted locally during its upload; nothing was committed")
            self._write_status()
            return
        if isinstance(exc, CorruptCheckpointError) and ckpt.path.parent == self.spool.directory:
            self._drop_changed_spool(ckpt, exc)
            return
        prev = self._failed.get(ckpt.name)
        attempts = (prev.attempts if prev else 0) + 1
        # Any error, of any type, once running: report it, keep syncing the rest, retry with
        # back-off (a later scan or a fixed remote may succeed). Errors a retry is unlikely to
        # fix (access denied, a conflicting remote checkpoint) back off longer.
        retryable = not isinstance(exc, CkptSyncError) or (
            isinstance(exc, RemoteError) and exc.retryable)
        if self._drain and attempts >= 3:  # a drain gives this one up: clean up after it now
            self._clean_abandoned(ckpt.name)
        delay = backoff(attempts, 1.0, 120.0) if retryable \
            else backoff(attempts, 5.0, 600.0)
        error = f"{type(exc).__name__}: {exc}"
        self._failed[ckpt.name] = _Failure(error, attempts, now + delay, retryable)
        self._last_error = f"{ckpt.name}: {error}"
        self._any_failed_once = True
        self.events("warning" if retryable else "error", "push_failed", name=ckpt.name,
                    attempt=attempts, error=str(exc), error_type=type(exc).__name__,
                    retryable=retryable, retry_in_s=round(delay, 2))
        self._schedule(now + delay)
        self._write_status()

    def _on_part_pushed(self, ckpt: LocalCheckpoint, part: Manifest, missing: tuple[int, ...],
                        now: float) -> None:
        """This node's part of ``ckpt`` is uploaded, the whole is not committed: not synced."""
        first = ckpt.name not in self._waiting
        self._waiting[ckpt.name] = (missing, now + self.config.interval / 2)  # next scan
        self._failed.pop(ckpt.name, None)
        if first:
            self.events("warning", "part_pushed", name=ckpt.name, step=ckpt.step,
                        waiting_for_nodes=list(missing),
                        detail=f"part uploaded, waiting for nodes {list(missing)}: not "
                        "restorable until every node's part is uploaded (the last one commits)")
        self._write_status()

    def _drop_changed_spool(self, ckpt: LocalCheckpoint, exc: BaseException) -> None:
        """A spooled version no longer matches its manifest: a file hard-linked into the spool
        was rewritten in place by the trainer since (the upload refused it: nothing was
        committed). Not a failure to retry: drop it; the rewrite is the rule's next version."""
        self._failed.pop(ckpt.name, None)
        self._dropped[ckpt.name] = "changed"
        self._clean_abandoned(ckpt.name)
        self.spool.delete(ckpt.name)
        dropped = signature_of(ckpt.manifest)
        for tr in self._trackers:
            if tr.last_signature == dropped:
                tr.last_signature = ()  # the same bytes again would be a version to take
        self.events("warning", "push_dropped", name=ckpt.name, step=ckpt.step, reason="changed",
                    error=str(exc), note="the trainer rewrote a spooled file in place during "
                    "its upload: never committed; its next version will be taken")
        self._write_status()

    def _clean_abandoned(self, name: str) -> None:
        """Remove what an abandoned push of ``name`` wrote (its files, its unfinished
        multipart uploads), now rather than at ``gc``'s grace period. Only names this daemon
        pushed, only while uncommitted (:meth:`RemoteStore.abandon` refuses a committed one).
        Best effort: what is left is still ``gc``'s."""
        try:
            removed = self.store.abandon(name)
        except CkptSyncError as e:
            self.events("warning", "cleanup_failed", name=name, error=str(e),
                        note="gc collects it after its grace period")
            return
        if removed:
            self.events("info", "cleaned_up", name=name, removed=removed)

    def _prune_spool(self, pushed: Manifest) -> None:
        """Keep the newest spooled version of a rule; older ones are superseded."""
        rule = pushed.source.get("rule")
        for c in self.spool.list():
            if (c.manifest.source.get("rule") == rule and c.name != pushed.name
                    and parse_name(c.name) is not None
                    and c.manifest.sort_key() < pushed.sort_key()
                    and c.name not in self._inflight):
                self.spool.delete(c.name)
                if self._failed.pop(c.name, None) is not None:
                    self._clean_abandoned(c.name)  # superseded: its failed attempts' leftovers

