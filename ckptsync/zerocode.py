"""Zero-code mode: sync the files a trainer already writes, one finished version at a time.

A :class:`WatchRule` names which files or directories form one checkpoint and how to know a
version is finished:

``file:PATTERN``
    The files matching ``PATTERN`` (a glob relative to the watched directory, e.g. ``ckpt.pt``
    or ``weights/*.pt``) form one checkpoint. A version is finished when a matching file is
    renamed into place (the temp-file-and-rename pattern: finished at once), or when every
    matching file was closed after writing and nothing touched them for ``settle`` seconds
    (the file rewritten in place with ``open(path, "wb")``).
``dir:GLOB:MARKER``
    Each directory matching ``GLOB`` (e.g. ``checkpoint-*``) is one version, finished when
    ``MARKER`` (a path inside it, e.g. ``DONE``) exists and the directory was quiet for
    ``settle`` seconds. The newest finished directory is taken; the trainer may delete old ones.

Options follow a ``;``: ``step=REGEX`` (the step is the regex's first group, or the whole
match, searched in the relative path; default: the first integer in the file or directory
name; ``step=none`` for no step), e.g. ``dir:run/ckpt-*:DONE;step=ckpt-(\\d+)``.

Each finished version is copied into a local spool (a :class:`~ckptsync.local.LocalStore`),
hashed while copying. The source is ``stat``-ed before and after the copy (size, mtime,
inode, ctime): a file rewritten during the copy is discarded, never committed, and the next
version is taken instead. Files in a self-describing format (``torch.save``'s zip format,
safetensors) are also checked to be structurally complete, so a file left half-written by a
killed trainer is never committed. A version identical to the last one committed is skipped.
The spool checkpoint's manifest lists the original relative paths and has
``source = {"kind": "watched", "rule": ..., "paths": [...]}``; the daemon pushes it like a
native checkpoint. :func:`restore_watched` puts the newest version back at those paths.

Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import re
import secrets
import shutil
import struct
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ckptsync.errors import ConfigError, CorruptCheckpointError, NoCheckpointError
from ckptsync.local import CHUNK, LocalCheckpoint, LocalStore
from ckptsync.manifest import Manifest, check_relpath, make_name

if TYPE_CHECKING:
    from ckptsync.remote import RemoteStore

__all__ = [
    "WATCH_DIR",
    "Snapshot",
    "VersionTracker",
    "WatchRule",
    "check_complete",
    "restore_watched",
    "snapshot_version",
]

log = logging.getLogger("ckptsync.zerocode")

#: The daemon's private directory inside the watched directory (spool, status, lock).
WATCH_DIR = ".ckptsync-watch"
WATCHED = "watched"
_INT_RE = re.compile(r"\d+")

StatSig = tuple[int, int, int, int]
"""(inode, size, mtime_ns, ctime_ns): changes whenever a file is rewritten or replaced."""


def stat_sig(st: os.stat_result) -> StatSig:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _is_private(rel: str) -> bool:
    return rel.split("/", 1)[0] == WATCH_DIR


@dataclass(frozen=True)
class WatchRule:
    """One zero-code rule, parsed from ``file:PATTERN`` or ``dir:GLOB:MARKER`` (see module doc).

    Raises:
        ConfigError: a malformed rule (the message shows the accepted forms).
    """

    kind: Literal["file", "dir"]
    pattern: str
    marker: str | None = None
    step_regex: str | None = ""  # "" = default (first integer of the name), None = no step
    spec: str = ""

    @classmethod
    def parse(cls, spec: str) -> WatchRule:
        """Parse a rule. Example: ``WatchRule.parse("dir:checkpoint-*:DONE")``."""
        text, _, opts = spec.partition(";")
        kind, _, rest = text.partition(":")
        step: str | None = ""
        for opt in filter(None, (o.strip() for o in opts.split(";"))):
            key, eq, value = opt.partition("=")
            if key != "step" or not eq:
                raise ConfigError(
                    f"watch rule {spec!r}: unknown option {opt!r} (known: step=REGEX)"
                )
            step = None if value.lower() == "none" else value
            if step is not None:
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
                                  f"without '..', outside {WATCH_DIR}")
        return rule

    # ------------------------------------------------------------------ matching
    def matches_file(self, rel: str) -> bool:
        """Does ``rel`` (a file path relative to the watched dir) belong to this rule?"""
        if _is_private(rel):
            return False
        if self.kind == "file":
            return fnmatch.fnmatchcase(rel, self.pattern)
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
        return head if fnmatch.fnmatchcase(head, self.pattern) else None

    def step_of(self, rel: str) -> int | None:
        """The step a version's relative path names, or None."""
        if self.step_regex is None:
            return None
        if self.step_regex:
            m = re.search(self.step_regex, rel)
            if m is None:
                return None
            text = m.group(1) if m.groups() else m.group(0)
            digits = _INT_RE.search(text or "")
            return int(digits.group(0)) if digits else None
        m = _INT_RE.search(rel.rsplit("/", 1)[-1])
        if m is None:
            return None
        step = int(m.group(0))
        return step if step < 10**12 else None

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
        return sorted(out, key=lambda rel: (self.step_of(rel) or -1, _mtime(root / rel / marker)))


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
    size = path.stat().st_size
    if size == 0:
        return "empty file"
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                for info in z.infolist():
                    if info.header_offset + info.compress_size > size:
                        return f"zip member {info.filename} extends past the end of the file"
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            return f"not a complete zip archive ({e})"
        return None
    if path.suffix == ".safetensors" and len(head) == 8:
        (n,) = struct.unpack("<Q", head)
        try:
            with open(path, "rb") as f:
                f.seek(8)
                header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                      default=0)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            return f"safetensors header unreadable ({e})"
        if 8 + n + end != size:
            return f"safetensors size {size} != {8 + n + end} announced by its header"
    return None


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
    step: int | None,
    last_signature: tuple[tuple[str, str], ...] = (),
    guard: Iterable[str] = (),
) -> Snapshot:
    """Copy ``rels`` (paths relative to ``root``) into a new spool checkpoint.

    Each file is hashed while copied; its stat is compared before and after (and the
    ``guard`` files', e.g. a directory rule's marker). The copy is committed only if nothing
    changed, every file is structurally complete (:func:`check_complete`) and the content
    differs from ``last_signature``.
    """
    name = make_name(step)
    staging = spool.staging(name)
    stats: dict[str, StatSig] = {}
    try:
        guards = {g: stat_sig(os.stat(root / g)) for g in guard}
        for rel in rels:
            check_relpath(rel, where=spool.directory.as_posix())
            src = root / rel
            before = stat_sig(os.stat(src))
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
        for g, sig in guards.items():
            if stat_sig(os.stat(root / g)) != sig:
                raise _Changed(f"{g} changed while the version was copied")
        for rel in rels:
            why = check_complete(staging.path / rel)
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


