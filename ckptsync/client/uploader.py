"""The in-process upload of a :class:`~ckptsync.client.Checkpointer` with a remote.

The pushes go through one :class:`~ckptsync.transfer.queue.TransferQueue` with one thread,
keyed by the checkpoint stream: newest first, with a bounded backlog, at most one push in
flight and one checkpoint pending. A newer checkpoint replaces the pending one, which is then
never uploaded and becomes an ordinary local checkpoint (local retention may delete it), so
however slow or down the remote is, the trainer's disk holds at most the retained
checkpoints plus these two. A failed push is retried by the queue's one policy
(``TransferConfig``'s ``backoff_initial``/``backoff_max``), moving on to a newer checkpoint
when one arrives; a retry first reads the remote (the last try may have committed it).
Nothing is raised into the training loop unless ``on_error="raise"``. The queue's thread
stops through its ``Event``; an abandoned push is never committed.

With an :class:`~ckptsync.remote.process.UploadProcess` each push runs there, off the
trainer's GIL and CPU priority (the queue, retries, status and retention stay here); nothing
is then streamed while written (a push with streams already started runs here).

One node's part of a multi-node checkpoint (:mod:`ckptsync.parts`) is not remote once it is
uploaded: it is restorable only when the node that uploads last commits the whole. Until the
queue's look sees the whole manifest remote (a transfer of its own key, retried with the
queue's back-off until nothing waits), such a checkpoint is listed in
``SyncStatus.waiting_for_nodes``, never as ``newest_remote``.

Example::

    up = Uploader(store, on_error="warn", after_push=lambda m: None)
    up.offer(local_checkpoint)      # from the save thread, after the local commit
    up.wait_idle(timeout=60)        # True once the newest checkpoint is remote
    not_remote = up.close()         # stop; names of what was left off the remote
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Literal

from ckptsync.client.syncstatus import SyncStatus, waiting_line, waiting_reason
from ckptsync.errors import CkptSyncError, ConfigError, RemoteError
from ckptsync.local import LocalCheckpoint
from ckptsync.manifest import Manifest
from ckptsync.parts import part_of
from ckptsync.transfer import stopping
from ckptsync.transfer.queue import Attempt, Transfer, TransferFuture, TransferQueue
from ckptsync.transfer.retry import RetryPolicy

if TYPE_CHECKING:
    from ckptsync.remote import RemoteStore
    from ckptsync.remote.process import UploadProcess
    from ckptsync.transfer import MultipartStream

__all__ = ["ON_REMOTE_ERROR", "Uploader"]

log = logging.getLogger("ckptsync")

OnRemoteError = Literal["warn", "raise"]
ON_REMOTE_ERROR: tuple[OnRemoteError, ...] = ("warn", "raise")
STOP_GRACE_S = 10.0
"""How long :meth:`Uploader.close` waits for a stopped push to unwind (one network call)."""
MAX_WAITING = 16
"""Parts waiting for other nodes that the uploader keeps looking at (the newest ones)."""
RECHECK_MAX_S = 5.0
"""The longest pause between two looks at a part waiting for other nodes."""


class _Job:
    def __init__(self, ckpt: LocalCheckpoint, streams: Mapping[str, MultipartStream] | None,
                 seq: int) -> None:
        self.ckpt = ckpt
        self.streams = dict(streams or {})
        self.seq = seq  # commit order


class _StillWaiting(Exception):
    """Parts of checkpoints are still waiting for other nodes: look again later."""


class _Activity:
    """A push's progress sink: records when bytes last moved."""

    def __init__(self, owner: Uploader) -> None:
        self._owner = owner

    def start(self, total: int, description: str) -> None:
        self._owner._moved()

    def update(self, n: int) -> None:
        if n > 0:
            self._owner._moved()

    def close(self) -> None:
        pass


