"""The daemon's version taker: finished zero-code versions of each watch rule, into the spool.

:class:`VersionTaker` holds one :class:`~ckptsync.daemon.versions.VersionTracker` per rule,
which says when a version is due; its copy (:func:`~ckptsync.daemon.versions.snapshot_version`)
runs on the one snapshot thread, and its outcome comes back through the dispatcher's queue.
A committed spool copy is pushed by the next reconcile like a native checkpoint
(:mod:`~ckptsync.daemon.pushes`). Runs on the dispatcher thread.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ckptsync.daemon.config import WatchConfig
from ckptsync.daemon.health import Health
from ckptsync.daemon.tracker import Due, VersionTracker
from ckptsync.daemon.versions import Snapshot, signature_of, snapshot_version
from ckptsync.local import LocalStore
from ckptsync.manifest import Manifest
from ckptsync.output import EventLog
from ckptsync.zerocode.rules import is_watched

__all__ = ["VersionTaker", "files_summary"]

_CKPT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".pkl")
#: A log line names this many of a version's files, then counts the rest.
SHOWN_PATHS = 5


def files_summary(rels: list[str]) -> dict[str, Any]:
    """A version's files for a log line: ``paths`` (the first :data:`SHOWN_PATHS`) and
    ``files`` (how many), never the whole list (a version may hold ten thousand files)."""
    out: dict[str, Any] = {"files": len(rels), "paths": rels[:SHOWN_PATHS]}
    if len(rels) > SHOWN_PATHS:
        out["more_paths"] = len(rels) - SHOWN_PATHS
    return out


class VersionTaker:
    """Takes the zero-code versions of ``config.rules`` into ``spool``.

    Args:
        config: the daemon's configuration (rules, settle, max_wait, keys).
        spool: the spool the versions are committed into.
        events: the event log.
        health: where the status is written from.
        post: puts a message on the dispatcher's queue (thread-safe).
        schedule: asks for a reconcile at a (monotonic) time.
    """

    def __init__(self, config: WatchConfig, spool: LocalStore, events: EventLog,
                 health: Health, post: Callable[[tuple[Any, ...]], None],
                 schedule: Callable[[float], None]) -> None:
        self.config = config
        self.root = config.local_dir
        self.spool = spool
        self._events = events
        self._health = health
        self._post = post
        self._schedule = schedule
        self.trackers = [VersionTracker(r, config.local_dir, config.settle, config.max_wait)
                         for r in config.rules]
        self.warnings: list[str] = []
        self._reported: list[tuple[bool, str | None]] = []  # (pending, reason) in the status
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ckptsync-snapshot")

    @property
    def rules(self) -> set[str]:
        return {t.rule.spec for t in self.trackers}

    def init_signatures(self, committed: dict[str, Manifest]) -> None:
        """Each rule's newest version (spooled or committed) is not taken again."""
        for tr in self.trackers:
            spooled = [c.manifest for c in self.spool.list()
                       if c.manifest.source.get("rule") == tr.rule.spec]
            remote = [m for m in committed.values()
                      if is_watched(m) and m.source.get("rule") == tr.rule.spec]
            newest = sorted(spooled + remote, key=lambda m: m.sort_key())
            if newest:
                tr.last_signature = signature_of(newest[-1])

    def on_event(self, kind: str, rel: str, at: float, is_dir: bool) -> None:
        for tr in self.trackers:
            tr.on_event(kind, rel, at, is_dir)

    def drain(self) -> None:
        """Take what is there at once (the trainer exited: nothing more is coming)."""
        for tr in self.trackers:
            tr.settle = 0.0

    def forget(self, signature: tuple[tuple[str, str], ...]) -> None:
        """A spooled version of this content was dropped (rewritten in place during its
        upload): the same bytes again are a version to take."""
        for tr in self.trackers:
            if tr.last_signature == signature:
                tr.last_signature = ()

    # ------------------------------------------------------------------ what it reports
    def watch_status(self, now: float, wall: float) -> list[dict[str, Any]]:
        # Pending also counts a finished version not yet taken (say, a file that was there
        # before the daemon started): flush() must not return before it is committed.
        out = []
        for t in self.trackers:
            pending = t.pending(now) or t.due(now, wall, force=True) is not None
            out.append({"rule": t.rule.spec, "pending": pending, "error": t.error,
                        "reason": (t.reason or ("copying" if t.busy else None))
                        if pending else None})
        return out

    def deadlines(self, now: float, wall: float) -> list[float]:
        return [d for t in self.trackers if (d := t.next_deadline(now, wall)) is not None]

    def busy(self, now: float, wall: float) -> bool:
        """A version is being copied, retried, or due: a drain is not finished."""
        return any(t.busy or (t.retry_at is not None and not t.gave_up)
                   or t.due(now, wall, force=True) is not None for t in self.trackers)

    def gave_up(self) -> bool:
        return any(t.gave_up for t in self.trackers)

    def warn_without_rules(self, local_names: list[str]) -> None:
        """No rule and no native checkpoint, but files there: the trainer's own, which no
        rule syncs. Said once at start-up, and in the status while it holds."""
        if self.config.rules or local_names:
            return
        found: list[str] = []
        with contextlib.suppress(OSError), os.scandir(self.root) as it:
            for entry in it:
                if not entry.name.startswith("."):
                    found.append(entry.name + ("/" if entry.is_dir() else ""))
        if not found:
            return
        found.sort(key=lambda n: (not n.endswith(_CKPT_SUFFIXES), n.endswith("/"), n))
        first = found[0]
        rule = (f"'dir:{re.sub(r'[0-9]+', '*', first.rstrip('/'))}:MARKER'"
                if first.endswith("/") else f"'file:{first}'")
        hint = (f"no watch rule: zero-code files are not synced ({len(found)} found here, e.g. "
                f"{', '.join(found[:3])}); add --rule {rule} (see ckptsync watch --help)")
        self.warnings.append(hint)
        self._events("warning", "no_rule", local=str(self.root), hint=hint)
        self._health.write()

    # ------------------------------------------------------------------ taking versions
    def take(self, now: float, committed: Mapping[str, Manifest], *, drain: bool) -> None:
        """Start the copy of every rule's version that is due. ``committed``: the remote's
        committed checkpoints (step-less versions take their seq above theirs)."""
        wall = time.time()
        seq = 0  # step-less versions' seq, taken below in the order versions are taken
        for tr in self.trackers:
            due = tr.due(now, wall, force=drain)
            if due is None:
                continue
            tr.begin(due, now)
            if due.forced:
                self._events("info", "version_forced", rule=tr.rule.spec,
                             **files_summary(due.rels),
                             max_wait_s=self.config.max_wait,
                             note="still changing: copied anyway, committed only if unchanged "
                                  "during the copy and complete")

            # Step-less versions order by a seq taken here, in the order they are taken,
            # above the remote's highest (never by this machine's clock).
            seq = 1 + max([seq, *(m.seq or 0 for m in (*committed.values(),
                                                        *(c.manifest for c in self.spool.list())))])

            def job(tr: VersionTracker = tr, due: Due = due,
                    sig: Any = tr.last_signature, seq: int = seq) -> Snapshot:
                return snapshot_version(self.spool, self.root, tr.rule, due.rels,
                                        last_signature=sig, guard=due.guard, link=due.link,
                                        keys=self.config.keys, seq=seq,
                                        expect=None if due.forced else due.sigs)

            fut = self._pool.submit(job)
            fut.add_done_callback(self._done(tr, due))
        # A version starts being written, or waits for another reason: the status says so
        # now, not at the next reconcile (``ckptsync status`` reads the file).
        state = [(t.pending(now), t.reason) for t in self.trackers]
        if state != self._reported:
            self._reported = state
            self._health.write()

    def _done(self, tr: VersionTracker, due: Due) -> Callable[[Future[Snapshot]], None]:
        def done(f: Future[Snapshot]) -> None:
            self._post(("snapshot", tr, f, due.rels, due.guard))

        return done

    def on_snapshot(self, tr: VersionTracker, fut: Future[Snapshot], rels: list[str],
                    guard: list[str], *, drain: bool) -> None:
        """A copy's outcome (on the dispatcher thread)."""
        tr.busy = False
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            delay = tr.failed(time.monotonic(), str(exc))
            give_up = drain and tr.gave_up
            self._events("error", "version_error", rule=tr.rule.spec, **files_summary(rels),
                         error=str(exc), attempt=tr.failures,
                         **({"action": "giving up"} if give_up else
                            {"retry_in_s": round(delay, 2)}))
            self._health.write()
            return
        snap = fut.result()
        tr.record(snap, rels, guard)
        if snap.ckpt is None:
            if snap.skipped != "identical":
                self._events("warning", "version_discarded", rule=tr.rule.spec,
                             **files_summary(rels),
                             reason=snap.skipped, detail=snap.detail,
                             note="never committed; the next version will be taken")
            self._health.write()
            return
        self._events("info", "version_taken", rule=tr.rule.spec, name=snap.ckpt.name,
                     step=snap.ckpt.step, **files_summary(rels),
                     bytes=snap.ckpt.manifest.total_size)
        self._schedule(time.monotonic())

    def shutdown(self) -> None:
        """Finish the copy under way; cancel the ones not started."""
        self._pool.shutdown(wait=True, cancel_futures=True)