def signature_of(m: Manifest) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((f.path, f"{f.algo}:{f.digest}") for f in m.files))


def is_watched(m: Manifest) -> bool:
    return m.source.get("kind") == WATCHED


# --------------------------------------------------------------------------- version tracking
@dataclass
class VersionTracker:
    """Decides, from file events and scans, when a rule has a finished version to take.

    Fed by the daemon's dispatcher thread only (not thread-safe by design).
    """

    rule: WatchRule
    root: Path
    settle: float
    dirty: set[str] = field(default_factory=set)
    last_event: float = 0.0
    moved_in: bool = False
    taken: dict[str, StatSig] = field(default_factory=dict)
    taken_dir: str | None = None
    last_signature: tuple[tuple[str, str], ...] = ()
    busy: bool = False

    def on_event(self, kind: str, rel: str, now: float, is_dir: bool = False) -> bool:
        """Record a file event; True if it concerns this rule."""
        if not self.rule.matches_file(rel) and self.rule.version_dir(rel) is None:
            return False
        if is_dir:
            pass  # a directory is never "being written"; its files are
        elif kind in ("created", "modified"):
            self.dirty.add(rel)
            self.moved_in = False
        elif kind in ("closed", "moved_in"):
            self.dirty.discard(rel)
            self.moved_in = kind == "moved_in" and self.rule.kind == "file"
        elif kind in ("deleted", "moved_away"):
            self.dirty.discard(rel)
        self.last_event = now
        return True

    def _quiet(self, now: float, wall: float, mtimes: Iterable[int]) -> bool:
        if self.dirty:
            return False
        if self.moved_in:
            return True
        newest = max(mtimes, default=0) / 1e9
        return now - self.last_event >= self.settle and wall - newest >= self.settle

    def due(self, now: float, wall: float, *, force: bool = False) -> tuple[list[str], int | None,
                                                                             list[str]] | None:
        """The version to take now: ``(relpaths, step, guard paths)``, or None.

        ``force`` ignores the settle time (``--once``), never the dirty state.
        """
        if self.busy:
            return None
        if self.rule.kind == "file":
            rels = self.rule.current_files(self.root)
            if not rels:
                return None
            try:
                sigs = {r: stat_sig(os.stat(self.root / r)) for r in rels}
            except FileNotFoundError:
                return None
            if sigs == self.taken:
                return None
            if not force and not self._quiet(now, wall, (s[2] for s in sigs.values())):
                return None
            step = next((s for s in map(self.rule.step_of, rels) if s is not None), None)
            return rels, step, []
        assert self.rule.marker is not None
        dirs = self.rule.finished_dirs(self.root)
        if not dirs:
            return None
        newest = dirs[-1]
        marker = f"{newest}/{self.rule.marker}"
        try:
            msig = stat_sig(os.stat(self.root / marker))
        except FileNotFoundError:
            return None
        if self.taken_dir == newest and self.taken.get(marker) == msig:
            return None
        if not force and not self._quiet(now, wall, [msig[2]]):
            return None
        return _dir_files(self.root, newest), self.rule.step_of(newest), [marker]

    def next_deadline(self, now: float) -> float | None:
        """When a settling version may become due (monotonic), or None."""
        if self.last_event and not self.dirty and not self.busy:
            t = self.last_event + self.settle
            return t if t > now else None
        return None

    def pending(self, now: float) -> bool:
        """Is a version being written, settling or being copied (not yet taken)?"""
        return self.busy or bool(self.dirty) or self.next_deadline(now) is not None

    def record(self, snap: Snapshot, rels: list[str], guard: list[str]) -> None:
        """Remember what was taken (or found identical), so it is not taken again."""
        if snap.skipped in ("changed", "missing"):
            return  # the next version will be taken
        if self.rule.kind == "dir" and rels:
            self.taken_dir = self.rule.version_dir(rels[0])
            for g in guard:
                with contextlib.suppress(FileNotFoundError):
                    snap.stats[g] = stat_sig(os.stat(self.root / g))
        self.taken = dict(snap.stats)
        self.moved_in = False
        if snap.signature and snap.skipped != "incomplete":
            self.last_signature = snap.signature


