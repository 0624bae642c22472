"""``ls`` and ``verify``: what a remote holds, and whether it is sound.

``ls`` of a run lists its checkpoints (zero-code ones with the files they hold); ``ls`` of a
prefix that is not a run (a bucket, a project folder) lists the runs under it, each with its
newest step, time and size; a prefix that holds nothing at all is an error naming the runs
beside it (a typo must never look like an empty run).
"""

from __future__ import annotations

import argparse
from datetime import datetime, timezone
from typing import Any

from ckptsync.cli.common import (
    add_selection,
    allow_empty,
    label,
    manifest_summary,
    open_store,
    out,
    parse_age,
    progress,
    select,
    table,
)
from ckptsync.cli.transfers import nothing_committed
from ckptsync.errors import CorruptCheckpointError, NoCheckpointError
from ckptsync.exits import exit_help
from ckptsync.manifest import Manifest
from ckptsync.output import Output, human_size
from ckptsync.remote.runs import RunFinder, RunSummary, not_a_run
from ckptsync.zerocode.rules import is_watched

__all__ = ["add_ls", "add_verify", "run_ls", "run_verify"]


def add_ls(p: argparse.ArgumentParser) -> None:
    p.add_argument("remote", help="remote URL: a run (its checkpoints are listed) or a "
                                  "bucket or folder above runs (the runs are listed)")
    p.add_argument("--all", action="store_true", help="also show uncommitted leftovers")
    p.add_argument("--since", type=parse_age, metavar="AGE",
                   help="only checkpoints created in the last AGE (30m, 2h, 7d)")
    p.add_argument("--limit", type=int, metavar="N", help="only the N newest checkpoints")
    p.add_argument("--allow-empty", action="store_true",
                   help="a prefix that holds nothing at all lists as empty (exit 0), not as "
                        "a missing run (exit 1; default: CKPTSYNC_ALLOW_EMPTY=1)")
    p.epilog = exit_help("ls")


def _created(m: Manifest) -> float:
    try:
        t = datetime.fromisoformat(m.created.replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()


def _files(m: Manifest | None) -> str:
    """What a checkpoint holds, for the table: a count, or a zero-code version's paths."""
    if m is None:
        return ""
    if not is_watched(m):
        return f"{len(m.files)} files" if len(m.files) != 1 else "1 file"
    tops = sorted({f.path.split("/", 1)[0] + ("/" if "/" in f.path else "") for f in m.files})
    shown = ", ".join(tops[:3]) + (f" +{len(tops) - 3}" if len(tops) > 3 else "")
    return shown if len(tops) == len(m.files) else f"{shown} ({len(m.files)} files)"


def _runs(o: Output, url: str, runs: list[RunSummary]) -> int:
    for r in runs:
        when = (datetime.fromtimestamp(r.newest_time, timezone.utc).isoformat()
                if r.newest_time is not None else None)
        o.event("run", None, url=r.url, checkpoints=r.checkpoints, newest=r.newest,
                step=r.newest_step, time=when, size=r.size)
    rows = [[r.url, str(r.checkpoints), "" if r.newest_step is None else str(r.newest_step),
             "" if r.newest_time is None else
             datetime.fromtimestamp(r.newest_time, timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
             human_size(r.size)] for r in runs]
    o.line(f"{url} is not a run; the runs under it:")
    o.line(table(rows, ["RUN", "CHECKPOINTS", "NEWEST STEP", "NEWEST (UTC)", "SIZE"]))
    return o.summary(0, None, runs=len(runs))


def run_ls(args: argparse.Namespace) -> int:
    store = open_store(args, args.remote)
    o = out(args)
    entries = store.scan()
    empty_prefix = False
    if all(e.status == "uncommitted" for e in entries):
        finder = RunFinder.of(store)
        probe = finder.probe()
        if probe.kind != "run":
            runs = finder.runs_under()
            if runs:
                return _runs(o, store.url_of(), runs)
            if not (probe.kind == "empty" and allow_empty(args)):
                raise not_a_run(store.url_of(), finder.runs_beside(),
                                foreign=probe.kind == "foreign")
            empty_prefix = True
    entries = [e for e in entries if args.all or e.status != "uncommitted"]
    if args.since is not None:
        entries = [e for e in entries if e.manifest is not None
                   and _created(e.manifest) >= args.since]
    if args.limit is not None:
        entries = entries[-args.limit:] if args.limit > 0 else []
    for e in entries:
        d: dict[str, Any] = {"name": e.name, "status": e.status, "size": e.size,
                             "problem": e.problem}
        if e.manifest is not None:
            d.update(manifest_summary(e.manifest), status=e.status, size=e.size)
            if is_watched(e.manifest):
                d.update(rule=e.manifest.source.get("rule"),
                         paths=[f.path for f in e.manifest.files])
        o.event("checkpoint", None, **d)
    by_status = {s: sum(e.status == s for e in entries)
                 for s in ("valid", "partial", "corrupt", "uncommitted")}
    rows = []
    for e in entries:
        m = e.manifest
        metrics = " ".join(f"{k}={v:.4g}" for k, v in (m.metrics if m else {}).items())
        rows.append([e.name, "" if m is None or m.step is None else str(m.step),
                     m.created[:19].replace("T", " ") if m else "", human_size(e.size),
                     _files(m), metrics, e.status])
    if not rows:
        o.line(f"no checkpoints in {store.url_of()}" + (
            " (it holds nothing yet)" if empty_prefix else
            " (the run holds none yet)" if args.since is None and args.limit is None else ""))
    else:
        o.line(table(rows, ["NAME", "STEP", "CREATED (UTC)", "SIZE", "FILES", "METRICS",
                            "STATUS"]))
    return o.summary(0, None, checkpoints=len(entries), **by_status)


def add_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument("remote", help="remote URL")
    add_selection(p, "verify only")
    p.add_argument("--quick", action="store_true", help="check sizes only, no digests")
    p.add_argument("--allow-empty", action="store_true",
                   help="a prefix that holds nothing at all has nothing to verify (exit 0), "
                        "not a missing run (exit 1; default: CKPTSYNC_ALLOW_EMPTY=1)")
    p.epilog = exit_help("verify")


def run_verify(args: argparse.Namespace) -> int:
    store = open_store(args, args.remote)
    o = out(args)
    name = select(store, args.name, args.step)
    names = [name] if name else [e.name for e in store.scan() if e.status != "uncommitted"]
    if not names:
        finder = nothing_committed(args, store)
        if finder.probe().kind == "run":
            raise NoCheckpointError(f"no committed checkpoint in {store.url_of()}")
        return o.summary(0, f"nothing to verify: {store.url_of()} holds nothing yet",
                         verified=0, ok=0, corrupt=0)
    bad = 0
    prog = progress(args)
    for n in names:
        try:
            store.verify(n, full=not args.quick, progress=prog)
            o.event("verified", f"ok       {n}  ({label(n)})", name=n, ok=True, problem=None)
        except CorruptCheckpointError as e:
            bad += 1
            o.event("verified", f"CORRUPT  {n}: {e}", name=n, ok=False, problem=str(e))
    if bad and not args.json:
        o.diagnostic(f"{bad} of {len(names)} checkpoint(s) failed verification")
    return o.summary(1 if bad else 0, None, verified=len(names), ok=len(names) - bad,
                     corrupt=bad)
