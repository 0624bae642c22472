"""The in-process upload of a :class:`~ckptsync.client.Checkpointer` with a remote.

One thread pushes committed checkpoints, newest first, with a bounded backlog: at most one
push in flight and one checkpoint pending. A newer checkpoint replaces the pending one, which
is then never uploaded and becomes an ordinary local checkpoint (local retention may delete
it), so however slow or down the remote is, the trainer's disk holds at most the retained
checkpoints plus these two. A failed push is retried with back-off (``TransferConfig``'s
``backoff_initial``/``backoff_max``), moving on to a newer checkpoint when one arrives;
nothing is raised into the training loop unless ``on_error="raise"``. Every thread stops
through an ``Event``; an abandoned push is never committed.

One node's part of a multi-node checkpoint (:mod:`ckptsync.parts`) is not remote once it is
uploaded: it is restorable only when the node that uploads last commits the whole. Until the
thread sees the whole manifest remote (it looks again, with back-off, between pushes), such a
checkpoint is listed in ``SyncStatus.waiting_for_nodes``, never as ``newest_remote``.

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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from ckptsync.errors import CkptSyncError, ConfigError, RemoteError
from ckptsync.local import LocalCheckpoint
from ckptsync.manifest import Manifest
from ckptsync.parts import part_of
from ckptsync.transfer import backoff, stopping

if TYPE_CHECKING:
    from ckptsync.remote import RemoteStore
    from ckptsync.transfer import MultipartStream

__all__ = ["ON_REMOTE_ERROR", "SyncStatus", "Uploader"]

log = logging.getLogger("ckptsync")

OnRemoteError = Literal["warn", "raise"]
ON_REMOTE_ERROR: tuple[OnRemoteError, ...] = ("warn", "raise")
STOP_GRACE_S = 10.0
"""How long :meth:`Uploader.close` waits for a stopped push to unwind (one network call)."""
MAX_WAITING = 16
"""Parts waiting for other nodes that the uploader keeps looking at (the newest ones)."""
RECHECK_MAX_S = 5.0
"""The longest pause between two looks at a part waiting for other nodes."""


@dataclass(frozen=True, repr=False)
class SyncStatus:
    """Where a checkpointer's upload to its remote stands (``Checkpointer.status()``).

    ``newest_remote`` is the newest checkpoint this checkpointer committed remotely (None before
    its first). ``behind`` is True while the newest checkpoint saved is not yet remote.
    ``superseded`` counts checkpoints never uploaded because a newer one replaced them.
    ``not_remote`` names what ``close()`` left off the remote (it stays on the local disk),
    ``not_remote_why`` says why for each.
    ``waiting_for_nodes`` maps each checkpoint of which this node's part is uploaded but
    which is not committed (not restorable) to the nodes whose part is missing (empty while
    the last node's commit is under way); it becomes ``newest_remote`` once committed.
    """

    remote: str | None = None
    newest_local: str | None = None
    newest_local_step: int | None = None
    newest_remote: str | None = None
    newest_remote_step: int | None = None
    in_flight: str | None = None
    pending: str | None = None
    behind: bool = False
    superseded: int = 0
    consecutive_failures: int = 0
    last_error: str | None = None
    last_error_time: float | None = None
    """``time.time()`` of ``last_error``."""
    not_remote: tuple[str, ...] = ()
    not_remote_why: Mapping[str, str] = field(default_factory=dict)
    waiting_for_nodes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    def __repr__(self) -> str:
        """One short line (a notebook shows it): the remote, the newest checkpoint each side
        holds, whether they agree, and only what else is set."""
        if self.remote is None:
            return "SyncStatus(no remote)"

        def at(name: str | None, step: int | None) -> str:
            return "none" if name is None else (f"step {step}" if step is not None else name)

        parts = [f"remote={self.remote!r}",
                 f"local={at(self.newest_local, self.newest_local_step)}",
                 f"remote_has={at(self.newest_remote, self.newest_remote_step)}",
                 "behind" if self.behind else "in sync"]
        parts += [f"{k}={v}" for k, v in (("in_flight", self.in_flight),
                                           ("pending", self.pending)) if v is not None]
        if self.superseded:
            parts.append(f"superseded={self.superseded}")
        if self.consecutive_failures:
            parts.append(f"failures={self.consecutive_failures} "
                         f"({(self.last_error or '')[:80]})")
        if self.waiting_for_nodes:
            parts.append(f"waiting_for_nodes={len(self.waiting_for_nodes)}")
        if self.not_remote:
            parts.append(f"not_remote={len(self.not_remote)}")
        return f"SyncStatus({', '.join(parts)})"

    def lag(self) -> str:
        """One line saying how far behind the remote is, for logs."""
        def at(name: str | None, step: int | None) -> str:
            if name is None:
                return "nothing"
            return f"step {step} ({name})" if step is not None else name

        line = (f"remote {self.remote} is behind: it holds "
                f"{at(self.newest_remote, self.newest_remote_step)}, the newest local checkpoint "
                f"is {at(self.newest_local, self.newest_local_step)}")
        if self.newest_local_step is not None and self.newest_remote_step is not None:
            line += f" ({self.newest_local_step - self.newest_remote_step} steps behind)"
        for name, nodes in self.waiting_for_nodes.items():
            line += f"; {waiting_line(name, nodes)}"
        if self.superseded:
            line += f"; {self.superseded} checkpoints superseded before upload"
        if self.consecutive_failures:
            ago = time.time() - (self.last_error_time or time.time())
            line += (f"; failed uploads in a row: {self.consecutive_failures}, the last "
                     f"{ago:.0f}s ago: {self.last_error}")
        return line + "; saves go on locally"


def waiting_reason(nodes: tuple[int, ...]) -> str:
    """Why a checkpoint of which this node's part is uploaded is not remote yet."""
    if not nodes:
        return "part uploaded, every node's part is up, its commit is under way"
    return (f"part uploaded, waiting for nodes {list(nodes)} to upload theirs (not "
            "restorable until then)")


def waiting_line(name: str, nodes: tuple[int, ...]) -> str:
    """:func:`waiting_reason`, naming the checkpoint."""
    return f"{name}: {waiting_reason(nodes)}"


class _Job:
    def __init__(self, ckpt: LocalCheckpoint, streams: Mapping[str, MultipartStream] | None,
                 seq: int) -> None:
        self.ckpt = ckpt
        self.streams = dict(streams or {})
        self.seq = seq  # commit order
        self.fresh = True  # never pushed: the push need not look for a committed copy first


class _Activity:
    """A push's progress sink: records when bytes last moved."""

    def __init__(self, owner: Uploader) -> None:
        self._owner = owner

    def start(self, total: int, description: str) -> None:
        self._owner._last_progress = time.monotonic()

    def update(self, n: int) -> None:
        if n > 0:
            self._owner._last_progress = time.monotonic()

    def close(self) -> None:
        pass


class Uploader:
    """Pushes committed checkpoints to ``remote``: one in flight, one pending, newest wins.

    Args:
        remote: the store to push to.
        on_error: ``"warn"`` (default): log failures, retry with back-off, never raise;
            ``"raise"``: no retry, the failure is raised once by :meth:`raise_error`.
        after_push: called in the upload thread after each successful push, while the pushed
            checkpoint still counts as in flight (remote and local retention).

    Raises:
        ConfigError: ``on_error`` is neither "warn" nor "raise".
    """

    def __init__(self, remote: RemoteStore, *, on_error: str = "warn",
                 after_push: Callable[[Manifest], None] | None = None) -> None:
        if on_error not in ON_REMOTE_ERROR:
            raise ConfigError(f"on_remote_error must be one of {list(ON_REMOTE_ERROR)}, "
                              f"got {on_error!r}")
        self.remote = remote
        self.on_error = on_error
        self._after_push = after_push
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._in_flight: _Job | None = None
        self._pending: _Job | None = None
        self._retry_at = 0.0  # monotonic time before which no push starts (back-off)
        self._to_abort: list[MultipartStream] = []
        self._failures = 0
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
        # still missing); looked at again from ``_recheck_at``, with back-off.
        self._waiting: dict[str, tuple[Manifest, int, tuple[int, ...]]] = {}
        self._recheck_at = 0.0
        self._rechecks = 0
        self._last_progress = time.monotonic()
        self._closed = False

    # ------------------------------------------------------------------ the save side
    def offer(self, ckpt: LocalCheckpoint,
              streams: Mapping[str, MultipartStream] | None = None) -> None:
        """Queue a just-committed checkpoint; it replaces the pending one, if any."""
        with self._cond:
            self._seq += 1
            job = _Job(ckpt, streams, self._seq)
            if self._closed:
                self._to_abort.extend(job.streams.values())
            else:
                self._newest_local = (ckpt.name, ckpt.step)
                self._local_dir = str(ckpt.path.parent)
                if self._pending is not None:
                    self._drop(self._pending, "a newer one replaced it")
                self._pending = job
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="ckptsync-upload",
                                                    daemon=True)
                    self._thread.start()
                self._cond.notify_all()
        if self._closed:
            self._abort_streams()

    def _drop(self, job: _Job, why: str) -> None:
        """Forget a queued checkpoint (the lock is held): it stays local, never uploaded."""
        self._superseded += 1
        self._to_abort.extend(job.streams.values())  # aborted by the upload thread
        log.info("not uploading %s: %s", job.ckpt.name, why)

    def ready_to_stream(self) -> bool:
        """Whether a checkpoint written now would be pushed at once by a healthy remote: only
        then is it worth sending its bytes while they are written (a stream would otherwise
        compete with the push in flight, or start uploads on a failing remote that the push
        would then drop). A stream never makes the save wait: where the link falls behind,
        the rest of the file goes up from the committed file."""
        with self._cond:
            return (not self._closed and self._in_flight is None and self._pending is None
                    and self._failures == 0)

    def protected(self) -> set[str]:
        """The checkpoints local retention must keep: the one in flight and the pending one."""
        with self._cond:
            return {j.ckpt.name for j in (self._in_flight, self._pending) if j is not None}

    def lagging(self) -> bool:
        """True when the remote is failing, or a checkpoint already waits behind the one in
        flight (the next save will supersede it): the remote cannot keep up."""
        with self._cond:
            return self._failures > 0 or (self._pending is not None
                                          and self._in_flight is not None)

    def raise_error(self) -> None:
        """With ``on_error="raise"``: raise a failed push's error, once."""
        with self._cond:
            err, self._undelivered = self._undelivered, None
        if err is not None:
            raise err

    def status(self) -> SyncStatus:
        """A snapshot of where the upload stands."""
        from ckptsync.remote import redact_url

        with self._cond:
            local, remote = self._newest_local, self._newest_remote
            return SyncStatus(
                remote=redact_url(self.remote.url),
                newest_local=local[0] if local else None,
                newest_local_step=local[1] if local else None,
                newest_remote=remote[0] if remote else None,
                newest_remote_step=remote[1] if remote else None,
                in_flight=self._in_flight.ckpt.name if self._in_flight else None,
                pending=self._pending.ckpt.name if self._pending else None,
                behind=local is not None and (remote is None or remote[0] != local[0]),
                superseded=self._superseded,
                consecutive_failures=self._failures,
                last_error=self._last_error,
                last_error_time=self._last_error_time,
                not_remote=self._not_remote,
                not_remote_why=dict(self._not_remote_why),
                waiting_for_nodes={n: w[2] for n, w in self._waiting.items()},
            )

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
            while (self._in_flight is not None or self._pending is not None
                   or self._remote_seq < self._seq):
                if self._undelivered is not None or self._closed:
                    return False
                now = time.monotonic()
                if now - start >= timeout and (
                        self._failures > 0 or now - self._last_progress >= timeout):
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
            queued = {j.seq: j.ckpt.name for j in (self._in_flight, self._pending) if j}
            if self._newest_local is not None:
                queued.setdefault(self._seq, self._newest_local[0])
            if self._pending is not None:
                self._to_abort.extend(self._pending.streams.values())
                self._pending = None
            self._stop.set()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(STOP_GRACE_S)
            if thread.is_alive():
                log.error("the upload to %s did not stop within %.0fs of close(); abandoning "
                          "it (it will not be committed)", self.remote.url, STOP_GRACE_S)
        self._abort_streams()
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

    # ------------------------------------------------------------------ the upload thread
    def _abort_streams(self) -> None:
        with self._cond:
            streams, self._to_abort = self._to_abort, []
        for s in streams:
            s.abort()

    def _next(self) -> _Job | None:
        with self._cond:
            while not self._stop.is_set():
                if self._to_abort:
                    return None  # abort them outside the lock, then come back
                now = time.monotonic()
                if self._pending is not None and now >= self._retry_at:
                    job, self._pending = self._pending, None
                    self._in_flight = job
                    return job
                if self._waiting and now >= self._recheck_at:
                    return None  # look at the waiting parts, then come back
                deadlines = ([self._retry_at] if self._pending is not None else []) + (
                    [self._recheck_at] if self._waiting else [])
                self._cond.wait(min(deadlines) - now if deadlines else None)
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            job = self._next()
            self._abort_streams()
            if job is not None:
                self._push(job)
            elif not self._stop.is_set():
                self._recheck()

    def _push(self, job: _Job) -> None:
        name = job.ckpt.name
        self._last_progress = time.monotonic()
        try:
            fresh, job.fresh = job.fresh, False  # a retry looks (the last try may have won)
            manifest = self.remote.push(job.ckpt, streams=job.streams, stop=self._stop,
                                        progress=_Activity(self), fresh=fresh)
        except Exception as e:
            self._failed(job, e)
            return
        finally:
            job.streams.clear()  # push completed or aborted them
        if part_of(manifest) is not None:  # only this node's part: not restorable yet
            self._part_uploaded(job, manifest)
            return
        with self._cond:
            recovered = self._failures
            self._failures = 0
            self._retry_at = 0.0
            self._committed(manifest, job.seq)
            self._last_progress = time.monotonic()
        if recovered:
            log.warning("remote %s is reachable again: %s committed after %d failed uploads",
                        self.remote.url, name, recovered)
        if self._after_push is not None:
            try:
                with stopping(self._stop):
                    self._after_push(manifest)
            except Exception as e:  # retention is retried after the next push
                log.warning("after uploading %s: %s", name, e)
        with self._cond:
            self._in_flight = None
            self._cond.notify_all()

    def _committed(self, manifest: Manifest, seq: int) -> None:
        """``manifest`` (commit order ``seq``) is committed remotely (the lock is held)."""
        if seq > self._remote_seq:
            self._newest_remote = (manifest.name, manifest.step)
            self._remote_seq = seq
        # Parts of older checkpoints still waiting are superseded by this one.
        self._waiting = {n: w for n, w in self._waiting.items() if w[1] > seq}

    def _part_uploaded(self, job: _Job, part: Manifest) -> None:
        """The push of ``job`` uploaded this node's part only; the whole is not committed."""
        name = job.ckpt.name
        try:
            missing = self.remote.waiting_for(part)
        except Exception as e:  # the next look tells; the thread must never die of it
            log.warning("after uploading this node's part of %s: %s", name, e)
            missing = ()
        with self._cond:
            self._failures = 0
            self._retry_at = 0.0
            self._last_progress = time.monotonic()
            if missing is None:  # another node committed it meanwhile
                self._committed(part_of(part).whole, job.seq)  # type: ignore[union-attr]
            else:
                self._waiting[name] = (part, job.seq, missing)
                for old in sorted(self._waiting, key=lambda n: self._waiting[n][1])[
                        :-MAX_WAITING]:
                    del self._waiting[old]
                self._rechecks = 0
                self._recheck_at = time.monotonic() + self._recheck_delay()
            self._in_flight = None
            self._cond.notify_all()
        if missing is not None:
            log.warning("%s (remote %s)", waiting_line(name, missing), self.remote.url)

    def _recheck_delay(self) -> float:
        cfg = self.remote.config  # at least 0.1 s: a remote is never spun on
        return max(0.1, min(max(cfg.backoff_initial, 0.1) * 2 ** min(self._rechecks, 16),
                            max(cfg.backoff_max, 0.1), RECHECK_MAX_S))

    def _recheck(self) -> None:
        """Look again at the parts waiting for other nodes: committed ones become remote."""
        with self._cond:
            if not self._waiting or time.monotonic() < self._recheck_at:
                return
            waiting = list(self._waiting.items())
        seen: dict[str, tuple[int, ...] | None] = {}
        for name, (part, _, _) in waiting:
            try:
                with stopping(self._stop):
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
            self._rechecks += 1
            self._recheck_at = time.monotonic() + self._recheck_delay()
            self._cond.notify_all()

    def _order(self, name: str) -> int:
        w = self._waiting.get(name)
        return w[1] if w is not None else 0

    def _failed(self, job: _Job, e: Exception) -> None:
        err = e if isinstance(e, CkptSyncError) else RemoteError(
            f"uploading {job.ckpt.name} to {self.remote.url} failed: {type(e).__name__}: {e}")
        with self._cond:
            self._in_flight = None
            if self._stop.is_set():  # abandoned by close(): not a failure of the remote
                self._cond.notify_all()
                return
            self._failures += 1
            self._last_error = str(err)
            self._last_error_time = time.time()
            failures = self._failures
            if self.on_error == "raise":
                self._undelivered = err
                delay = 0.0
            else:
                cfg = self.remote.config  # at least 0.1 s: a dead remote is never spun on
                delay = backoff(failures, max(cfg.backoff_initial, 0.1), max(cfg.backoff_max, 0.1))
                self._retry_at = time.monotonic() + delay
                if self._pending is None:
                    self._pending = job  # retry it, unless a newer one arrives meanwhile
                else:
                    self._drop(job, "its upload failed and a newer one is pending")
            self._cond.notify_all()
        retryable = isinstance(err, RemoteError) and err.retryable
        level = logging.WARNING if retryable else logging.ERROR
        if self.on_error == "raise":
            log.log(level, "uploading %s failed: %s", job.ckpt.name, err,
                    exc_info=not isinstance(e, CkptSyncError))
        else:
            log.log(level, "uploading %s failed (%d in a row): %s; retrying the newest "
                    "checkpoint in %.1fs; training and local saves go on", job.ckpt.name,
                    failures, err, delay, exc_info=not isinstance(e, CkptSyncError))
