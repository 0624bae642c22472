"""Listing the checkpoints of a remote root: :class:`Listing`, and :class:`RemoteEntry`.

What "valid" means before any byte is read (:meth:`Listing.check_sizes`: the manifest is
usable and every file it lists is there with its size), every top-level prefix with its
status (:meth:`Listing.scan`, for ``ls``, retention and ``gc``), and the committed checkpoints
newest first, reading manifests lazily (:meth:`Listing.iter_committed`, for restore and pull).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from ckptsync.errors import (
    CkptSyncError,
    CorruptCheckpointError,
    ManifestError,
    UnsupportedFormatError,
)
from ckptsync.manifest import Manifest, name_sort_key, parse_name, unusable_reason
from ckptsync.remote.location import SAFE_NAME, Location, mtime
from ckptsync.remote.manifests import ManifestReader

__all__ = ["Listing", "RemoteEntry", "Status"]

log = logging.getLogger("ckptsync.remote")

Status = Literal["valid", "partial", "corrupt", "uncommitted"]


@dataclass(frozen=True)
class RemoteEntry:
    """One top-level prefix of the remote, as :meth:`Listing.scan` sees it.

    ``status``: ``valid`` (manifest parses, every file has its listed size), ``partial``
    (manifest present, a file missing or of the wrong size), ``corrupt`` (manifest does not
    parse, is unsafe, or cannot be used: :func:`~ckptsync.manifest.unusable_reason`; then
    ``manifest`` is kept), ``uncommitted`` (no manifest: an upload in progress or a leftover).
    """

    name: str
    status: Status
    manifest: Manifest | None
    size: int
    mtime: float | None
    problem: str | None = None


class Listing:
    """The checkpoints under one :class:`Location`, read through its :class:`ManifestReader`."""

    def __init__(self, at: Location, manifests: ManifestReader) -> None:
        self.at = at
        self.manifests = manifests

    def check_sizes(self, m: Manifest, sizes: Mapping[str, int] | None = None) -> None:
        """Raise :class:`CorruptCheckpointError` unless ``m`` is usable and every file it lists
        is there with its size: what "valid" means before any byte is read."""
        reason = unusable_reason(m)
        if reason is not None:
            url = self.at.url_of(m.name)
            raise CorruptCheckpointError(f"{url}: {reason}", path=url)
        sizes = self.at.sizes(m.name) if sizes is None else sizes
        for f in m.files:
            url = self.at.url_of(m.name, f.path)
            if f.path not in sizes:
                raise CorruptCheckpointError(
                    f"{url}: file listed in the manifest is missing", path=url
                )
            if sizes[f.path] != f.size:
                raise CorruptCheckpointError(
                    f"{url}: size {sizes[f.path]} != {f.size} in the manifest (truncated or "
                    "altered)",
                    path=url,
                )

    def scan(self) -> list[RemoteEntry]:
        """Every top-level prefix with its status, oldest first (one listing of the whole
        remote plus every manifest). Used by ``ls``, retention and ``gc``."""
        top = [e for e in self.at.ls_root() if e.get("type") == "directory"]
        names = [self.at.rel(e["name"], self.at.root) for e in top]
        names = [n for n in names if SAFE_NAME.match(n)]
        dir_mtime = {self.at.rel(e["name"], self.at.root): mtime(e) for e in top}
        found = self.at.find() if names else {}
        files: dict[str, dict[str, int]] = {n: {} for n in names}
        mtimes: dict[str, list[float]] = {n: [] for n in names}
        for rel, info in found.items():
            head, _, rest = rel.partition("/")
            if head in files and rest:
                files[head][rest] = int(info.get("size") or 0)
                t = mtime(info)
                if t is not None:
                    mtimes[head].append(t)
        manifests = self.manifests.read_many(names)
        out = []
        for n in names:
            size = sum(files[n].values())
            t = max(mtimes[n]) if mtimes[n] else dir_mtime.get(n)
            m = manifests.get(n)
            if m is None and not files[n] and self.at.backend.buckets:
                # An empty "directory" on an object store (SeaweedFS keeps one after its
                # objects are deleted) holds nothing: there is nothing to list or collect.
                continue
            if m is None:
                out.append(RemoteEntry(n, "uncommitted", None, size, t))
            elif isinstance(m, CkptSyncError):
                out.append(RemoteEntry(n, "corrupt", None, size, t, str(m)))
            else:
                try:
                    self.check_sizes(m, files[n])
                    out.append(RemoteEntry(n, "valid", m, m.total_size, t))
                except CorruptCheckpointError as e:
                    status: Status = "corrupt" if unusable_reason(m) else "partial"
                    out.append(RemoteEntry(n, status, m, size, t, str(e)))

        def key(e: RemoteEntry) -> Any:
            if e.manifest is None:
                return name_sort_key(e.name)
            k = e.manifest.sort_key()
            if e.manifest.step is None and e.mtime is not None:
                # Equal seqs (two pushes at once, or versions pushed before seqs existed)
                # order by the remote's own clock, never by the writer's alone.
                return (k[0], k[1], datetime.fromtimestamp(e.mtime, timezone.utc).isoformat(),
                        k[3])
            return k

        out.sort(key=key)
        return out

    def iter_committed(self) -> Iterator[RemoteEntry]:
        """Committed checkpoints (a manifest is there), newest first, each with its status
        (``valid``, ``partial`` or ``corrupt``, as :meth:`scan` says; ``mtime`` not read),
        reading manifests lazily.

        One listing of the root, then for each candidate one manifest read and one listing
        of its prefix, stopping as soon as the caller does. Names sort by (step, creation
        time), so the listing alone gives the order of checkpoints with a step; those without
        one order by the ``seq`` their manifests carry (read together once the caller gets
        that far), never by a writer's clock. ``LATEST`` adds its checkpoint to the
        candidates even when an eventually consistent listing does not show it yet (it is
        still checked like any other).

        Raises:
            UnsupportedFormatError: the next checkpoint needs a format feature this version
                does not read: never passed over for an older one.
        """
        names = set(self.at.names())
        hint = self.manifests.read_latest()
        if hint is not None:
            names.add(hint)
        ordered = sorted(names, key=name_sort_key, reverse=True)
        stepless = [n for n in ordered if (p := parse_name(n)) is not None and p[0] is None]
        for name in ordered:
            if stepless and name == stepless[0]:
                yield from self._iter_stepless(stepless)
                stepless = []
            if (p := parse_name(name)) is not None and p[0] is None:
                continue
            try:
                m = self.manifests.read(name)
            except UnsupportedFormatError:
                raise
            except ManifestError as e:
                yield RemoteEntry(name, "corrupt", None, 0, None, str(e))
                continue
            if m is None:
                continue  # uncommitted: an upload in progress or a leftover
            yield self.entry(m)

    def _iter_stepless(self, names: list[str]) -> Iterator[RemoteEntry]:
        """:meth:`iter_committed` of step-less checkpoints: every manifest read at once,
        newest first by :meth:`Manifest.sort_key` (their ``seq``)."""
        read = self.manifests.read_many(names)
        bad = [n for n in names if isinstance(read.get(n), CkptSyncError)]
        good = sorted((m for m in read.values() if isinstance(m, Manifest)),
                      key=lambda m: m.sort_key(), reverse=True)
        for m in good:
            yield self.entry(m)
        for n in bad:
            err = read[n]
            if isinstance(err, UnsupportedFormatError):
                raise err
            yield RemoteEntry(n, "corrupt", None, 0, None, str(err))

    def entry(self, m: Manifest) -> RemoteEntry:
        """The entry of committed ``m``, with its status (one listing of its prefix)."""
        sizes = self.at.sizes(m.name)
        try:
            self.check_sizes(m, sizes)
        except CorruptCheckpointError as e:
            status: Status = "corrupt" if unusable_reason(m) else "partial"
            return RemoteEntry(m.name, status, m, sum(sizes.values()), None, str(e))
        return RemoteEntry(m.name, "valid", m, m.total_size, None)

    def iter_valid(self) -> Iterator[Manifest]:
        """Valid checkpoints, newest first, reading manifests lazily (:meth:`iter_committed`);
        the others are logged and skipped."""
        for e in self.iter_committed():
            if e.status == "valid" and e.manifest is not None:
                yield e.manifest
            else:
                log.warning("remote checkpoint %s is not valid, skipping it: %s", e.name,
                            e.problem)

    def newest_valid(self) -> Manifest | None:
        """The newest valid checkpoint, or None. Cheap: O(1) manifest reads in the usual case."""
        return next(self.iter_valid(), None)

    # Defined last: inside the class body the name "list" would shadow the builtin.
    def list(self, *, strict: bool = False) -> list[Manifest]:
        """Committed checkpoints (manifest present and parseable), oldest first.

        Reads every manifest (concurrently where the backend allows); bad manifests are
        logged and skipped. Validity (file sizes) is not checked: see :meth:`scan`.

        ``strict`` (for choosing what to restore): a checkpoint needing a format feature
        this version does not read raises :class:`UnsupportedFormatError` instead.
        """
        names = self.at.names()
        manifests = self.manifests.read_many(names)
        out = [m for m in manifests.values() if isinstance(m, Manifest)]
        for n, m in manifests.items():
            if strict and isinstance(m, UnsupportedFormatError):
                raise m
            if isinstance(m, CkptSyncError):
                log.warning("skipping remote checkpoint %s: %s", n, m)
        out.sort(key=lambda m: m.sort_key())
        return out
