"""The spool knows its remote: a version spooled for one remote is never pushed blindly to
another.

The zero-code spool (``LOCAL_DIR/.ckptsync-watch/spool/``) holds versions taken for the remote
the daemon synced to; :data:`RECORD_NAME` beside it records which one (its URL without
credentials, and its endpoint). A daemon started on the same directory with another remote
(a new run's prefix, another bucket) re-examines each rule's newest spooled version before
anything is pushed (:func:`reexamine_spool`):

- its files are still what the rule finds (the same paths, each with the same size and
  digest): it is pushed to the new remote (the copy is the trainer's current state);
- the rule finds other files (the trainer saved since): it is dropped, and the trainer's files
  are taken again, as a new version, the usual way;
- the rule finds nothing (the trainer's files are gone): it is dropped, not pushed: it belongs
  to the previous remote's run, which may hold it already.

Older spooled versions of a rule, and versions of a rule the daemon no longer watches, are
dropped. Each decision is one ``spool_reexamined`` event saying which and why. A spool from a
version of ckptsync that recorded no remote is re-examined the same way.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ckptsync.errors import CkptSyncError, ConfigError
from ckptsync.hashing import hash_file
from ckptsync.local import LocalCheckpoint, LocalStore, write_json_atomic
from ckptsync.output import EventLog
from ckptsync.redact import redact_url
from ckptsync.zerocode.rules import WatchRule, dir_files

__all__ = ["RECORD_NAME", "reexamine_spool", "remote_identity"]

#: Beside the spool: the remote its versions were taken for.
RECORD_NAME = "spool-remote.json"


def remote_identity(url: str, storage_options: Mapping[str, Any]) -> dict[str, str | None]:
    """What tells one remote from another: the URL without credentials or query, and the
    endpoint (the same ``s3://bucket/run`` on another server is another remote)."""
    client = storage_options.get("client_kwargs")
    endpoint = storage_options.get("endpoint_url") or (
        client.get("endpoint_url") if isinstance(client, Mapping) else None)
    return {"remote": redact_url(url).rstrip("/"),
            "endpoint": redact_url(str(endpoint)).rstrip("/") if endpoint else None}


def _recorded(path: Path) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            return data
    return None


def reexamine_spool(spool: LocalStore, root: Path, identity: dict[str, str | None],
                    rules: list[WatchRule], events: EventLog) -> None:
    """Before a daemon pushes anything: re-examine what ``spool`` holds when it was taken
    for another remote than ``identity`` (see the module doc), then record ``identity``.

    Raises:
        ConfigError: a version to drop cannot be removed (the daemon must not push it).
    """
    record = spool.directory.parent / RECORD_NAME
    was = _recorded(record)
    if was != identity:
        spooled = spool.list()
        if spooled:
            previous = (was or {}).get("remote") or "a remote this ckptsync did not record"
            watched = {r.spec: r for r in rules}
            newest: dict[str, LocalCheckpoint] = {}
            for c in sorted(spooled, key=lambda c: c.manifest.sort_key()):
                spec = str(c.manifest.source.get("rule"))
                if spec in newest:
                    _drop(spool, newest[spec], events, previous,
                          "superseded by a newer spooled version of its rule")
                newest[spec] = c
            for spec, c in newest.items():
                rule = watched.get(spec)
                if rule is None:
                    _drop(spool, c, events, previous, "its rule is no longer watched")
                    continue
                found = _found(root, rule, c)
                if found == "same":
                    events("info", "spool_reexamined", name=c.name, rule=spec, action="push",
                           previous_remote=previous,
                           why="its files are still what the rule finds (same paths, sizes "
                               "and digests): the trainer's current state")
                elif found == "other":
                    _drop(spool, c, events, previous, "the trainer saved since: its current "
                          "files are taken again, as a new version", action="retake")
                else:
                    _drop(spool, c, events, previous, "the rule finds none of its files any "
                          "more: it belongs to the previous remote's run")
    if was != identity:
        try:
            write_json_atomic(record, identity)
        except OSError as e:  # not recorded: the next start re-examines the spool again
            events("warning", "spool_unrecorded", path=str(record), error=str(e))


def _found(root: Path, rule: WatchRule, c: LocalCheckpoint) -> str:
    """``same`` (the rule finds exactly this version's files, same content), ``other`` (it
    finds files, not these) or ``none``."""
    paths = sorted(f.path for f in c.manifest.files)
    try:
        if rule.kind == "dir":
            vdir = rule.version_dir(paths[0]) if paths else None
            now = dir_files(root, vdir) if vdir is not None and (root / vdir).is_dir() else []
            if not now and rule.finished_dirs(root):
                return "other"
        else:
            now = rule.current_files(root)
    except (OSError, ConfigError):
        return "none"
    if not now:
        return "none"
    if now != paths:
        return "other"
    for f in c.manifest.files:
        try:
            size, digest = hash_file(root / f.path, algo=f.algo)
        except OSError:
            return "other"
        if size != f.size or digest != f.digest:
            return "other"
    return "same"


def _drop(spool: LocalStore, c: LocalCheckpoint, events: EventLog, previous: str, why: str,
          *, action: str = "drop") -> None:
    try:
        spool.delete(c.name)
    except (OSError, CkptSyncError) as e:
        raise ConfigError(
            f"{spool.directory / c.name} was spooled for another remote ({previous}) and "
            f"cannot be removed ({e}); remove it by hand, then start the daemon again") from e
    events("warning" if action == "drop" else "info", "spool_reexamined", name=c.name,
           rule=c.manifest.source.get("rule"), action=action, previous_remote=previous,
           why=f"spooled for another remote ({previous}); {why}; not pushed to this one")
