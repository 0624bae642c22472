"""Restoring zero-code checkpoints: each version back at the paths its files came from.

:func:`restore_watched` (what ``ckptsync pull`` runs for a zero-code checkpoint) puts the
newest version back at those paths, all-or-nothing, writing only what the version's rule
matches, never through a symlink; :func:`check_watched` refuses a manifest that lists anything
else. A crashed pull leaves a journal that the next pull into the same directory finishes.

Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ckptsync.atomic import write_atomic
from ckptsync.errors import (
    ConfigError,
    CorruptCheckpointError,
    LocalStorageError,
    ManifestError,
    NoCheckpointError,
)
from ckptsync.local import PRIVATE_PREFIX, FileOps, LocalCheckpoint, LocalStore, storage_error
from ckptsync.manifest import Manifest, check_relpath
from ckptsync.ownership import RunFile
from ckptsync.redact import redact_url
from ckptsync.zerocode.rules import WatchRule, is_private, is_watched

if TYPE_CHECKING:
    from ckptsync.remote import RemoteStore

__all__ = ["JOURNAL", "RESTORE_PREFIX", "check_watched", "restore_watched", "unpinned_error"]

log = logging.getLogger("ckptsync.zerocode")

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

    ``target_dir`` continues the remote's run (:class:`~ckptsync.ownership.RunFile`), so that
    a ``ckptsync watch`` of it afterwards is the same run's writer.

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
        marker = store.read_marker(fresh=True)
        if marker is not None and marker.run is not None:
            RunFile(target).adopt(marker.run)  # a watch of target continues this run
    finally:
        os.close(tfd)
    for ckpt in ckpts:
        log.info("restored %s (%d files) into %s", ckpt.name, len(ckpt.manifest.files), target)
    return [c.manifest for c in ckpts]


def unpinned_error(store: RemoteStore, remote_url: str,
                   target_dir: str | os.PathLike[str]) -> ConfigError:
    """The refusal of a zero-code pull without a rule; it names the rules the bucket holds,
    as the command that would pull them."""
    url = redact_url(remote_url)
    proposed = sorted({str(m.source.get("rule")) for m in store.list() if is_watched(m)})
    flags = " ".join(f"--rule '{r}'" for r in proposed) or "--rule RULE"
    return ConfigError(
        f"{url} holds zero-code versions, and a zero-code pull writes the files its watch rule "
        f"names under {target_dir}: ckptsync never takes that rule from the bucket (whoever "
        "can write to it could otherwise choose which of your files are replaced). Give the "
        "rule you watch with, --rule RULE or --preset NAME (or CKPTSYNC_RULES / "
        f"CKPTSYNC_PRESETS); the bucket proposes: ckptsync pull {url} {target_dir} {flags}")


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
    for m in store.list(strict=True):
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
    older = [x for x in store.list(strict=True)
             if is_watched(x) and x.source.get("rule") == rule]
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


def _open_parent(target: Path, tfd: int, rel: str, *, create: FileOps | None) -> int | None:
    """An fd on ``rel``'s parent directory, each component below the target opened with
    ``O_NOFOLLOW``: a symlink (or a file) on the way is refused, never followed. None when a
    component is missing and ``create`` is None; else it is created (its entry fsynced
    through ``create``). The caller closes the fd."""
    parts = rel.split("/")[:-1]
    fd = os.dup(tfd)
    try:
        for i, part in enumerate(parts):
            here = "/".join(parts[: i + 1])
            try:
                nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if create is None:
                    os.close(fd)
                    return None
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, dir_fd=fd)
                    create.fsync(fd)  # the new directory's entry survives a crash
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
    if is_private(rel):
        raise _refuse(target, rel, "the name is ckptsync's own")
    pfd = _open_parent(target, tfd, rel, create=None)
    if pfd is not None:
        try:
            _check_leaf(target, pfd, rel)
        finally:
            os.close(pfd)


def _write_journal(tmp: Path, moves: list[tuple[str, str]], ops: FileOps) -> None:
    # Durable (the file, then its directory) before the first move.
    write_atomic(tmp / JOURNAL, json.dumps({"moves": moves}).encode(), ops)


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
            pfd = _open_parent(target, tfd, dst, create=ops)
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
