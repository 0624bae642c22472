"""What a fresh machine pulls so that Lightning's ``fit(ckpt_path="last")`` resumes at the
newest step that reached the remote (:func:`pull_latest`, and the plugin's own pull).

Remote layout: the ``lightning`` preset's (:func:`ckptsync.zerocode.presets.preset_rule`), one
zero-code checkpoint per saved ``.ckpt`` file. Lightning resolves ``"last"`` among the
``last*.ckpt`` files of the checkpoint directory only; so :func:`pull_resume_set` restores the
newest remote ``last.ckpt`` and the newest top-k file beside it, and where that top-k file
holds a newer step (a run killed between the upload of a save's top-k file and that of its
``last.ckpt``), it is linked as ``last.ckpt`` too, as ``ModelCheckpoint(save_last="link")``
does. Lightning is not imported here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from ckptsync.atomic import FileOps, link_into_place
from ckptsync.errors import CorruptCheckpointError, NoCheckpointError
from ckptsync.local import storage_error
from ckptsync.manifest import Manifest
from ckptsync.remote import RemoteStore
from ckptsync.zerocode.contentstep import torch_save_step
from ckptsync.zerocode.presets import preset_rule
from ckptsync.zerocode.restore import restore_watched
from ckptsync.zerocode.rules import is_watched

__all__ = ["LAST", "RULE", "link", "one_path", "pull_file", "pull_latest", "pull_resume_set",
           "resume_path"]

log = logging.getLogger("ckptsync.lightning")

#: The watch rule every uploaded ``.ckpt`` is a version of (the ``lightning`` preset).
RULE = preset_rule("lightning")
#: ``ModelCheckpoint.CHECKPOINT_NAME_LAST``: ``last.ckpt``, ``last-v1.ckpt``, ...
LAST = "last"


def one_path(m: Manifest) -> str | None:
    """The one path of a version of :data:`RULE`, or None for any other checkpoint."""
    paths = m.source.get("paths")
    if is_watched(m) and m.source.get("rule") == RULE and isinstance(paths, list) \
            and len(paths) == 1 and isinstance(paths[0], str):
        return paths[0]
    return None


def _paths(m: Manifest) -> list[str]:
    """The files of a version of :data:`RULE` (one, as this plugin uploads; any number, as
    ``ckptsync watch --preset lightning`` does), [] for any other checkpoint."""
    paths = m.source.get("paths")
    if is_watched(m) and m.source.get("rule") == RULE and isinstance(paths, list) \
            and all(isinstance(p, str) for p in paths):
        return list(paths)
    return []


def _is_last(rel: str) -> bool:
    """A file ``fit(ckpt_path="last")`` considers: ``last.ckpt``, ``last-v1.ckpt``, ..."""
    return rel.rsplit("/", 1)[-1].startswith(LAST)


def resume_path(m: Manifest, rel: str | None) -> str:
    """The file of version ``m`` to resume from: ``rel``, else a ``last*.ckpt``, else the
    newest by name."""
    paths = _paths(m)
    if rel is not None and rel in paths:
        return rel
    last = [p for p in paths if _is_last(p)]
    return (last or sorted(paths))[-1]


def pull_file(store: RemoteStore, root: Path, rel: str | None,
               listed: list[Manifest] | None = None) -> Manifest | None:
    """Restore the newest valid version of ``rel`` (None: of any file of :data:`RULE`) into
    ``root``, unless the local file already holds that step or a newer one. Falls back to
    older versions when the newest does not verify. Returns the version restored (or the
    one the local file matches), None when the remote holds none. ``listed``: the remote's
    checkpoints, when the caller listed them already."""
    listed = store.list() if listed is None else listed
    versions = [m for m in listed if (ps := _paths(m)) and rel in (None, *ps)]
    if not versions:
        return None
    newest = versions[-1]
    local = root / resume_path(newest, rel)
    if local.is_file():
        step = torch_save_step(local)
        if step is not None and newest.step is not None and step >= newest.step:
            log.info("%s already holds step %d (remote: %d): not pulled", local, step,
                     newest.step)
            return newest
    why = ""
    for m in reversed(versions):
        try:
            restore_watched(store, root, m.name, rules=[RULE])
            return m
        except (CorruptCheckpointError, NoCheckpointError) as e:
            log.warning("remote %s is not usable, trying an older version: %s", m.name, e)
            why = why or f" (the newest: {e})"
    raise NoCheckpointError(f"no valid version of {rel or RULE!r} in {store.url_of()}{why}")


_LISTINGS = 3
"""How often :func:`pull_resume_set` lists the remote when a version it listed vanished."""


def pull_resume_set(store: RemoteStore, root: Path, link: Callable[[Path, Path], None]
                    ) -> tuple[Path, list[Manifest]] | None:
    """Restore what ``fit(ckpt_path="last")`` reads into ``root``: the newest ``last*.ckpt``
    and the newest other (top-k) file; where the top-k file holds a newer step, ``link`` it
    as the ``last*.ckpt`` too (see the module doc; ``link(src, dest)`` replaces ``dest``
    atomically). Returns the file the resume reads and the versions restored, or None when
    the remote holds no version.

    Raises:
        NoCheckpointError: the remote holds versions, none of them valid."""
    # A run still uploading retires each file's older versions (and files Lightning removed)
    # while we read: when a version listed vanished meanwhile, the listing is taken again (a
    # file already restored at the newest step is not pulled twice).
    for attempt in range(1, _LISTINGS + 1):
        listed = [m for m in store.list() if _paths(m)]
        if not listed:
            return None
        rels = {resume_path(m, None): m for m in listed}  # each file's newest version, in order
        last_rel = next((r for r in reversed(list(rels)) if _is_last(r)), None)
        topk_rel = next((r for r in reversed(list(rels)) if not _is_last(r)), None)
        pulled: list[Manifest] = []
        errors: list[NoCheckpointError] = []
        for rel in (last_rel, topk_rel):
            try:
                if rel is not None and (m := pull_file(store, root, rel, listed)) is not None:
                    pulled.append(m)
            except NoCheckpointError as e:  # the other file may still do (deleted meanwhile)
                log.warning("%s", e)
                errors.append(e)
        if not errors:
            break
        if attempt == _LISTINGS:
            if not pulled:
                raise errors[0]
            break
        # A version that vanished was retired by a newer one: that one is what to resume from.
        log.warning("a version listed in %s was unusable or gone: listing it again (%d of %d)",
                    store.url_of(), attempt + 1, _LISTINGS)
    if topk_rel is None:
        return root / str(last_rel), pulled
    if last_rel is None:  # killed before the first last.ckpt reached the remote
        last_rel = (topk_rel.rsplit("/", 1)[0] + "/" if "/" in topk_rel else "") + \
            f"{LAST}.ckpt"
    last, topk = root / last_rel, root / topk_rel
    last_step = torch_save_step(last) if last.is_file() else None
    topk_step = torch_save_step(topk) if topk.is_file() else None
    if topk_step is not None and (last_step is None or topk_step > last_step):
        log.info("%s holds step %d, newer than %s (%s): linking it as %s, which "
                 "fit(ckpt_path='last') reads", topk_rel, topk_step, last_rel,
                 "none" if last_step is None else f"step {last_step}", last_rel)
        link(topk, last)
    return last, pulled


def pull_latest(remote: str, dirpath: str | os.PathLike[str], *,
                storage_options: Mapping[str, Any] | None = None) -> Path | None:
    """Restore, into ``dirpath``, the files ``trainer.fit(model, ckpt_path="last")`` resumes
    from on a fresh machine: the newest ``last.ckpt`` the remote holds and the newest top-k
    file beside it. Where the top-k file holds a newer step than ``last.ckpt`` (a run killed
    between the two uploads), it is linked as ``last.ckpt`` too, so the resume starts at the
    newest step that reached the remote, never from 0 when any version did.

    Call it before ``fit`` (Lightning resolves ``"last"`` by listing ``dirpath``). A local
    file already at its remote version's step or newer is kept.

    Returns:
        The file the resume reads (``last.ckpt``), or None when the remote holds none.

    Raises:
        NoCheckpointError: the remote holds versions, none of them valid.
        RemoteError, LocalStorageError: as :func:`ckptsync.zerocode.restore.restore_watched`.

    Example::

        pull_latest("s3://bucket/run1", "ckpts")
        trainer.fit(model, ckpt_path="last")
    """
    root = Path(dirpath).expanduser().absolute()
    got = pull_resume_set(RemoteStore(remote, storage_options), root, partial(link, FileOps()))
    return None if got is None else got[0]


def link(ops: FileOps, src: Path, dest: Path) -> None:
    """Make ``dest`` the file ``src`` through the one atomic seam (:mod:`ckptsync.atomic`):
    replaced whole or not at all; a failure names ``dest``."""
    try:
        link_into_place(src, dest, ops)
    except OSError as e:
        raise storage_error(e, dest, "save checkpoint") from e
