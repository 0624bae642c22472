"""The daemon's view of the remote: listing its committed checkpoints, applying retention.

A mixin of :class:`~ckptsync.daemon.watcher.Watcher`: a failing listing keeps the last known
state (a push of a committed name is a no-op, so a stale view costs nothing); only a
permanent error at start-up ends the daemon. Retention runs on the upload pool, never
deleting the checkpoint a live trainer resumed from.
"""

from __future__ import annotations

import time
from concurrent.futures import Future

from ckptsync.daemon.watcher_state import WatcherState
from ckptsync.errors import ConfigError, RemoteError
from ckptsync.transfer import backoff, stopping

__all__ = ["RemoteView"]


class RemoteView(WatcherState):
    """Keeps ``self._remote`` (committed remote checkpoints by name) and runs retention."""

    # ------------------------------------------------------------------ remote knowledge
    def _refresh_remote(self, *, initial: bool = False) -> bool:
        """Re-list the remote's committed checkpoints.

        At start-up (``initial``) a permanent error (credentials, missing bucket, a bad URL) is
        a configuration error: False, the daemon exits; so is an unreachable remote with
        ``--once`` (``list`` has retried already). Any other error, and every error later, is
        reported and leaves the last known state: a later refresh retries (a push of a name
        that is already committed is a no-op, so a stale view costs nothing).
        """
        attempt = 0
        while not self._stop.is_set():
            try:
                with stopping(self._stop):  # a stop cuts the retries' back-off short
                    listed = self.store.list()
            except Exception as e:
                if self._stop.is_set():
                    return True
                permanent = isinstance(e, ConfigError) or (
                    isinstance(e, RemoteError) and not e.retryable)
                if initial and permanent:
                    self._fail_fast(e)
                    return False
                if initial and self.config.once:
                    self._unreachable = True
                    self._fatal = str(e)
                    self.events("error", "remote_unreachable", error=str(e),
                                hint="--once gives up: check the URL, the network and the "
                                     "endpoint, then run it again; nothing was committed")
                    return False
                attempt += 1
                delay = backoff(attempt, 2.0, 300.0)
                self._last_error = f"listing the remote: {type(e).__name__}: {e}"
                self.events("warning", "remote_unavailable", error=str(e),
                            error_type=type(e).__name__,
                            retry_in_s=round(delay, 2) if initial else None)
                if not initial or self._stop.wait(delay):
                    return True
                continue
            self._remote = {m.name: m for m in listed}
            self._remote_refreshed = time.monotonic()
            return True
        return True

    def _fail_fast(self, e: BaseException) -> None:
        self._fatal = str(e)
        self._state = "failed"
        self.events("error", "fatal", error=str(e),
                    hint="a permanent remote error: fix the URL, bucket or credentials and "
                         "restart; nothing partial was committed")

    # ------------------------------------------------------------------ retention
    def _maybe_retention(self) -> None:
        if not self._retention_due or self._retention_running or self._stop.is_set():
            return
        self._retention_due = False
        self._retention_running = True
        protect = self._protected()
        policy = self.config.policy

        def job() -> list[str]:
            return self.store.apply_retention(policy, protect=protect)

        fut = self._pool.submit(job)
        self._retention_job = fut
        fut.add_done_callback(lambda f: self._q.put(("retention", f)))

    def _on_retention(self, fut: Future[list[str]]) -> None:
        self._retention_running = False
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            self.events("warning", "retention_failed", error=str(exc))
            return
        deleted = fut.result()
        for name in deleted:
            self._remote.pop(name, None)
            self.events("info", "retention_deleted", name=name)
        self._write_status()

