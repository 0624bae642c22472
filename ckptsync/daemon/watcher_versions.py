"""The daemon's zero-code pipeline: finished versions of each watch rule, copied to the spool.

A mixin of :class:`~ckptsync.daemon.watcher.Watcher`. Each rule's
:class:`~ckptsync.daemon.versions.VersionTracker` says when a version is due; its copy
(:func:`~ckptsync.daemon.versions.snapshot_version`) runs on the one snapshot thread, and its
outcome comes back through the dispatcher's queue. A committed spool copy is pushed by the
next reconcile like a native checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from ckptsync.daemon.rules import is_watched
from ckptsync.daemon.versions import Due, Snapshot, VersionTracker, signature_of, snapshot_version
from ckptsync.daemon.watcher_state import WatcherState

__all__ = ["VersionPipeline"]

_CKPT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".pkl")


class VersionPipeline(WatcherState):
    """Takes the zero-code versions of ``config.rules`` into the spool."""

    def _init_signatures(self) -> None:
        for tr in self._trackers:
            spooled = [c.manifest for c in self.spool.list()
                       if c.manifest.source.get("rule") == tr.rule.spec]
            remote = [m for m in self._remote.values()
                      if is_watched(m) and m.source.get("rule") == tr.rule.spec]
            newest = sorted(spooled + remote, key=lambda m: m.sort_key())
            if newest:
                tr.last_signature = signature_of(newest[-1])

    # ------------------------------------------------------------------ zero-code versions
    def _warn_without_rules(self) -> None:
        """No rule and no native checkpoint, but files there: the trainer's own, which no
        rule syncs. Said once at start-up, and in the status while it holds."""
        if self.config.rules or self._local_names:
            return
        found: list[str] = []
        with contextlib.suppress(OSError), os.scandir(self.local.directory) as it:
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
        self._warnings.append(hint)
        self.events("warning", "no_rule", local=str(self.local.directory), hint=hint)
        self._write_status()

    def _take_versions(self, now: float) -> None:
        if self._stop.is_set():
            return
        wall = time.time()
        seq = 0  # step-less versions' seq, taken below in the order versions are taken
        for tr in self._trackers:
            due = tr.due(now, wall, force=self._drain)
            if due is None:
                continue
            tr.begin(due, now)
            if due.forced:
                self.events("info", "version_forced", rule=tr.rule.spec, paths=due.rels,
                            max_wait_s=self.config.max_wait,
                            note="still changing: copied anyway, committed only if unchanged "
                                 "during the copy and complete")

            # Step-less versions order by a seq taken here, in the order they are taken,
            # above the remote's highest (never by this machine's clock).
            seq = 1 + max([seq, *(m.seq or 0 for m in (*self._remote.values(),
                                                        *(c.manifest for c in self.spool.list())))])

            def job(tr: VersionTracker = tr, due: Due = due,
                    sig: Any = tr.last_signature, seq: int = seq) -> Snapshot:
                return snapshot_version(self.spool, self.local.directory, tr.rule, due.rels,
                                        last_signature=sig, guard=due.guard, link=due.link,
                                        keys=self.config.keys, seq=seq)

            fut = self._snap_pool.submit(job)
            fut.add_done_callback(self._snapshot_done(tr, due.rels, due.guard))

    def _snapshot_done(self, tr: VersionTracker, rels: list[str],
                       guard: list[str]) -> Callable[[Future[Snapshot]], None]:
        def done(f: Future[Snapshot]) -> None:
            self._q.put(("snapshot", tr, f, rels, guard))

        return done

    def _on_snapshot(self, tr: VersionTracker, fut: Future[Snapshot], rels: list[str],
                     guard: list[str]) -> None:
        tr.busy = False
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            delay = tr.failed(time.monotonic(), str(exc))
            give_up = self._drain and tr.gave_up
            self.events("error", "version_error", rule=tr.rule.spec, paths=rels, error=str(exc),
                        attempt=tr.failures,
                        **({"action": "giving up"} if give_up else
                           {"retry_in_s": round(delay, 2)}))
            self._write_status()
            return
        snap = fut.result()
        tr.record(snap, rels, guard)
        if snap.ckpt is None:
            level = "debug" if snap.skipped == "identical" else "warning"
            if level != "debug":
                self.events(level, "version_discarded", rule=tr.rule.spec, paths=rels,
                            reason=snap.skipped, detail=snap.detail,
                            note="never committed; the next version will be taken")
            self._write_status()
            return
        self.events("info", "version_taken", rule=tr.rule.spec, name=snap.ckpt.name,
                    step=snap.ckpt.step, paths=rels, bytes=snap.ckpt.manifest.total_size)
        self._schedule(time.monotonic())