# --------------------------------------------------------------------------- restore
def restore_watched(
    store: RemoteStore, target_dir: str | os.PathLike[str], name: str | None = None
) -> list[Manifest]:
    """Put the newest valid watched version(s) back at their original relative paths.

    With ``name``, that checkpoint; otherwise, for each watch rule found in the remote, its
    newest version that downloads intact (every digest verified; a corrupt one falls back to the
    next older). Each version is pulled into a temporary store inside ``target_dir`` (same
    file system), then every file is moved into place with ``os.replace``: a reader sees the
    old file or the new one, never a half-written one.

    Returns:
        The manifests restored.

    Raises:
        NoCheckpointError: no (valid) watched checkpoint in the remote, or ``name`` missing.
        CorruptCheckpointError: ``name`` was given and does not verify.

    Example::

        restore_watched(RemoteStore("s3://bucket/run1"), "out/")   # then: train.py --resume
    """
    target = Path(target_dir).expanduser().absolute()
    target.mkdir(parents=True, exist_ok=True)
    if name is not None:
        m = store.read_manifest(name)
        if m is None:
            raise NoCheckpointError(f"no committed checkpoint {store.url_of(name)}")
        chosen = [m]
    else:
        by_rule: dict[str, list[Manifest]] = {}
        for m in store.list():
            if is_watched(m):
                by_rule.setdefault(str(m.source.get("rule", "")), []).append(m)
        if not by_rule:
            raise NoCheckpointError(f"no watched (zero-code) checkpoint in {store.url_of()}")
        chosen = [versions[-1] for versions in by_rule.values()]
    tmp = LocalStore(target / f".ckptsync-restore-{secrets.token_hex(4)}")
    restored: list[Manifest] = []
    try:
        for m in chosen:
            ckpt = _pull_with_fallback(store, tmp, m, name is None)
            for entry in ckpt.manifest.files:
                dst = target.joinpath(*check_relpath(entry.path, where=str(target)).split("/"))
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(ckpt.file(entry.path), dst)
            restored.append(ckpt.manifest)
            log.info("restored %s (%d files) into %s", ckpt.name, len(ckpt.manifest.files), target)
    finally:
        shutil.rmtree(tmp.directory, ignore_errors=True)
    return restored


def _pull_with_fallback(store: RemoteStore, tmp: LocalStore, m: Manifest,
                        fallback: bool) -> LocalCheckpoint:
    if not fallback:
        return store.pull(m.name, tmp)
    rule = m.source.get("rule")
    older = [x for x in store.list() if is_watched(x) and x.source.get("rule") == rule]
    for cand in reversed(older):
        try:
            return store.pull(cand.name, tmp)
        except CorruptCheckpointError as e:
            log.warning("watched checkpoint %s is corrupt, trying an older one: %s", cand.name, e)
    raise NoCheckpointError(f"no valid version of watch rule {rule!r} in {store.url_of()}")
