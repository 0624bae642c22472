"""Zero-code mode: sync the files a trainer already writes, one finished version at a time.

A :class:`WatchRule` names which files or directories form one checkpoint and how to know a
version is finished:

``file:PATTERN``
    The files matching ``PATTERN`` (a glob relative to the watched directory, e.g. ``ckpt.pt``
    or ``weights/*.pt``) form one checkpoint. A version is finished when every matching file
    was renamed into place since the last version (the temp-file-and-rename pattern: finished
    at once), or when none of them changed for ``settle`` seconds (a file rewritten in place
    with ``open(path, "wb")``).
``dir:GLOB:MARKER``
    Each directory matching ``GLOB`` (e.g. ``checkpoint-*``) is one version, finished when
    ``MARKER`` (a path inside it, e.g. ``DONE``) exists and the directory was quiet for
    ``settle`` seconds. The newest finished directory is taken; the trainer may delete old ones.

Options follow a ``;``: ``step=`` says where a version's step comes from. ``content`` (the
default): what the files say, never the name (:mod:`ckptsync.contentstep`: a Hugging Face
``trainer_state.json``'s ``global_step``, a ``torch.save`` dict's top-level ``step``,
``iter_num``, ``global_step``, else ``epoch``), else no step; ``name``: the first integer of
the file or directory name; ``REGEX``: the regex's first group, or the whole match, searched
in the relative path; ``none``: no step. E.g. ``dir:run/ckpt-*:DONE;step=ckpt-(\\d+)``. (A
name's first integer is often not a step: ``pretrain_64.pth``'s 64 is a hidden size.)

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
killed trainer is never committed. A version identical to the last one committed is skipped.
The spool checkpoint's manifest lists the original relative paths and has
``source = {"kind": "watched", "rule": ..., "paths": [...]}``; the daemon pushes it like a
native checkpoint. :func:`restore_watched` puts the newest version back at those paths,
all-or-nothing, writing only what the version's rule matches, never through a symlink.

Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import functools
import json
import logging
import os
import random
import re
import shutil
import stat
import struct
import tempfile
import time
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ckptsync.contentstep import content_step
from ckptsync.errors import (
    ConfigError,
    CorruptCheckpointError,
    LocalStorageError,
    ManifestError,
    NoCheckpointError,
)
from ckptsync.local import CHUNK, FileOps, LocalCheckpoint, LocalStore, storage_error
from ckptsync.manifest import Manifest, check_relpath, make_name

if TYPE_CHECKING:
    from ckptsync.remote import RemoteStore

__all__ = [
    "WATCH_DIR",
    "Due",
    "Snapshot",
    "VersionTracker",
    "WatchRule",
    "check_complete",
    "check_watched",
    "restore_watched",
    "snapshot_version",
    "structure_complete",
]

log = logging.getLogger("ckptsync.zerocode")

#: Names ckptsync keeps for itself in a watched directory: never a trainer's file.
PRIVATE_PREFIX = ".ckptsync-"
#: The daemon's private directory inside the watched directory (spool, status, lock).
WATCH_DIR = f"{PRIVATE_PREFIX}watch"
WATCHED = "watched"
_INT_RE = re.compile(r"\d+")
_STEP_WORDS = ("content", "name", "none")
_MAX_SAFETENSORS_HEADER = 100 << 20

StatSig = tuple[int, int, int, int]
"""(inode, size, mtime_ns, ctime_ns): changes whenever a file is rewritten or replaced."""


def stat_sig(st: os.stat_result) -> StatSig:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _is_private(rel: str) -> bool:
    """The daemon's directory, a pull's temp dir, a checkpointer's lock: ckptsync's own."""
    return rel.split("/", 1)[0].startswith(PRIVATE_PREFIX)


def glob_match(rel: str, pattern: str) -> bool:
    """Does ``rel`` match ``pattern`` as :meth:`pathlib.Path.glob` would list it?

    ``*``, ``?`` and ``[...]`` match within one path component (``fnmatch`` alone lets ``*``
    cross a ``/``); a ``**`` component matches any number of components.
    """
    parts, pats = rel.split("/"), pattern.split("/")

    @functools.cache
    def match(i: int, j: int) -> bool:
        if j == len(pats):
            return i == len(parts)
        if pats[j] == "**":
            return any(match(k, j + 1) for k in range(i, len(parts) + 1))
        return i < len(parts) and fnmatch.fnmatchcase(parts[i], pats[j]) and match(i + 1, j + 1)

    return match(0, 0)


@dataclass(frozen=True)
class WatchRule:
    """One zero-code rule, parsed from ``file:PATTERN`` or ``dir:GLOB:MARKER`` (see module doc).

    Raises:
        ConfigError: a malformed rule (the message shows the accepted forms).
    """

    kind: Literal["file", "dir"]
    pattern: str
    marker: str | None = None
    step: str = "content"
    """``content``, ``name``, ``none``, or a regex searched in the relative path."""
    spec: str = ""

    @classmethod
    def parse(cls, spec: str) -> WatchRule:
        """Parse a rule. Example: ``WatchRule.parse("dir:checkpoint-*:DONE")``."""
        text, _, opts = spec.partition(";")
        kind, _, rest = text.partition(":")
        step = "content"
        for opt in filter(None, (o.strip() for o in opts.split(";"))):
            key, eq, value = opt.partition("=")
            if key != "step" or not eq or not value:
                raise ConfigError(f"watch rule {spec!r}: unknown option {opt!r} (known: "
                                  "step=content|name|none|REGEX)")
            step = value.lower() if value.lower() in _STEP_WORDS else value
            if step not in _STEP_WORDS:
                try:
                    re.compile(step)
                except re.error as e:
                    raise ConfigError(f"watch rule {spec!r}: bad step regex ({e})") from e
        usage = ("expected 'file:PATTERN' or 'dir:GLOB:MARKER' with paths relative to the watched "
                 "directory, e.g. 'file:ckpt.pt' or 'dir:checkpoint-*:DONE'")
        if kind == "file" and rest and ":" not in rest:
            rule = cls("file", rest.strip("/"), None, step, spec)
        elif kind == "dir" and rest.count(":") == 1:
            glob, marker = rest.split(":")
            if not glob or not marker:
                raise ConfigError(f"invalid watch rule {spec!r}: {usage}")
            rule = cls("dir", glob.strip("/"), marker.strip("/"), step, spec)
        else:
            raise ConfigError(f"invalid watch rule {spec!r}: {usage}")
        for p in filter(None, (rule.pattern, rule.marker)):
            if p.startswith("/") or ".." in p.split("/") or _is_private(p):
                raise ConfigError(f"invalid watch rule {spec!r}: paths must be relative, "
                                  f"without '..', not under a {PRIVATE_PREFIX}* name")
        return rule

    # ------------------------------------------------------------------ matching
    def matches_file(self, rel: str) -> bool:
        """Does ``rel`` (a file path relative to the watched dir) belong to this rule?"""
        if _is_private(rel):
            return False
        if self.kind == "file":
            return glob_match(rel, self.pattern)
        return self.version_dir(rel) is not None

    def version_dir(self, rel: str) -> str | None:
        """For a dir rule: the matching version directory that contains (or is) ``rel``."""
        if self.kind != "dir":
            return None
        parts = rel.split("/")
        depth = len(self.pattern.split("/"))
        if len(parts) < depth:
            return None
        head = "/".join(parts[:depth])
        return head if glob_match(head, self.pattern) else None

    def step_of(self, rel: str) -> int | None:
        """The step a version's relative path names (``step=name`` or a regex), or None."""
        if self.step in ("content", "none"):
            return None
        if self.step == "name":
            m = _INT_RE.search(rel.rsplit("/", 1)[-1])
        else:
            found = re.search(self.step, rel)
            if found is None:
                return None
            m = _INT_RE.search((found.group(1) if found.groups() else found.group(0)) or "")
        if m is None:
            return None
        step = int(m.group(0))
        return step if step < 10**12 else None

    def step_for(self, root: Path, rels: list[str]) -> int | None:
        """The step of the version made of ``rels``: from its name or content, as ``step=``
        says (see the module doc)."""
        vdir = self.version_dir(rels[0]) if rels and self.kind == "dir" else None
        if self.step == "content":
            return content_step(root, rels, vdir)
        return self.step_of(vdir if vdir is not None else rels[0]) if rels else None

    # ------------------------------------------------------------------ listing
    def current_files(self, root: Path) -> list[str]:
        """For a file rule: the matching files that exist now, sorted."""
        return sorted(rel for rel in _glob(root, self.pattern) if (root / rel).is_file())

    def finished_dirs(self, root: Path) -> list[str]:
        """For a dir rule: matching directories holding the marker, oldest first."""
        marker = self.marker
        assert marker is not None
        out = [rel for rel in _glob(root, self.pattern)
               if (root / rel).is_dir() and (root / rel / marker).is_file()]
        return sorted(out, key=lambda rel: (self.step_of(rel) or -1, _mtime(root / rel / marker),
                                            _natural(rel)))


