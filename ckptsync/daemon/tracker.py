"""When a zero-code version is finished: :class:`VersionTracker`, one per watch rule.

Scans are truth, events only wake the daemon up: the tracker stats the rule's files itself,
and a version whose files' stats (inode, size, mtime, ctime) are unchanged for ``settle``
seconds (or whose newest mtime is that old) is *quiet*, whatever events arrived. What was
already finished before the daemon started is taken at once.

How each kind of rule is finished early, before it is quiet:

- one fixed file (``file:ckpt.pt``): renamed into place (the temp-file-and-rename pattern: a
  renamed file is whole); at start-up, a file whose structure (``torch.save``'s zip,
  safetensors) is complete. A file rewritten more often than ``settle`` is still taken at
  least every ``max_wait`` seconds when its structure looks complete; it is committed only
  when its stat is identical before and after the copy.
- a directory per version (``dir:GLOB:MARKER``): the marker was written last.
- a set of files (``file:`` with a wildcard, e.g. ``file:*.pth``): **a version is one save**
  (DESIGN.md). Renames prove nothing here: a trainer that renames ``a.pth``, ``b.pth``,
  ``c.pth`` in one after the other has, after ``a.pth``'s rename, a new ``a.pth`` beside the
  previous save's ``b.pth`` and ``c.pth``. A set is taken once it is quiet (``settle`` must
  be longer than the time the trainer takes to write one save's files, and shorter than the
  pause between two saves), or at once when the files' content proves they are one save:
  every file changed since the previous version, each one structurally complete, and each
  naming the same step (a ``torch.save`` dict's ``step``/``iter_num``/``global_step``/
  ``epoch``, a ``trainer_state.json``'s ``global_step``: :mod:`~ckptsync.zerocode.contentstep`).
  ``max_wait`` never forces a set: one that keeps changing and cannot be proven one save is
  held, and :attr:`VersionTracker.reason` says why (``ckptsync status`` shows it), until its
  next quiet point. A drain (``--once``, the trainer's exit: nothing more is coming) takes
  the set as it is.

The copy itself (:func:`~ckptsync.daemon.versions.snapshot_version`) checks that the set it
copies is the very one decided on here (:attr:`Due.sigs`) and that nothing changed during
the copy; see :mod:`~ckptsync.daemon.versions`.

A large set is expensive to scan (a stat per file): a scan is reused, while no event
concerns the rule, for a few times what it cost (:data:`SCAN_REUSE`), so that the daemon
does not spend its time re-reading a set of ten thousand files between two uploads.

Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ckptsync.daemon.versions import Snapshot
from ckptsync.transfer.retry import RetryPolicy
from ckptsync.zerocode.contentstep import content_step
from ckptsync.zerocode.rules import (
    StatSig,
    WatchRule,
    check_complete,
    dir_files,
    stat_sig,
    structure_complete,
)

__all__ = [
    "GIVE_UP_AFTER",
    "POLL_S",
    "RETRY_CAP_S",
    "SCAN_REUSE",
    "Due",
    "VersionTracker",
]

#: While a version is changing (or waits for a moment to be copied), rescan this often.
POLL_S = 0.25
#: A failed copy (no space, ...) is retried after 1, 2, 4, ... seconds, at most this many.
RETRY_CAP_S = 60.0
COPY_RETRY = RetryPolicy(1.0, RETRY_CAP_S)
#: Failed copies after which a drain (``--once``, the parent's exit) gives a rule up.
GIVE_UP_AFTER = 3
#: A scan is reused (no event for the rule since) for this many times what it took.
SCAN_REUSE = 4.0

_Found = tuple[list[str], list[str], dict[str, StatSig]]


@dataclass(frozen=True)
class Due:
    """A version to copy now: its files, the files whose stat must not change meanwhile, and
    whether it is taken before it was quiet (``max_wait``)."""

    rels: list[str]
    guard: list[str]
    forced: bool = False
    link: frozenset[str] = frozenset()
    """Files renamed into place since the last version (and not written since): each may be
    spooled by hard link."""
    sigs: Mapping[str, StatSig] = field(default_factory=dict, hash=False)
    """The stats the version was found finished with: the copy must find the same."""


@dataclass
class VersionTracker:
    """Decides, from its own scans of the rule's files, when a rule has a finished version.

    Events are hints: they wake the daemon up, and a rename into place marks a fixed file's
    version finished at once. Whether a version is quiet is decided from the stats the
    tracker observes (see the module doc), never from which events arrived: an event that
    inotify did not deliver (a file written into a directory just created) cannot leave a
    version waiting forever.

    Fed by the daemon's dispatcher thread only (not thread-safe by design).

    Args:
        rule: the watch rule.
        root: the watched directory.
        settle: seconds a version's stats must stay unchanged.
        max_wait: take a version that keeps changing at least this often (0: never before
            it is quiet); never a set of files (see the module doc).
    """

    rule: WatchRule
    root: Path
    settle: float
    max_wait: float = 0.0
    taken: dict[str, StatSig] = field(default_factory=dict)
    last_signature: tuple[tuple[str, str], ...] = ()
    busy: bool = False
    renamed: set[str] = field(default_factory=set)
    """A file rule's files renamed into place since the last version was taken."""
    failures: int = 0
    error: str | None = None
    retry_at: float | None = None
    reason: str | None = None
    """Why the version being written is not taken yet (None when nothing waits)."""
    _seen: dict[str, StatSig] | None = None
    _stable_since: float = 0.0
    _changed_since: float | None = None
    _initial: dict[str, StatSig] | None = None
    _last_forced: float = float("-inf")
    _found: _Found | None = None
    _scanned_at: float = float("-inf")
    _scan_cost: float = 0.0
    _dirty: bool = True
    _steps: dict[str, tuple[StatSig, int | None]] = field(default_factory=dict)

    @property
    def is_set(self) -> bool:
        """A rule whose version is a set of files that a trainer writes one by one."""
        return self.rule.kind == "file" and any(c in self.rule.pattern for c in "*?[")

    def on_event(self, kind: str, rel: str, now: float, is_dir: bool = False) -> bool:
        """Take a file event as a hint; True if it concerns this rule (wake up and rescan)."""
        if not self.rule.matches_file(rel) and self.rule.version_dir(rel) is None:
            return False
        self._dirty = True
        if not is_dir and kind in ("created", "modified"):
            self.renamed.discard(rel)
        elif not is_dir and kind == "moved_in" and self.rule.kind == "file":
            self.renamed.add(rel)
        return True

    def _observe(self, now: float) -> _Found | None:
        """The rule's current candidate ``(rels, guard, stats)``, scanned or reused."""
        if not self._dirty and now - self._scanned_at < SCAN_REUSE * self._scan_cost:
            return self._found
        t0 = time.monotonic()
        found: _Found | None = None
        try:
            if self.rule.kind == "file":
                sigs = self.rule.current_stats(self.root)
                rels, guard = sorted(sigs), []
            else:
                dirs = self.rule.finished_dirs(self.root)
                rels = dir_files(self.root, dirs[-1]) if dirs else []
                guard = [f"{dirs[-1]}/{self.rule.marker}"] if dirs else []
                sigs = {r: stat_sig(os.stat(self.root / r)) for r in dict.fromkeys(rels + guard)}
            if rels:
                found = rels, guard, sigs
        except FileNotFoundError:
            found = None  # deleted while listed: the next scan sees what is left
        self._found, self._dirty = found, False
        if found is not None and len(self._steps) > len(found[2]):
            self._steps = {r: v for r, v in self._steps.items() if r in found[2]}
        self._scanned_at = time.monotonic()
        self._scan_cost = self._scanned_at - t0
        return found

    def _scan(self, now: float) -> _Found | None:
        """The current candidate; updates what was observed."""
        found = self._observe(now)
        sigs = found[2] if found else {}
        if self._initial is None:
            self._initial = sigs
        if sigs != self._seen:
            self._seen, self._stable_since = sigs, now
        if found is None or sigs == self.taken:
            self._changed_since = None
        elif self._changed_since is None:
            self._changed_since = now
        return found

    def due(self, now: float, wall: float, *, force: bool = False) -> Due | None:
        """The version to take now, or None (then :attr:`reason` says why, if one waits).

        ``force`` (a drain: ``--once``, the parent's exit) ignores the settle time; a rule
        whose copies failed :data:`GIVE_UP_AFTER` times is then given up.
        """
        if self.busy or (self.retry_at is not None and now < self.retry_at):
            return None
        if force and self.failures >= GIVE_UP_AFTER:
            return None
        found = self._scan(now)
        if found is None or found[2] == self.taken:
            self.reason = None
            return None
        rels, guard, sigs = found
        link = frozenset(self.renamed.intersection(rels)) if self.rule.kind == "file" \
            else frozenset()
        if force:
            return Due(rels, guard, link=link, sigs=sigs)
        if self._finished(now, wall, rels, guard, sigs):
            self.reason = None
            return Due(rels, guard, link=link, sigs=sigs)
        if (self.max_wait and self._changed_since is not None
                and now - self._changed_since >= self.max_wait
                and now - self._last_forced >= self.max_wait):
            if self.is_set:
                self.reason = (f"{self.reason}; changing for more than max_wait "
                               f"({self.max_wait:g} s), but a set of files is only taken as one "
                               "save: at its next quiet point")
            elif all(_copyable(self.root / r, self.rule.kind == "dir") for r in rels):
                return Due(rels, guard, forced=True, sigs=sigs)
        return None

    def _finished(self, now: float, wall: float, rels: list[str], guard: list[str],
                  sigs: dict[str, StatSig]) -> bool:
        """Is the version ``rels`` (stat-ed as ``sigs``) finished? If not, set :attr:`reason`."""
        newest = max(s[2] for s in sigs.values())
        if now - self._stable_since >= self.settle or wall - newest / 1e9 >= self.settle:
            return True  # quiet
        at_start = sigs == self._initial
        quiet = f"taken once unchanged for {self.settle:g} s"
        if self.rule.kind == "dir":
            # The marker written last (or present at start-up): the trainer said it is done.
            self.reason = f"{rels[0].split('/')[0]}: being written; {quiet}"
            return at_start or any(sigs[g][2] >= newest for g in guard)
        if self.is_set:
            why = self._not_one_save(rels, sigs)
            self.reason = None if why is None else f"{why}; {quiet} (--settle)"
            return why is None
        if self.renamed.issuperset(rels):
            return True  # the file renamed into place: whole
        self.reason = f"{rels[0]}: being written; {quiet}"
        return at_start and all(structure_complete(self.root / r) for r in rels)

    def _not_one_save(self, rels: list[str], sigs: dict[str, StatSig]) -> str | None:
        """None when the files' content proves the set is one save (see the module doc),
        else why it cannot be proven."""
        changed = [r for r in rels if self.taken.get(r) != sigs[r]]
        unchanged = [r for r in rels if self.taken.get(r) == sigs[r]]
        if not changed:
            return "a file of the set was removed since the last version"
        if unchanged:
            return (f"{changed[0]} changed since the last version but {unchanged[0]} did not "
                    f"({len(unchanged)} of {len(rels)} files): waiting for the rest of the save")
        steps: dict[str, int] = {}
        for r in rels:
            step = self._step(r, sigs[r])
            if step is None:
                return (f"a set of {len(rels)} files being written; {r} names no step in its "
                        "content (or is incomplete), so which save each file belongs to is "
                        "unknown")
            steps[r] = step
        if len(set(steps.values())) > 1:
            lo = min(steps, key=lambda r: steps[r])
            hi = max(steps, key=lambda r: steps[r])
            return (f"files of different saves ({hi} says step {steps[hi]}, {lo} step "
                    f"{steps[lo]}): waiting for the rest of the save")
        return None

    def _step(self, rel: str, sig: StatSig) -> int | None:
        """The step ``rel``'s content names if it is complete, else None (cached per stat)."""
        cached = self._steps.get(rel)
        if cached is not None and cached[0] == sig:
            return cached[1]
        step: int | None = None
        with contextlib.suppress(OSError):
            if check_complete(self.root / rel) is None:
                step = content_step(self.root, [rel])
        self._steps[rel] = (sig, step)
        return step

    def begin(self, due: Due, now: float) -> None:
        """The daemon starts copying ``due``."""
        self.busy = True
        if due.forced:
            self._last_forced = now

    def failed(self, now: float, error: str) -> float:
        """A copy raised (no space, ...): back off; return the seconds until the next try."""
        self.busy = False
        self.failures += 1
        self.error = error
        delay = COPY_RETRY.delay(self.failures)
        self.retry_at = now + delay
        return delay

    @property
    def gave_up(self) -> bool:
        """A drain stops trying (``--once`` then exits non-zero)."""
        return self.failures >= GIVE_UP_AFTER

    def next_deadline(self, now: float, wall: float | None = None) -> float | None:
        """When :meth:`due` may change without any event (monotonic), or None."""
        if self.busy:
            return None
        if self.retry_at is not None and self.retry_at > now:
            return self.retry_at
        if self._changed_since is None:
            return None  # nothing pending; the periodic scan notices what events miss
        wall = time.time() if wall is None else wall
        times = [self._stable_since + self.settle]
        if self._seen:
            newest = max(s[2] for s in self._seen.values()) / 1e9
            times.append(now + newest + self.settle - wall)
        if self.max_wait and not self.is_set:
            times.append(max(self._changed_since, self._last_forced) + self.max_wait)
        t = min(times)
        return t if t > now else now + max(POLL_S, SCAN_REUSE * self._scan_cost)

    def pending(self, now: float) -> bool:
        """Is a version being written, settling, copied or retried (not yet taken)?"""
        return (self.busy or self._changed_since is not None
                or (self.retry_at is not None and not self.gave_up))

    def record(self, snap: Snapshot, rels: list[str], guard: list[str]) -> None:
        """Remember what was taken (or found identical), so it is not taken again."""
        self.busy = False
        self.failures, self.error, self.retry_at = 0, None, None
        self.renamed.clear()
        self._dirty = True
        if snap.skipped in ("changed", "missing"):
            return  # the next version will be taken
        for g in guard:
            with contextlib.suppress(FileNotFoundError):
                snap.stats.setdefault(g, stat_sig(os.stat(self.root / g)))
        self.taken = dict(snap.stats)
        self._changed_since = None
        self.reason = None
        if snap.signature and snap.skipped != "incomplete":
            self.last_signature = snap.signature


def _copyable(path: Path, empty_ok: bool) -> bool:
    """Worth copying before it is quiet: not visibly mid-write (a self-describing format
    whose structure is incomplete), readable, not empty (unless ``empty_ok``)."""
    try:
        return (empty_ok and path.stat().st_size == 0) or check_complete(path) is None
    except OSError:
        return False