_PUSH = "checkpoints"  # the queue key of the pushes: one stream of checkpoints
_NODES = "nodes"  # the queue key of the looks at parts waiting for other nodes


class Uploader:
    """Pushes committed checkpoints to ``remote``: one in flight, one pending, newest wins.

    Args:
        remote: the store to push to.
        on_error: ``"warn"`` (default): log failures, retry with back-off, never raise;
            ``"raise"``: no retry, the failure is raised once by :meth:`raise_error`.
        after_push: called in the upload thread after each successful push, while the pushed
            checkpoint still counts as in flight (remote and local retention).
        process: push in this upload process (None: in the upload thread); closed by
            :meth:`close`.

    Raises:
        ConfigError: ``on_error`` is neither "warn" nor "raise".
    """

    def __init__(self, remote: RemoteStore, *, on_error: str = "warn",
                 after_push: Callable[[Manifest], None] | None = None,
                 process: UploadProcess | None = None) -> None:
        if on_error not in ON_REMOTE_ERROR:
            raise ConfigError(f"on_remote_error must be one of {list(ON_REMOTE_ERROR)}, "
                              f"got {on_error!r}")
        self.remote = remote
        self.on_error = on_error
        self._after_push = after_push
        self.process = process
        cfg = remote.config  # at least 0.1 s: a dead remote is never spun on
        self._policy = RetryPolicy(max(cfg.backoff_initial, 0.1), max(cfg.backoff_max, 0.1))
        self._recheck_policy = RetryPolicy(self._policy.initial,
                                           min(self._policy.cap, RECHECK_MAX_S))
        self._queue = TransferQueue(1, name="ckptsync-upload")
        self._cond = threading.Condition()
        self._to_abort: list[MultipartStream] = []
        self._superseded = 0
        self._last_error: str | None = None
        self._last_error_time: float | None = None
        self._undelivered: CkptSyncError | None = None
        self._newest_local: tuple[str, int | None] | None = None
        self._newest_remote: tuple[str, int | None] | None = None
        self._local_dir = ""
        self._seq = 0  # checkpoints offered so far
        self._remote_seq = 0  # the commit order of the newest one pushed
        self._not_remote: tuple[str, ...] = ()
        self._not_remote_why: dict[str, str] = {}
        # Parts uploaded, not committed: name -> (its part manifest, commit order, the nodes
        # still missing); looked at again by the queue's ``_NODES`` transfer.
        self._waiting: dict[str, tuple[Manifest, int, tuple[int, ...]]] = {}
        self._last_progress = time.monotonic()
        self._closed = False

    # ------------------------------------------------------------------ the save side
    def offer(self, ckpt: LocalCheckpoint,
              streams: Mapping[str, MultipartStream] | None = None) -> None:
        """Queue a just-committed checkpoint; it replaces the pending one, if any."""
        with self._cond:
            self._seq += 1
            job = _Job(ckpt, streams, self._seq)
            closed = self._closed
            if closed:
                self._to_abort.extend(job.streams.values())
            else:
                self._newest_local = (ckpt.name, ckpt.step)
                self._local_dir = str(ckpt.path.parent)
        if closed:
            self._abort_streams()
            return
        fut = self._queue.submit(Transfer(_PUSH, partial(self._push, job), name=ckpt.name,
                                          retry=self._retry, failed=self._failed, item=job))
        fut.add_done_callback(self._pushed)

    def ready_to_stream(self) -> bool:
        """Whether a checkpoint written now would be pushed at once by a healthy remote: only
        then is it worth sending its bytes while they are written (a stream would otherwise
        compete with the push in flight, or start uploads on a failing remote that the push
        would then drop). A stream never makes the save wait: where the link falls behind,
        the rest of the file goes up from the committed file."""
        if self.process is not None and self.process.usable:
            return False  # the process uploads from the committed files
        in_flight, pending = self._jobs()
        with self._cond:
            closed = self._closed
        return (not closed and in_flight is None and pending is None
                and self._queue.failures(_PUSH) == 0)

    def protected(self) -> set[str]:
        """The checkpoints local retention must keep: the one in flight and the pending one."""
        return {j.ckpt.name for j in self._jobs() if j is not None}

    def lagging(self) -> bool:
        """True when the remote is failing, or a checkpoint already waits behind the one in
        flight (the next save will supersede it): the remote cannot keep up."""
        in_flight, pending = self._jobs()
        return self._queue.failures(_PUSH) > 0 or (pending is not None
                                                    and in_flight is not None)

    def raise_error(self) -> None:
        """With ``on_error="raise"``: raise a failed push's error, once."""
        with self._cond:
            err, self._undelivered = self._undelivered, None
        if err is not None:
            raise err

    def status(self) -> SyncStatus:
        """A snapshot of where the upload stands."""
        from ckptsync.remote import redact_url

        in_flight, pending = self._jobs()
        failures = self._queue.failures(_PUSH)
        with self._cond:
            local, remote = self._newest_local, self._newest_remote
            return SyncStatus(
                remote=redact_url(self.remote.url),
                newest_local=local[0] if local else None,
                newest_local_step=local[1] if local else None,
                newest_remote=remote[0] if remote else None,
                newest_remote_step=remote[1] if remote else None,
                in_flight=in_flight.ckpt.name if in_flight else None,
                pending=pending.ckpt.name if pending else None,
                behind=local is not None and (remote is None or remote[0] != local[0]),
                superseded=self._superseded,
                consecutive_failures=failures,
                last_error=self._last_error,
                last_error_time=self._last_error_time,
                not_remote=self._not_remote,
                not_remote_why=dict(self._not_remote_why),
                waiting_for_nodes={n: w[2] for n, w in self._waiting.items()},
                upload_pid=self.process.pid if self.process is not None else None,
            )

    def _jobs(self) -> tuple[_Job | None, _Job | None]:
        """The push in flight and the pending one (waiting, maybe for its back-off)."""
        running = [f.transfer.item for f in self._queue.running() if f.transfer.key == _PUSH]
        waiting = [f.transfer.item for f, _ in self._queue.waiting() if f.transfer.key == _PUSH]
        return (running[0] if running else None), (waiting[0] if waiting else None)

    # ------------------------------------------------------------------ waiting, stopping
    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing is in flight or pending; True if so.

        Gives up (False) once ``timeout`` seconds have passed and the remote is failing or has
        made no progress for ``timeout`` seconds: a healthy upload that is still sending is
        waited for. With ``on_error="raise"`` a failure ends the wait (``raise_error`` has it).
        """
        start = time.monotonic()
        with self._cond:
            # The newest checkpoint is remote only once committed: a part of it is not enough.
            while any(self._jobs()) or self._remote_seq < self._seq:
                if self._undelivered is not None or self._closed:
                    return False
                if self._queue.idle() and self._queue.failures(_PUSH) > 0:
                    return False  # the last push failed for good: nothing will change
                now = time.monotonic()
                if now - start >= timeout and (
                        self._queue.failures(_PUSH) > 0 or now - self._last_progress >= timeout):
                    return False
                self._cond.wait(min(0.5, max(0.01, start + timeout - now)))
            return True

    def close(self) -> tuple[str, ...]:
        """Stop the upload thread (an unfinished push is abandoned, never committed); return
        the names of the queued checkpoints left off the remote, and log them. Idempotent."""
        with self._cond:
            if self._closed:
                return self._not_remote
            self._closed = True
        queued = {j.seq: j.ckpt.name for j in self._jobs() if j is not None}
        with self._cond:
            if self._newest_local is not None:
                queued.setdefault(self._seq, self._newest_local[0])
            self._cond.notify_all()
        self._queue.close()  # the pending push: cancelled (its streams are aborted below)
        self._queue.abort()
        if not self._queue.join(STOP_GRACE_S):
            log.error("the upload to %s did not stop within %.0fs of close(); abandoning "
                      "it (it will not be committed)", self.remote.url, STOP_GRACE_S)
        self._abort_streams()
        if self.process is not None:
            self.process.close()
        with self._cond:
            # Pushed in commit order: all up to the newest one pushed are there or superseded.
            left = tuple(n for seq, n in sorted(queued.items()) if seq > self._remote_seq)
            self._not_remote = left
            self._not_remote_why = {
                n: waiting_reason(self._waiting[n][2]) if n in self._waiting
                else "its upload did not finish before close()" for n in left}
        if left:
            url = self.status().remote
            log.error("closing with checkpoints not on the remote %s: %s (it holds %s); they "
                      "stay in %s: upload them later with `ckptsync push %s %s`",
                      url, ", ".join(f"{n} ({why})" for n, why in self._not_remote_why.items()),
                      self._newest_remote[0] if self._newest_remote else "none of this run's",
                      self._local_dir, self._local_dir, url)
        return left

    # ------------------------------------------------------------------ the queue's side
    def _moved(self) -> None:
        self._last_progress = time.monotonic()

    def _abort_streams(self) -> None:
        with self._cond:
            streams, self._to_abort = self._to_abort, []
        for s in streams:
            s.abort()

    def _retry(self, exc: BaseException) -> RetryPolicy | None:
        return None if self.on_error == "raise" else self._policy

    def _push(self, job: _Job, attempt: Attempt) -> Manifest | None:
        """One attempt at ``job`` (in the queue's thread): push it, then ``after_push``
        while it still counts as in flight. None: one node's part only."""
        self._abort_streams()  # those of the checkpoints this one superseded
        self._moved()
        streams, job.streams = job.streams, {}  # completed or aborted by this attempt
        # A first try of a checkpoint named here skips the look for a committed copy; a
        # retry looks (the last try may have committed it).
        there = self.process if (self.process is not None and not streams
                                 and self.process.available()) else self.remote
        manifest = there.push(job.ckpt, streams=streams, stop=attempt.stop,
                              progress=_Activity(self), fresh=attempt.first)
        if part_of(manifest) is not None:  # only this node's part: not restorable yet
            self._part_uploaded(job, manifest)
            return None
        recovered = self._queue.failures(_PUSH)  # reset once this attempt returns
        with self._cond:
            self._committed(manifest, job.seq)
        self._moved()
        if recovered:
            log.warning("remote %s is reachable again: %s committed after %d failed uploads",
                        self.remote.url, manifest.name, recovered)
        if self._after_push is not None:
            try:
                with stopping(attempt.stop):
                    self._after_push(manifest)
            except Exception as e:  # retention is retried after the next push
                log.warning("after uploading %s: %s", job.ckpt.name, e)
        return manifest

    def _pushed(self, fut: TransferFuture[Manifest | None]) -> None:
        """A push's outcome (in the queue's thread, or the one that superseded it)."""
        job: _Job = fut.transfer.item
        with self._cond:
            closed = self._closed
            if fut.outcome == "superseded":
                self._superseded += 1
                self._to_abort.extend(job.streams.values())  # aborted by the next push
                why = ("its upload failed and a newer one is pending" if fut.error is not None
                       else "a newer one replaced it")
                log.info("not uploading %s: %s", job.ckpt.name, why)
            elif fut.outcome == "cancelled":
                self._to_abort.extend(job.streams.values())
            self._cond.notify_all()
        if closed:  # no push comes to abort them: the closing thread does
            self._abort_streams()

    def _committed(self, manifest: Manifest, seq: int) -> None:
        """``manifest`` (commit order ``seq``) is committed remotely (the lock is held)."""
        if seq > self._remote_seq:
            self._newest_remote = (manifest.name, manifest.step)
            self._remote_seq = seq
        # Parts of older checkpoints still waiting are superseded by this one.
        self._waiting = {n: w for n, w in self._waiting.items() if w[1] > seq}
        self._cond.notify_all()

    def _part_uploaded(self, job: _Job, part: Manifest) -> None:
        """The push of ``job`` uploaded this node's part only; the whole is not committed."""
        name = job.ckpt.name
        try:
            missing = self.remote.waiting_for(part)
        except Exception as e:  # the next look tells; the thread must never die of it
            log.warning("after uploading this node's part of %s: %s", name, e)
            missing = ()
        with self._cond:
            self._moved()
            if missing is None:  # another node committed it meanwhile
                self._committed(part_of(part).whole, job.seq)  # type: ignore[union-attr]
            else:
                self._waiting[name] = (part, job.seq, missing)
                for old in sorted(self._waiting, key=lambda n: self._waiting[n][1])[
                        :-MAX_WAITING]:
                    del self._waiting[old]
            self._cond.notify_all()
        if missing is not None:
            log.warning("%s (remote %s)", waiting_line(name, missing), self.remote.url)
            self._queue.submit(Transfer(_NODES, self._recheck, name="parts waiting for nodes",
                                        retry=self._recheck_retry))

    def _recheck_retry(self, exc: BaseException) -> RetryPolicy | None:
        return self._recheck_policy

    def _recheck(self, attempt: Attempt) -> None:
        """Look again at the parts waiting for other nodes: committed ones become remote.

        Raises:
            _StillWaiting: some still wait (the queue looks again after its back-off).
        """
        with self._cond:
            waiting = list(self._waiting.items())
        seen: dict[str, tuple[int, ...] | None] = {}
        for name, (part, _, _) in waiting:
            try:
                with stopping(attempt.stop):
                    seen[name] = self.remote.waiting_for(part)
            except Exception as e:  # looked at again later; the thread must never die of it
                log.warning("looking whether %s is committed: %s; looking again later", name, e)
        with self._cond:
            for name, missing in sorted(seen.items(), key=lambda x: self._order(x[0])):
                if name not in self._waiting:
                    continue
                part, seq, _ = self._waiting[name]
                if missing is None:
                    log.info("%s is committed on %s: every node's part is there", name,
                             self.remote.url)
                    self._committed(part_of(part).whole, seq)  # type: ignore[union-attr]
                else:
                    self._waiting[name] = (part, seq, missing)
            self._cond.notify_all()
            if self._waiting:
                raise _StillWaiting(", ".join(self._waiting))

    def _order(self, name: str) -> int:
        w = self._waiting.get(name)
        return w[1] if w is not None else 0

    def _failed(self, fut: TransferFuture[Manifest | None], e: BaseException,
                delay: float | None) -> None:
        """A push attempt failed (in the queue's thread); ``delay``: when the newest
        checkpoint is tried again (None: not retried)."""
        name = fut.transfer.name
        if self._queue.stop.is_set():  # abandoned by close(): not a failure of the remote
            return
        err = e if isinstance(e, CkptSyncError) else RemoteError(
            f"uploading {name} to {self.remote.url} failed: {type(e).__name__}: {e}")
        failures = self._queue.failures(_PUSH)
        with self._cond:
            self._last_error = str(err)
            self._last_error_time = time.time()
            if self.on_error == "raise":
                self._undelivered = err
            self._cond.notify_all()
        retryable = isinstance(err, RemoteError) and err.retryable
        level = logging.WARNING if retryable else logging.ERROR
        if self.on_error == "raise":
            log.log(level, "uploading %s failed: %s", name, err,
                    exc_info=not isinstance(e, CkptSyncError))
        else:
            log.log(level, "uploading %s failed (%d in a row): %s; retrying the newest "
                    "checkpoint in %.1fs; training and local saves go on", name,
                    failures, err, delay or 0.0, exc_info=not isinstance(e, CkptSyncError))