def _natural(rel: str) -> tuple[tuple[int, str], ...]:
    """``ckpt-9`` before ``ckpt-10``: digit runs compare as numbers."""
    return tuple((int(t), "") if t.isdigit() else (-1, t) for t in re.split(r"(\d+)", rel) if t)


def _mtime(p: Path) -> int:
    try:
        return p.stat().st_mtime_ns
    except OSError:
        return 0


def _glob(root: Path, pattern: str) -> list[str]:
    if not any(c in pattern for c in "*?["):
        return [pattern] if (root / pattern).exists() else []
    return [p.relative_to(root).as_posix() for p in root.glob(pattern)
            if not _is_private(p.relative_to(root).as_posix())]


def _dir_files(root: Path, rel_dir: str) -> list[str]:
    base = root / rel_dir
    return sorted(p.relative_to(root).as_posix() for p in base.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- completeness
def check_complete(path: Path) -> str | None:
    """Why ``path`` is visibly incomplete, or None when it looks whole.

    Torch-free structural checks: an empty file; a zip archive (``torch.save``'s format)
    whose central directory is missing or points past the end; a safetensors file whose
    header does not account for its size. Other formats are opaque and pass.
    """
    return _structure(path)[1]


def structure_complete(path: Path) -> bool:
    """Is ``path`` in a self-describing format (``torch.save``'s zip, safetensors) and whole?

    False for an opaque format, for an incomplete file and for one that cannot be read.
    """
    try:
        known, why = _structure(path)
    except OSError:
        return False
    return known and why is None


def _structure(path: Path) -> tuple[bool, str | None]:
    """``(self-describing format, why incomplete or None)``."""
    size = path.stat().st_size
    if size == 0:
        return False, "empty file"
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                for info in z.infolist():
                    if info.header_offset + info.compress_size > size:
                        return True, (f"zip member {info.filename} extends past the end of "
                                      "the file")
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            return True, f"not a complete zip archive ({e})"
        return True, None
    if path.suffix == ".safetensors" and len(head) == 8:
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_SAFETENSORS_HEADER):
            return True, f"safetensors header of {n} bytes does not fit in {size} bytes"
        try:
            with open(path, "rb") as f:
                f.seek(8)
                header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                      default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            return True, f"safetensors header unreadable ({e})"
        if 8 + n + end != size:
            return True, f"safetensors size {size} != {8 + n + end} announced by its header"
        return True, None
    return False, None


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
) -> Snapshot:
    """Copy ``rels`` (paths relative to ``root``) into a new spool checkpoint.

    Each file is hashed while copied; its stat is compared before and after its copy, and
    every file's (and the ``guard`` files', e.g. a directory rule's marker) from before the
    first copy to after the last, and the rule must still match exactly ``rels`` then (see
    the module doc: one version is one set). The copy is committed only if nothing
    changed, every file is structurally complete (:func:`check_complete`) and the content
    differs from ``last_signature``. The step is the rule's (:meth:`WatchRule.step_for`),
    read after every stat was taken, so the unchanged stats vouch for it too.

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
    try:
        for rel in rels:
            src = root / rel
            before = first[rel]
            if stat_sig(os.stat(src)) != before:
                raise _Changed(f"{rel} changed while the version was read")
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
            if rule.kind == "dir" and copy.stat().st_size == 0:
                continue  # an empty file in a finished directory: a marker, often
            why = check_complete(copy)
            if why is not None:
                staging.abort()
                return Snapshot(None, stats, skipped="incomplete", detail=f"{rel}: {why}")
        signature = tuple(sorted((e.path, f"{e.algo}:{e.digest}") for e in staging.entries))
        if signature == tuple(last_signature):
            staging.abort()
            return Snapshot(None, stats, signature, skipped="identical")
        manifest = Manifest.new(
            step=step, files=staging.entries, name=name,
            source={"kind": WATCHED, "rule": rule.spec, "paths": list(rels)},
        )
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


def _listing(root: Path, rule: WatchRule, rels: list[str]) -> list[str]:
    """The files that form the version of ``rels`` now: what the rule matches (a dir rule:
    the files of the version directory), sorted."""
    vdir = rule.version_dir(rels[0]) if rels and rule.kind == "dir" else None
    return _dir_files(root, vdir) if vdir is not None else rule.current_files(root)


def signature_of(m: Manifest) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((f.path, f"{f.algo}:{f.digest}") for f in m.files))


def is_watched(m: Manifest) -> bool:
    return m.source.get("kind") == WATCHED


# --------------------------------------------------------------------------- version tracking
#: While a version is changing (or waits for a moment to be copied), rescan this often.
POLL_S = 0.25
#: A failed copy (no space, ...) is retried after 1, 2, 4, ... seconds, at most this many.
RETRY_CAP_S = 60.0
#: Failed copies after which a drain (``--once``, the parent's exit) gives a rule up.
GIVE_UP_AFTER = 3


@dataclass(frozen=True)
class Due:
    """A version to copy now: its files, the files whose stat must not change meanwhile, and
    whether it is taken before it was quiet (``max_wait``)."""

    rels: list[str]
    guard: list[str]
    forced: bool = False


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
                rels = _dir_files(self.root, dirs[-1]) if dirs else []
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
        if force or self._finished(now, wall, rels, guard, sigs):
            return Due(rels, guard)
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
        delay = random.uniform(0.5, 1.0) * min(RETRY_CAP_S, 2.0 ** (self.failures - 1))
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


# --------------------------------------------------------------------------- restore
RESTORE_PREFIX = f"{PRIVATE_PREFIX}restore-"
JOURNAL = "journal.json"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


def check_watched(m: Manifest) -> WatchRule:
    """The watch rule of a watched manifest, after checking that it lists only what that rule
    matches: every file a path of the rule (a dir rule: inside one version directory), and
    exactly the files its ``source.paths`` names.

    Equal, not a subset: the daemon writes ``paths`` from the very list it copies, so any
    difference means the manifest was not written by ckptsync as it claims.

    Raises:
        ManifestError: naming the offending path; the checkpoint must not be used at all.
    """
    where = f"watched checkpoint {m.name}"
    refuse = ("; the bucket's content was not written: its manifest does not match its "
              "own watch rule (tampered with, or written by a broken tool)")
    spec = m.source.get("rule")
    if not isinstance(spec, str):
        raise ManifestError(f"{where}: source.rule is {spec!r}, not a watch rule{refuse}")
    try:
        rule = WatchRule.parse(spec)
    except ConfigError as e:
        raise ManifestError(f"{where}: {e}{refuse}") from None
    paths = m.source.get("paths")
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise ManifestError(f"{where}: source.paths is not a list of paths{refuse}")
    dirs: set[str] = set()
    for f in m.files:
        inside = rule.kind == "file" or len(f.path.split("/")) > len(rule.pattern.split("/"))
        if not inside or not rule.matches_file(f.path):
            raise ManifestError(f"{where}: refusing {f.path!r}, a path watch rule {spec!r} "
                                f"does not match{refuse}")
        if rule.kind == "dir":
            dirs.add(str(rule.version_dir(f.path)))
            if len(dirs) > 1:
                raise ManifestError(f"{where}: refusing {f.path!r}: one version of {spec!r} "
                                    f"is one directory, this one spans {sorted(dirs)}{refuse}")
    odd = sorted({f.path for f in m.files} ^ set(paths))
    if odd:
        raise ManifestError(f"{where}: refusing {odd[0]!r}: the files listed differ from the "
                            f"paths its source names{refuse}")
    return rule


def restore_watched(
    store: RemoteStore,
    target_dir: str | os.PathLike[str],
    name: str | None = None,
    *,
    rules: Sequence[str] = (),
    ops: FileOps | None = None,
) -> list[Manifest]:
    """Put the newest valid watched version(s) back at their original relative paths.

    With ``name``, that checkpoint; otherwise, for each watch rule found in the remote (or
    only those in ``rules``), its newest version that downloads intact and lists only what
    its rule matches (a corrupt or inconsistent one is logged and falls back to the next
    older). Without ``rules`` every rule the bucket names is trusted: pass the rules you
    watch when others can write to the bucket.

    Safety: every version is first pulled, digest-verified, into a private temporary store
    inside ``target_dir``; then every destination is checked (each directory between
    ``target_dir`` and the file a real directory, the file itself not a symlink nor a
    directory: refused otherwise, nothing written); then a journal listing every move is
    fsynced, then the files are renamed into place, a directory rule's marker last. A crash
    in between leaves that journal: the next ``restore_watched`` (``ckptsync pull``) into
    the same directory first finishes it, so ``ckptsync pull ... && train.py --resume`` is
    the safe recipe, and re-running an interrupted pull completes it, never leaves a mix.

    Args:
        store: the remote.
        target_dir: where the trainer's files live (created if missing).
        name: one checkpoint; a refused one raises instead of falling back.
        rules: restrict to versions of these rule specs (``file:ckpt.pt``).
        ops: file system calls (a fault seam for tests).

    Returns:
        The manifests restored; their ``files`` are exactly the paths written.

    Raises:
        NoCheckpointError: no (valid) watched checkpoint in the remote, or ``name`` missing.
        CorruptCheckpointError: ``name`` was given and does not verify or lists a path its
            rule does not match (a :class:`ManifestError`, naming the path).
        LocalStorageError: a destination is (or lies under) a symlink, or another pull is
            writing into ``target_dir``; or a move failed (re-run to finish).

    Example::

        restore_watched(RemoteStore("s3://bucket/run1"), "out/")   # then: train.py --resume
    """
    ops = ops or FileOps()
    pinned = {WatchRule.parse(r).spec for r in rules}
    target = Path(target_dir).expanduser().absolute()
    try:
        target.mkdir(parents=True, exist_ok=True)
        tfd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise storage_error(e, target, "open the pull target") from e
    try:
        try:
            fcntl.flock(tfd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released with the fd
        except BlockingIOError:
            raise LocalStorageError(f"another ckptsync pull is writing into {target}; "
                                    "wait for it to finish") from None
        except OSError as e:  # a file system without flock: pulls are not serialized there
            log.debug("cannot lock %s (%s); pulling without the lock", target, e)
        _finish_interrupted(target, tfd, ops)
        chosen = _choose(store, name, pinned)
        tmp = Path(tempfile.mkdtemp(prefix=RESTORE_PREFIX, dir=target))
        try:
            ckpts = [_pull_with_fallback(store, LocalStore(tmp, ops), m, name is None)
                     for m in chosen]
            moves = _plan(tmp, ckpts)
            for _, dst in moves:
                _check_destination(target, tfd, dst)
            _write_journal(tmp, moves, ops)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _apply(target, tfd, tmp, moves, ops)
    finally:
        os.close(tfd)
    for ckpt in ckpts:
        log.info("restored %s (%d files) into %s", ckpt.name, len(ckpt.manifest.files), target)
    return [c.manifest for c in ckpts]


def _choose(store: RemoteStore, name: str | None, pinned: set[str]) -> list[Manifest]:
    if name is not None:
        m = store.read_manifest(name)
        if m is None:
            raise NoCheckpointError(f"no committed checkpoint {store.url_of(name)}")
        if pinned and m.source.get("rule") not in pinned:
            raise NoCheckpointError(f"{store.url_of(name)} is not a version of watch rule "
                                    f"{' or '.join(sorted(pinned))}")
        return [m]
    by_rule: dict[str, list[Manifest]] = {}
    for m in store.list():
        if is_watched(m) and (not pinned or m.source.get("rule") in pinned):
            by_rule.setdefault(str(m.source.get("rule", "")), []).append(m)
    if not by_rule:
        which = f" of rule {' or '.join(sorted(pinned))}" if pinned else ""
        raise NoCheckpointError(f"no watched (zero-code) checkpoint{which} in {store.url_of()}")
    return [versions[-1] for versions in by_rule.values()]


def _pull_with_fallback(store: RemoteStore, tmp: LocalStore, m: Manifest,
                        fallback: bool) -> LocalCheckpoint:
    if not fallback:
        check_watched(m)  # before downloading anything
        return _pull_checked(store, tmp, m)
    rule = m.source.get("rule")
    older = [x for x in store.list() if is_watched(x) and x.source.get("rule") == rule]
    why = ""
    for cand in reversed(older):
        try:
            check_watched(cand)
            return _pull_checked(store, tmp, cand)
        except CorruptCheckpointError as e:
            log.warning("watched checkpoint %s is not usable, trying an older one: %s",
                        cand.name, e)
            why = why or f" (the newest: {e})"
    raise NoCheckpointError(f"no valid version of watch rule {rule!r} in {store.url_of()}{why}")


def _pull_checked(store: RemoteStore, tmp: LocalStore, m: Manifest) -> LocalCheckpoint:
    ckpt = store.pull(m.name, tmp)
    # The manifest pulled is read again: check that one, it is what the moves follow.
    if ckpt.manifest.source.get("rule") != m.source.get("rule"):
        raise ManifestError(f"watched checkpoint {m.name}: its rule changed during the pull; "
                            "the bucket's content was not written")
    check_watched(ckpt.manifest)
    return ckpt


def _plan(tmp: Path, ckpts: list[LocalCheckpoint]) -> list[tuple[str, str]]:
    """``(source relative to tmp, destination relative to the target)``, markers last."""
    moves: list[tuple[str, str]] = []
    markers: list[tuple[str, str]] = []
    for ckpt in ckpts:
        rule = WatchRule.parse(ckpt.manifest.source["rule"])
        for f in ckpt.manifest.files:
            move = (ckpt.file(f.path).relative_to(tmp).as_posix(), f.path)
            vdir = rule.version_dir(f.path)
            (markers if vdir and f.path == f"{vdir}/{rule.marker}" else moves).append(move)
    return moves + markers


def _refuse(target: Path, rel: str, what: str) -> LocalStorageError:
    return LocalStorageError(f"refusing to write into {target / rel}: {what}, and ckptsync "
                             "never writes through a symlink nor outside the directory it pulls "
                             "into; remove it or pull into another directory")


def _open_parent(target: Path, tfd: int, rel: str, *, create: bool) -> int | None:
    """An fd on ``rel``'s parent directory, each component below the target opened with
    ``O_NOFOLLOW``: a symlink (or a file) on the way is refused, never followed. None when a
    component is missing and ``create`` is false. The caller closes the fd."""
    parts = rel.split("/")[:-1]
    fd = os.dup(tfd)
    try:
        for i, part in enumerate(parts):
            here = "/".join(parts[: i + 1])
            try:
                nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    os.close(fd)
                    return None
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, dir_fd=fd)
                    os.fsync(fd)  # the new directory's entry survives a crash
                nfd = -1
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise _refuse(target, here, "it is a symlink or not a directory") from None
                raise storage_error(e, target / here, "open") from e
            if nfd < 0:  # just created, or raced: opened again, still without following
                try:
                    nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    raise _refuse(target, here, "it is a symlink or not a directory") from e
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def _check_leaf(target: Path, pfd: int, rel: str) -> None:
    try:
        st = os.lstat(rel.rsplit("/", 1)[-1], dir_fd=pfd)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode) or stat.S_ISDIR(st.st_mode):
        raise _refuse(target, rel, "it is a symlink or a directory")


def _check_destination(target: Path, tfd: int, rel: str) -> None:
    check_relpath(rel, where=str(target))
    if _is_private(rel):
        raise _refuse(target, rel, "the name is ckptsync's own")
    pfd = _open_parent(target, tfd, rel, create=False)
    if pfd is not None:
        try:
            _check_leaf(target, pfd, rel)
        finally:
            os.close(pfd)


def _write_journal(tmp: Path, moves: list[tuple[str, str]], ops: FileOps) -> None:
    with ops.open_write(tmp / f"{JOURNAL}.part") as f:
        f.write(json.dumps({"moves": moves}).encode())
        f.flush()
        ops.fsync(f.fileno())
    ops.rename(tmp / f"{JOURNAL}.part", tmp / JOURNAL)
    ops.fsync_dir(tmp)  # the journal is durable before the first move


def _apply(target: Path, tfd: int, tmp: Path, moves: list[tuple[str, str]],
           ops: FileOps) -> None:
    """Do (or finish) the journal's moves, then drop the temp dir. A source already gone was
    moved by the interrupted run: renames are atomic."""
    done = 0
    try:
        for src, dst in moves:
            _check_destination(target, tfd, dst)
            if not os.path.lexists(tmp / src):
                continue
            pfd = _open_parent(target, tfd, dst, create=True)
            assert pfd is not None
            try:
                # The leaf is checked again just before the rename (a symlink put there in
                # between is replaced by the rename, never followed).
                _check_leaf(target, pfd, dst)
                ops.replace_at(tmp / src, pfd, dst.rsplit("/", 1)[-1])
                ops.fsync(pfd)
            finally:
                os.close(pfd)
            done += 1
    except OSError as e:
        if not isinstance(e, LocalStorageError):
            e = storage_error(e, target, "move a pulled file into")
        raise LocalStorageError(
            f"pull into {target} stopped after {done} of {len(moves)} files: {e}; the rest "
            f"waits in {tmp.name}: fix the cause and run the same ckptsync pull again, it "
            "finishes this one first") from e
    os.unlink(tmp / JOURNAL)
    ops.fsync_dir(tmp)
    shutil.rmtree(tmp, ignore_errors=True)


def _finish_interrupted(target: Path, tfd: int, ops: FileOps) -> None:
    """Finish (roll forward) what a crashed pull into ``target`` journaled; drop the rest."""
    for entry in sorted(os.scandir(target), key=lambda e: e.name):
        if not entry.name.startswith(RESTORE_PREFIX) or not entry.is_dir(follow_symlinks=False):
            continue
        tmp = Path(entry.path)
        journal = tmp / JOURNAL
        if journal.is_file() and not journal.is_symlink():
            try:
                where = str(journal)
                moves = [(check_relpath(s, where=where), check_relpath(d, where=where))
                         for s, d in json.loads(journal.read_bytes())["moves"]]
            except (ValueError, KeyError, TypeError, ManifestError) as e:
                raise LocalStorageError(f"{journal}: unreadable journal of an interrupted pull "
                                        f"({e}); remove {tmp} and pull again") from e
            log.warning("finishing the interrupted pull into %s (%d files)", target, len(moves))
            _apply(target, tfd, tmp, moves, ops)
        else:  # crashed before its journal: it never touched the trainer's files
            shutil.rmtree(tmp, ignore_errors=True)
