"""Which ckptsync runs a remote prefix is, holds, or lies beside.

A *run root* is a prefix that carries ckptsync's marker (:data:`~ckptsync.ownership.ROOT_MARKER`,
written at a run's first push) or, for runs written before the marker, checkpoint names. Two
questions need more than one run root's listing, and both are answered here:

- what a prefix that is not a run holds (``ckptsync ls s3://bucket`` lists the runs under it:
  :meth:`RunFinder.runs_under`);
- what a prefix that holds nothing at all might have been meant to be (a typo must never look
  like a fresh start, DESIGN.md "Errors": :meth:`RunFinder.runs_beside`, and
  :func:`not_a_run`, the error that names them).

Every backend call is retried and translated like the store's own (the one retry policy, the
one boundary). Listings are bounded: a bucket with millions of objects is walked a few
levels deep, a few hundred prefixes at most.

Example::

    finder = RunFinder.of(store)
    if finder.probe().kind == "empty":
        raise not_a_run(store.url, finder.runs_beside())
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from typing import Any, Literal

from ckptsync.errors import NoCheckpointError
from ckptsync.manifest import MANIFEST_NAME, name_sort_key, parse_name
from ckptsync.ownership import ROOT_MARKER
from ckptsync.redact import redact_url
from ckptsync.remote.boundary import translate_error
from ckptsync.remote.listing import mtime
from ckptsync.transfer import Retrier

__all__ = ["NotARunError", "Probe", "RunFinder", "RunSummary", "not_a_run"]

log = logging.getLogger("ckptsync.remote")

#: Prefixes listed at most while looking for runs under a root or beside a prefix.
MAX_LISTINGS = 200
#: How deep under a root runs are looked for (``bucket/project/run`` is depth 2).
MAX_DEPTH = 3


class NotARunError(NoCheckpointError):
    """A prefix that holds nothing at all, or nothing ckptsync wrote: not a run (a typo?).

    ``beside`` are the run URLs found next to it, closest name first.
    """

    def __init__(self, message: str, *, url: str, beside: list[str]) -> None:
        super().__init__(message)
        self.url = url
        self.beside = beside


@dataclass(frozen=True)
class Probe:
    """What a prefix is: ``run`` (a run root), ``empty`` (no object at all) or ``foreign``
    (objects, but none that make it a run); ``entries`` counts what its listing showed."""

    kind: Literal["run", "empty", "foreign"]
    entries: int


@dataclass(frozen=True)
class RunSummary:
    """One run found under a root: its URL, committed checkpoints, the newest one (name,
    step, when its manifest was written, epoch seconds), and the bytes under it."""

    url: str
    checkpoints: int
    newest: str | None
    newest_step: int | None
    newest_time: float | None
    size: int


class RunFinder:
    """Looks for run roots at, under and beside one prefix of a filesystem.

    Args:
        fs: the fsspec filesystem.
        root: the prefix's path in ``fs``.
        url: the prefix's user-facing URL (credentials removed).
        retrier: retries and translates each call (the store's policy).
    """

    def __init__(self, fs: Any, root: str, url: str, retrier: Retrier) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        self.url = redact_url(url).rstrip("/")
        self.retrier = retrier
        self._listed = 0

    @classmethod
    def of(cls, store: Any) -> RunFinder:
        """The finder of a :class:`~ckptsync.remote.RemoteStore`'s root."""
        return cls(store.fs, store.root, store.url,
                   Retrier(store.config, lambda e, u, a: translate_error(e, u, a)))

    # ------------------------------------------------------------------ listings
    def _ls(self, path: str, url: str) -> list[dict[str, Any]]:
        def ls() -> list[dict[str, Any]]:
            try:
                self.fs.invalidate_cache(path)
                return list(self.fs.ls(path, detail=True))
            except FileNotFoundError:
                return []

        self._listed += 1
        entries: list[dict[str, Any]] = self.retrier.call(ls, url=url, action="list")
        return [e for e in entries if _base(e["name"]) and _base(e["name"]) != _base(path)]

    @staticmethod
    def _is_run(entries: list[dict[str, Any]]) -> bool:
        names = {_base(e["name"]): e.get("type") for e in entries}
        return ROOT_MARKER in names or any(
            kind == "directory" and parse_name(n) is not None for n, kind in names.items())

    def probe(self) -> Probe:
        """What the prefix is (one listing)."""
        entries = self._ls(self.root, self.url)
        if self._is_run(entries):
            return Probe("run", len(entries))
        return Probe("empty" if not entries else "foreign", len(entries))

    # ------------------------------------------------------------------ runs
    def summary(self, path: str, url: str) -> RunSummary:
        """One run root's committed checkpoints, newest one and size (one recursive listing;
        no manifest is read: ``ckptsync ls`` of the run checks them)."""
        def find() -> dict[str, Any]:
            try:
                self.fs.invalidate_cache(path)
                return dict(self.fs.find(path, detail=True))
            except FileNotFoundError:
                return {}

        found: dict[str, Any] = self.retrier.call(find, url=url, action="list")
        size, committed = 0, {}
        for full, info in found.items():
            size += int(info.get("size") or 0)
            rel = full.rstrip("/")[len(path.rstrip("/")) + 1:]
            head, _, rest = rel.partition("/")
            if rest == MANIFEST_NAME and parse_name(head) is not None:
                committed[head] = mtime(info)
        if not committed:
            return RunSummary(url, 0, None, None, None, size)
        newest = max(committed, key=name_sort_key)
        return RunSummary(url, len(committed), newest, (parse_name(newest) or (None, ""))[0],
                          committed[newest], size)

    def runs_under(self) -> list[RunSummary]:
        """The runs under the prefix (itself not a run), at most :data:`MAX_DEPTH` levels
        down, sorted by URL."""
        runs: list[RunSummary] = []
        todo: list[tuple[str, str, int]] = [(self.root, self.url, 0)]
        while todo and self._listed < MAX_LISTINGS:
            path, url, depth = todo.pop(0)
            entries = self._ls(path, url)
            if depth > 0 and self._is_run(entries):
                runs.append(self.summary(path, url))
                continue
            if depth < MAX_DEPTH:
                todo += [(e["name"].rstrip("/"), f"{url}/{_base(e['name'])}", depth + 1)
                         for e in entries if e.get("type") == "directory"]
        if todo:
            log.info("stopped looking for runs under %s after %d listings", self.url,
                     self._listed)
        return sorted(runs, key=lambda r: r.url)

    def runs_beside(self, limit: int = 5) -> list[str]:
        """URLs of the runs next to the prefix (its siblings that are run roots), the names
        closest to its own first; at most ``limit``."""
        if "/" not in self.root.strip("/") or "/" not in self.url.split("://", 1)[-1]:
            return []  # a bucket: what lies beside it is other buckets, not looked at
        parent, _, own = self.root.rpartition("/")
        parent_url = self.url.rpartition("/")[0]
        siblings = [_base(e["name"]) for e in self._ls(parent, parent_url)
                    if e.get("type") == "directory" and _base(e["name"]) != own]
        close = difflib.get_close_matches(own, siblings, n=max(1, len(siblings)), cutoff=0.0)
        runs: list[str] = []
        for name in close:
            if len(runs) >= limit or self._listed >= MAX_LISTINGS:
                break
            if self._is_run(self._ls(f"{parent}/{name}", f"{parent_url}/{name}")):
                runs.append(f"{parent_url}/{name}")
        return runs


def _base(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1]


def not_a_run(url: str, beside: list[str], *, foreign: bool = False,
              under: list[RunSummary] | None = None) -> NotARunError:
    """The error for a prefix that is not a run: what it holds, the runs beside (or under)
    it, and what to do."""
    url = redact_url(url)
    what = ("holds no ckptsync run (its objects are not ckptsync's)" if foreign
            else "holds nothing at all: no ckptsync run is there")
    if under:
        hint = ("It holds runs: " + ", ".join(r.url for r in under[:5])
                + (" ..." if len(under) > 5 else "") + "; name one of them.")
    elif beside:
        hint = (f"Did you mean {beside[0]}?"
                + (f" (other runs beside it: {', '.join(beside[1:])})" if beside[1:] else ""))
    else:
        hint = "No ckptsync run was found beside it either: check the URL."
    return NotARunError(
        f"{url} {what}. {hint} To start a new run there, pass --allow-empty "
        "(CKPTSYNC_ALLOW_EMPTY=1; in Python, Checkpointer.restore(fresh_ok=True))",
        url=url, beside=beside)
