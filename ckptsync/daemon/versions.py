"""Zero-code versions: copying a finished version whole into the spool.

When a version is finished is :mod:`~ckptsync.daemon.tracker`'s question; this module copies
the version it found finished (:func:`snapshot_version`) and tells what a version's content is
known by (:func:`signature_of`, :func:`same_version`).

One version of a rule is a *set*: every file the rule matches (a dir rule: every file of
one version directory), copied while the stat of every one of them stays unchanged from when
the tracker found it finished (``expect``), through before the first file's copy, to after
the last one's, and the rule still matching exactly that set after the last copy. Each file
then held the content copied during the whole copy, so the set committed was on disk, as a
whole, at one time, and it is the set the tracker proved to be one save; a file rewritten, a
file deleted (the trainer's rotation) or a file added meanwhile discards the attempt (no
failure, nothing committed) and the next scan tries again. The set need not be the one the
last version had: a trainer may add or drop files.

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

Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar, cast

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
from ckptsync.zerocode.metrics import content_metrics
from ckptsync.zerocode.rules import (
    WATCHED,
    StatSig,
    WatchRule,
    check_complete,
    dir_files,
    stat_sig,
)

if TYPE_CHECKING:
    from ckptsync.crypto import KeyRing

__all__ = [
    "Snapshot",
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


#: A version of this many files or more is copied on :data:`COPY_THREADS` threads.
PARALLEL_FROM = 16
COPY_THREADS = 8
_T = TypeVar("_T")


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
    expect: Mapping[str, StatSig] | None = None,
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
    ``expect``: the stats the tracker found the version finished with (``Due.sigs``); a
    file whose stat differs from it before the copy is a version not decided on: nothing is
    committed (``skipped`` "changed").

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
    moved = [r for r in rels if expect is not None and expect.get(r) != first[r]]
    if moved:
        return Snapshot(None, {}, skipped="changed",
                        detail=f"{moved[0]} changed after the version was found finished")
    step = rule.step_for(root, rels)
    name = make_name(step)
    staging = spool.staging(name)
    stats: dict[str, StatSig] = {}
    linkable = set(link)

    def take(rel: str) -> tuple[StatSig, str | None]:
        """Copy (or link) one file: its stat after, and why its copy is incomplete (or None)."""
        src = root / rel
        before = first[rel]
        if stat_sig(os.stat(src)) != before:
            raise _Changed(f"{rel} changed while the version was read")
        if rel in linkable and (linked := _link(staging, rel, src, before)) is not None:
            first[rel] = linked  # the link moved its ctime, nothing else
            return linked, _incomplete(rule, staging.path / rel)
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
        return after, _incomplete(rule, staging.path / rel)

    try:
        taken = _each(take, rels)
        stats.update((rel, sig) for rel, (sig, _) in taken.items())
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
            why = taken[rel][1]
            if why is not None:
                staging.abort()
                return Snapshot(None, stats, skipped="incomplete", detail=f"{rel}: {why}")
        signature = tuple(sorted((e.path, f"{e.algo}:{e.digest}") for e in staging.entries))
        if same_version(signature, tuple(last_signature), keys):
            staging.abort()
            return Snapshot(None, stats, signature, skipped="identical")
        manifest = Manifest.new(
            step=step, files=sorted(staging.entries, key=lambda e: e.path), name=name,
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


def _each(take: Callable[[str], _T], rels: list[str]) -> dict[str, _T]:
    """``take`` of every file of ``rels``; a large set on :data:`COPY_THREADS` threads (many
    small files: each file's open, fsync and close wait on the disk, not on the CPU, and
    concurrent fsyncs share the file system's journal commits). The first error is raised
    once every file's ``take`` has returned (the staging is then aborted whole)."""
    if len(rels) < PARALLEL_FROM:
        return {rel: take(rel) for rel in rels}
    failed = threading.Event()

    def one(rel: str) -> _T | None:
        if failed.is_set():
            return None  # another file failed: the version is discarded anyway
        try:
            return take(rel)
        except BaseException:
            failed.set()
            raise

    with ThreadPoolExecutor(COPY_THREADS, thread_name_prefix="ckptsync-spool") as pool:
        futures = {rel: pool.submit(one, rel) for rel in rels}
    for f in futures.values():
        if (exc := f.exception()) is not None:
            raise exc
    return {rel: cast(_T, f.result()) for rel, f in futures.items()}


def _incomplete(rule: WatchRule, copy: Path) -> str | None:
    """Why the spooled ``copy`` is visibly incomplete, or None (:func:`check_complete`)."""
    if rule.kind == "dir" and copy.stat().st_size == 0 and copy.suffix != ".json":
        return None  # an empty file in a finished directory: a marker, often
    return check_complete(copy)


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


_MAC = "mac"


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
