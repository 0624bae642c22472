"""Zero-code versions: when a rule's files form a finished version, and copying it whole.

When is a version finished? Scans are truth, events only wake the daemon up: the tracker
stats the rule's files itself, and a version whose files' stats (inode, size, mtime, ctime)
are unchanged for ``settle`` seconds (or whose newest mtime is that old) is quiet, whatever
events arrived. A file renamed into place is finished at once; so is a directory whose marker
was written last (its mtime is the newest of the directory's). At start-up, what was already
finished is taken at once: quiet files, directories holding their marker, and files whose
structure (``torch.save``'s zip, safetensors) is complete. A file rewritten more often than
``settle`` is still taken at least every ``max_wait`` seconds: when its structure looks
complete the copy is attempted anyway, and committed only when its stat is identical before
and after the copy and the copy's structure is complete.

One version of a rule is a *set*: every file the rule matches (a dir rule: every file of
one version directory), all quiet, copied while the stat of every one of them stays unchanged
from before the first file's copy to after the last one's, and the rule still matching exactly
that set after the last copy. Each file then held the content copied during the whole copy,
so the set committed was on disk, as a whole, at one time; a file rewritten, a file deleted
(the trainer's rotation) or a file added during the copy discards the attempt (no failure,
nothing committed) and the next scan tries again. A file still being written for the first
time is not quiet (its mtime keeps moving), so a set waits for it. The set need not be the
one the last version had: a trainer may add or drop files. ``max_wait`` forces a set only
when every file of it looks whole (its structure complete, or a non-empty opaque file), and
commits it under the same whole-set check. A set is quiet only when *all* its files are, so
``settle`` must be longer than the time the trainer takes to write all the files of one save
(0.5 s between ``pretrain_512.pth`` and ``pretrain_512_moe.pth``: a ``settle`` of 0.5 s or
less can take the first file new and the second still old, a set that was on disk but mixes
two saves); a rename finishes the set only once every file of it was renamed in, and a rule
naming one file (``file:ckpt.pt``) has no such constraint.

Each finished version is copied into a local spool (a :class:`~ckptsync.local.LocalStore`),
hashed while copying. The source is ``stat``-ed before and after the copy (size, mtime,
inode, ctime): a file rewritten during the copy is discarded, never committed, and the next
version is taken instead. Files in a self-describing format (``torch.save``'s zip format,
safetensors) are also checked to be structurally complete, so a file left half-written by a
killed trainer is never committed. A version identical to the last one committed is skipped
(under a key too, after a restart: an encrypted remote manifest holds each file's keyed MAC,
see :func:`same_version`).

A file renamed into place (the temp-file-and-rename pattern: its inode is never written
again) is spooled by hard link instead of a copy, so the spool does not double the disk: the
link is read once to hash it, and the same stat check holds (inode, size and mtime unchanged
from before the link to after the read; the link itself moves the ctime). A trainer that
later rewrites that very file in place (``open(path, "wb")`` keeps the inode) changes the
spooled bytes too: the upload hashes what it reads and refuses a file that no longer matches
its manifest, so such a version is never committed, and the daemon drops it for the next one
(``push_dropped``, reason ``changed``). Where a link is refused (another file system,
EPERM, no links), the file is copied.

:class:`VersionTracker` decides when a version is due (the daemon's dispatcher feeds it);
:func:`snapshot_version` copies one into the spool.

Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ckptsync.local import CHUNK, LocalCheckpoint, LocalStore, Staging
from ckptsync.manifest import (
    SEQ_FIELD,
    WRITE_ALGO,
    FileEntry,
    Manifest,
    check_relpath,
    make_name,
    new_hasher,
)
from ckptsync.transfer.retry import RetryPolicy
from ckptsync.zerocode.metrics import content_metrics
from ckptsync.zerocode.rules import (
    WATCHED,
    StatSig,
    WatchRule,
    check_complete,
    dir_files,
    stat_sig,
    structure_complete,
)

if TYPE_CHECKING:
    from ckptsync.crypto import KeyRing

__all__ = [
    "GIVE_UP_AFTER",
    "POLL_S",
    "RETRY_CAP_S",
    "Due",
    "Snapshot",
    "VersionTracker",
    "same_version",
    "signature_of",
    "snapshot_version",
]


# --------------------------------------------------------------------------- snapshots
@dataclass
class Snapshot:
    """The outcome of one :func:`snapshot_version` call.

    ``ckpt`` is the committed spool checkpoint, or None when nothing was committed, with the
    reason in ``skipped`` ("changed", "incomplete", "identical", "missing").
    """

    ckpt: LocalCheckpoint | None
    stats: dict[str, StatSig] = field(default_factory=dict)
    signature: tuple[tuple[str, str], ...] = ()
    skipped: str | None = None
    detail: str = ""


class _Changed(Exception):
    pass


def snapshot_version(
    spool: LocalStore,
    root: Path,
    rule: WatchRule,
    rels: list[str],
    *,
    last_signature: tuple[tuple[str, str], ...] = (),
    guard: Iterable[str] = (),
    link: Iterable[str] = (),
    keys: KeyRing | None = None,
    seq: int | None = None,
) -> Snapshot:
    """Copy ``rels`` (paths relative to ``root``) into a new spool checkpoint.

    Each file is hashed while copied; its stat is compared before and after its copy, and
    every file's (and the ``guard`` files', e.g. a directory rule's marker) from before the
    first copy to after the last, and the rule must still match exactly ``rels`` then (see
    the module doc: one version is one set). The copy is committed only if nothing
    changed, every file is structurally complete (:func:`check_complete`) and the content
    differs from ``last_signature`` (:func:`same_version`, with ``keys`` where it came from an
    encrypted remote manifest). The step is the rule's (:meth:`WatchRule.step_for`),
    read after every stat was taken, so the unchanged stats vouch for it too. ``seq``: a
    step-less version's place in the run (:attr:`Manifest.seq`), given by the daemon in the
    order it takes versions (from the remote's highest), so that pushing the newest first
    never makes an older version look newer.

    The files in ``link`` (renamed into place since the last version) are hard-linked into
    the spool instead of copied where the file system allows (see the module doc).

    Raises:
        OSError: the spool cannot be written (a :class:`LocalStorageError`: no space, ...).
    """
    for rel in rels:
        check_relpath(rel, where=spool.directory.as_posix())
    try:
        guards = {g: stat_sig(os.stat(root / g)) for g in guard}
        first = {rel: stat_sig(os.stat(root / rel)) for rel in rels}
    except FileNotFoundError as e:
        return Snapshot(None, {}, skipped="missing", detail=str(e))
    step = rule.step_for(root, rels)
    name = make_name(step)
    staging = spool.staging(name)
    stats: dict[str, StatSig] = {}
    linkable = set(link)
    try:
        for rel in rels:
            src = root / rel
            before = first[rel]
            if stat_sig(os.stat(src)) != before:
                raise _Changed(f"{rel} changed while the version was read")
            if rel in linkable and (linked := _link(staging, rel, src, before)) is not None:
                first[rel] = stats[rel] = linked  # the link moved its ctime, nothing else
                continue
            with open(src, "rb") as f:
                if stat_sig(os.fstat(f.fileno())) != before:
                    raise _Changed(f"{rel} was replaced while opening it")
                w = staging.open(rel)
                while chunk := f.read(CHUNK):
                    w.write(chunk)
                staging.close_file(rel)
            after = stat_sig(os.stat(src))
            if after != before or w.size != before[1]:
                raise _Changed(f"{rel} changed while it was copied")
            stats[rel] = after
        # The whole set again, after the last copy: each file unchanged from before the first
        # copy to after the last means the set copied was on disk, as a whole, at one time.
        for g, sig in {**first, **guards}.items():
            if stat_sig(os.stat(root / g)) != sig:
                raise _Changed(f"{g} changed while the version was copied")
        listed = _listing(root, rule, rels)
        if listed != sorted(rels):
            odd = sorted(set(listed) ^ set(rels))
            raise _Changed(f"the rule's files changed while the version was copied ({odd[0]} "
                           f"{'appeared' if odd[0] in listed else 'disappeared'})")
        for rel in rels:
            copy = staging.path / rel
            if rule.kind == "dir" and copy.stat().st_size == 0 and copy.suffix != ".json":
                continue  # an empty file in a finished directory: a marker, often
            why = check_complete(copy)
            if why is not None:
                staging.abort()
                return Snapshot(None, stats, skipped="incomplete", detail=f"{rel}: {why}")
        signature = tuple(sorted((e.path, f"{e.algo}:{e.digest}") for e in staging.entries))
        if same_version(signature, tuple(last_signature), keys):
            staging.abort()
            return Snapshot(None, stats, signature, skipped="identical")
        manifest = Manifest.new(
            step=step, files=staging.entries, name=name,
            source={"kind": WATCHED, "rule": rule.spec, "paths": list(rels)},
            # What the framework recorded (trainer_state.json, val_loss=... in a file name):
            # shown by `ls`, ranked by --keep-best. Read from the copy: the version's own.
            metrics=content_metrics(staging.path, list(rels)),
        )
        if step is None and seq is not None:
            manifest = dataclasses.replace(manifest, unknown={**manifest.unknown, SEQ_FIELD: seq})
        ckpt = staging.commit(manifest)
        return Snapshot(ckpt, stats, signature)
    except _Changed as e:
        staging.abort()
        return Snapshot(None, stats, skipped="changed", detail=str(e))
    except FileNotFoundError as e:
        staging.abort()
        return Snapshot(None, stats, skipped="missing", detail=str(e))
    except BaseException:
        staging.abort()
        raise


def _link(staging: Staging, rel: str, src: Path, before: StatSig) -> StatSig | None:
    """Hard-link ``src`` (stat-ed as ``before``) into ``staging`` and hash the link; its
    stat after the read, or None where no link can be made (the caller copies)."""
    target = staging.link_file(rel, src)
    if target is None:
        return None
    digest, size = new_hasher(WRITE_ALGO), 0
    with open(target, "rb") as f:
        linked = stat_sig(os.fstat(f.fileno()))
        # Inode, size, mtime: the very file stat-ed, not written since (a link moves only the
        # ctime, which must then hold until after the read).
        if linked[:3] != before[:3]:
            raise _Changed(f"{rel} was replaced or rewritten while it was linked")
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
        os.fsync(f.fileno())  # the trainer's bytes durable before the spool commit says so
    after = stat_sig(os.stat(src))
    if after != linked or size != before[1]:
        raise _Changed(f"{rel} changed while it was read")
    staging.add_entry(FileEntry(rel, size, WRITE_ALGO, digest.hexdigest()))
    return after


def _listing(root: Path, rule: WatchRule, rels: list[str]) -> list[str]:
    """The files that form the version of ``rels`` now: what the rule matches (a dir rule:
    the files of the version directory), sorted."""
    vdir = rule.version_dir(rels[0]) if rels and rule.kind == "dir" else None
    return dir_files(root, vdir) if vdir is not None else rule.current_files(root)


def signature_of(m: Manifest) -> tuple[tuple[str, str], ...]:
    """What a version's content is known by: per file, ``algo:digest`` of its plaintext; for
    a file of an encrypted remote manifest (whose digest covers ciphertext under a fresh salt
    per upload), ``mac:<key id>:<name>:<mac>``, the keyed MAC of its plaintext digest
    (:func:`ckptsync.crypto.content_mac`) that :func:`same_version` checks with the key."""
    def sig(f: FileEntry) -> str:
        enc = f.encryption
        if enc is not None and enc.mac is not None:
            return f"{_MAC}:{enc.key_id}:{m.name}:{enc.mac}"
        return f"{f.algo}:{f.digest}"

    return tuple(sorted((f.path, sig(f)) for f in m.files))


def same_version(new: tuple[tuple[str, str], ...], last: tuple[tuple[str, str], ...],
                 keys: KeyRing | None) -> bool:
    """Whether ``new`` (plaintext digests, from a copy) is the content ``last`` describes. So
    a daemon restarted under a key knows the version it uploaded before from the remote
    manifest alone: each MAC of ``last`` is recomputed from ``new``'s digest with the key of
    its id (a key not at hand: not the same, it is uploaded again)."""
    if new == last:
        return True
    if keys is None or [p for p, _ in new] != [p for p, _ in last]:
        return False
    for (path, sig), (_, was) in zip(new, last, strict=True):
        if not was.startswith(_MAC + ":"):
            if sig != was:
                return False
            continue
        head, mac = was.rsplit(":", 1)
        _, kid, name = head.split(":", 2)
        algo, digest = sig.split(":", 1)
        if keys.mac(kid, name, path, algo, digest) != mac:
            return False
    return True


# --------------------------------------------------------------------------- version tracking
#: While a version is changing (or waits for a moment to be copied), rescan this often.
POLL_S = 0.25
_MAC = "mac"
#: A failed copy (no space, ...) is retried after 1, 2, 4, ... seconds, at most this many.
RETRY_CAP_S = 60.0
COPY_RETRY = RetryPolicy(1.0, RETRY_CAP_S)
#: Failed copies after which a drain (``--once``, the parent's exit) gives a rule up.
GIVE_UP_AFTER = 3


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


@dataclass
class VersionTracker:
    """Decides, from its own scans of the rule's files, when a rule has a finished version.

    Events are hints: they wake the daemon up, and a rename into place marks a file rule's
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
            it is quiet).
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
    _seen: dict[str, StatSig] | None = None
    _stable_since: float = 0.0
    _changed_since: float | None = None
    _initial: dict[str, StatSig] | None = None
    _last_forced: float = float("-inf")

    def on_event(self, kind: str, rel: str, now: float, is_dir: bool = False) -> bool:
        """Take a file event as a hint; True if it concerns this rule (wake up and rescan)."""
        if not self.rule.matches_file(rel) and self.rule.version_dir(rel) is None:
            return False
        if not is_dir and kind in ("created", "modified"):
            self.renamed.discard(rel)
        elif not is_dir and kind == "moved_in" and self.rule.kind == "file":
            self.renamed.add(rel)
        return True

    def _scan(self, now: float) -> tuple[list[str], list[str], dict[str, StatSig]] | None:
        """The rule's current candidate ``(rels, guard, stats)``; updates what was observed."""
        found: tuple[list[str], list[str], dict[str, StatSig]] | None = None
        try:
            if self.rule.kind == "file":
                rels = self.rule.current_files(self.root)
                guard: list[str] = []
            else:
                dirs = self.rule.finished_dirs(self.root)
                rels = dir_files(self.root, dirs[-1]) if dirs else []
                guard = [f"{dirs[-1]}/{self.rule.marker}"] if dirs else []
            if rels:
                found = rels, guard, {r: stat_sig(os.stat(self.root / r))
                                      for r in dict.fromkeys(rels + guard)}
        except FileNotFoundError:
            found = None  # deleted while listed: the next scan sees what is left
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
        """The version to take now, or None.

        ``force`` (a drain: ``--once``, the parent's exit) ignores the settle time; a rule
        whose copies failed :data:`GIVE_UP_AFTER` times is then given up.
        """
        if self.busy or (self.retry_at is not None and now < self.retry_at):
            return None
        if force and self.failures >= GIVE_UP_AFTER:
            return None
        found = self._scan(now)
        if found is None or found[2] == self.taken:
            return None
        rels, guard, sigs = found
        link = frozenset(self.renamed.intersection(rels)) if self.rule.kind == "file" \
            else frozenset()
        if force or self._finished(now, wall, rels, guard, sigs):
            return Due(rels, guard, link=link)
        if (self.max_wait and self._changed_since is not None
                and now - self._changed_since >= self.max_wait
                and now - self._last_forced >= self.max_wait
                and all(_copyable(self.root / r, self.rule.kind == "dir") for r in rels)):
            return Due(rels, guard, forced=True)
        return None

    def _finished(self, now: float, wall: float, rels: list[str], guard: list[str],
                  sigs: dict[str, StatSig]) -> bool:
        if self.rule.kind == "file" and self.renamed.issuperset(rels):
            return True  # every file of the set renamed into place: each one is whole
        newest = max(s[2] for s in sigs.values())
        if now - self._stable_since >= self.settle or wall - newest / 1e9 >= self.settle:
            return True  # quiet
        at_start = sigs == self._initial
        if self.rule.kind == "dir":
            # The marker written last (or present at start-up): the trainer said it is done.
            return at_start or any(sigs[g][2] >= newest for g in guard)
        return at_start and all(structure_complete(self.root / r) for r in rels)

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
        if self.max_wait:
            times.append(max(self._changed_since, self._last_forced) + self.max_wait)
        t = min(times)
        return t if t > now else now + POLL_S

    def pending(self, now: float) -> bool:
        """Is a version being written, settling, copied or retried (not yet taken)?"""
        return (self.busy or self._changed_since is not None
                or (self.retry_at is not None and not self.gave_up))

    def record(self, snap: Snapshot, rels: list[str], guard: list[str]) -> None:
        """Remember what was taken (or found identical), so it is not taken again."""
        self.busy = False
        self.failures, self.error, self.retry_at = 0, None, None
        self.renamed.clear()
        if snap.skipped in ("changed", "missing"):
            return  # the next version will be taken
        for g in guard:
            with contextlib.suppress(FileNotFoundError):
                snap.stats.setdefault(g, stat_sig(os.stat(self.root / g)))
        self.taken = dict(snap.stats)
        self._changed_since = None
        if snap.signature and snap.skipped != "incomplete":
            self.last_signature = snap.signature


def _copyable(path: Path, empty_ok: bool) -> bool:
    """Worth copying before it is quiet: not visibly mid-write (a self-describing format
    whose structure is incomplete), readable, not empty (unless ``empty_ok``)."""
    try:
        return (empty_ok and path.stat().st_size == 0) or check_complete(path) is None
    except OSError:
        return False

