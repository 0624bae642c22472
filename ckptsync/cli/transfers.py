"""``push`` and ``pull``: the commands that move checkpoints.

Each ends with one summary line (what moved, its size, seconds, MB/s) and says, when it stops
part way, what it left behind. ``pull`` of a prefix that holds nothing at all is not a fresh
start (exit 1, the runs beside it named) unless the run root exists or ``--allow-empty`` says a
new run is expected (exit 5).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ckptsync.cli.common import (
    add_selection,
    allow_empty,
    existing_local,
    label,
    manifest_summary,
    open_store,
    out,
    progress,
    rate,
    select,
)
from ckptsync.daemon.cli import pinned_rules
from ckptsync.errors import NoCheckpointError
from ckptsync.exits import EXIT_FELL_BACK, EXIT_NOTHING_TO_DO, exit_help
from ckptsync.local import LocalCheckpoint, LocalStore
from ckptsync.manifest import Manifest, name_sort_key
from ckptsync.output import Output, human_size
from ckptsync.ownership import check_remote_outside, check_remote_url
from ckptsync.redact import redact_url
from ckptsync.remote.runs import RunFinder, not_a_run
from ckptsync.zerocode.presets import PRESETS
from ckptsync.zerocode.restore import restore_watched, unpinned_error
from ckptsync.zerocode.rules import is_watched

__all__ = ["add_pull", "add_push", "run_pull", "run_push"]


# --------------------------------------------------------------------------- push
def add_push(p: argparse.ArgumentParser) -> None:
    p.add_argument("local", help="local checkpoint directory (as given to Checkpointer)")
    p.add_argument("remote", help="remote URL, e.g. s3://bucket/run1")
    p.add_argument("--dry-run", action="store_true",
                   help="only print what would be uploaded; write nothing")
    p.epilog = exit_help("push")


def _left_behind(o: Output, store: Any, name: str, sent: int, why: str) -> None:
    """Say what a push that stopped part way left: nothing visible, and where its bytes are."""
    o.diagnostic(
        f"ckptsync: {why} while pushing {label(name)} ({name}): it was not committed, so "
        f"nothing partial is visible. The {human_size(max(sent, 0))} uploaded of it stay under "
        f"{store.url_of(name)}/ as an uncommitted upload (an S3 multipart upload in flight is "
        "aborted on the way out, or left for gc where that failed): the next push sends it "
        f"again from the start, and `ckptsync gc {store.url_of()}` removes it once older than "
        "--grace (default 24 h)")


def run_push(args: argparse.Namespace) -> int:
    check_remote_url(args.remote, "the REMOTE argument")
    local = existing_local(args.local)
    check_remote_outside(args.remote, local.directory, "the REMOTE argument")
    store = open_store(args, args.remote)
    store.bind_run(local.directory)  # one prefix, one run: the directory's (ownership.RunFile)
    o = out(args)
    pushed = skipped = 0
    prog = progress(args)
    verb = "would push" if args.dry_run else "pushed"
    start, size = time.monotonic(), 0
    for ckpt in local.list():
        # One manifest read per local checkpoint (a few, with retention), not a remote scan.
        if store.read_manifest(ckpt.name) is not None:
            if not args.dry_run:
                store.push(ckpt)  # a no-op, but refuses a different checkpoint of the same name
            skipped += 1
            o.event("skipped", None, name=ckpt.name, reason="already in the remote")
            continue
        if not args.dry_run:
            before = prog.bytes
            try:
                missing = store.waiting_for(store.push(ckpt, progress=prog))
            except KeyboardInterrupt:
                _left_behind(o, store, ckpt.name, prog.bytes - before, "interrupted")
                raise
            except Exception:
                _left_behind(o, store, ckpt.name, prog.bytes - before, "stopped on an error")
                raise
            if missing is not None:  # one node's part: the checkpoint is not committed yet
                o.event("part_pushed", f"{ckpt.name}: part uploaded, waiting for nodes "
                        f"{list(missing)} (not restorable until every node's part is up)",
                        name=ckpt.name, step=ckpt.step, waiting_for_nodes=list(missing))
                continue
            size += ckpt.manifest.total_size
        pushed += 1
        o.event("would_push" if args.dry_run else "pushed",
                f"{verb} {ckpt.name} ({label(ckpt.name)}, "
                f"{human_size(ckpt.manifest.total_size)})",
                name=ckpt.name, step=ckpt.step, size=ckpt.manifest.total_size,
                files=len(ckpt.manifest.files))
    seconds = time.monotonic() - start
    moved = f" ({rate(size, seconds)})" if pushed and not args.dry_run else ""
    return o.summary(
        0, f"{pushed} {verb}, {skipped} already in {redact_url(args.remote)}{moved}",
        dry_run=args.dry_run, **{"would_push" if args.dry_run else "pushed": pushed},
        skipped=skipped, bytes=size, seconds=round(seconds, 3))


# --------------------------------------------------------------------------- pull
def add_pull(p: argparse.ArgumentParser) -> None:
    p.add_argument("remote", help="remote URL")
    p.add_argument("local", help="local checkpoint directory to pull into")
    add_selection(p, "pull")
    p.add_argument("--rule", action="append", default=[], metavar="RULE",
                   help="zero-code: restore the versions of this watch rule (repeatable), "
                        "e.g. 'file:ckpt.pt'. The rule says which files under LOCAL are "
                        "written, so it never comes from the bucket: a zero-code pull needs "
                        "--rule or --preset (else CKPTSYNC_RULES / CKPTSYNC_PRESETS, else the "
                        "rules a `ckptsync watch` of LOCAL used); without any it refuses "
                        "(exit 2) and prints the rule the bucket proposes")
    p.add_argument("--preset", action="append", default=[], metavar="NAME",
                   help="zero-code: the rule of a framework preset, as for watch "
                        f"({', '.join(sorted(PRESETS))}); repeatable")
    p.add_argument("--allow-plaintext", action="store_true",
                   help="with a key (or from an encrypted run), also accept checkpoints that "
                        "are plaintext or carry no keyed manifest MAC, with a warning each: "
                        "for migrating a run started without a key")
    p.add_argument("--allow-fallback", action="store_true",
                   help=f"exit 0, not {EXIT_FELL_BACK}, when an older checkpoint than the "
                        "newest committed one was pulled")
    p.add_argument("--allow-empty", action="store_true",
                   help=f"a prefix that holds nothing at all is a new run: exit "
                        f"{EXIT_NOTHING_TO_DO} (a fresh start), not 1 (default: "
                        "CKPTSYNC_ALLOW_EMPTY=1)")
    p.add_argument("--dry-run", action="store_true",
                   help="only print what would be restored (name, step, size, files); "
                        "write nothing")
    p.epilog = exit_help("pull")


def _fell_back(args: argparse.Namespace, pulled: str, skipped: list[tuple[str, str]]) -> int:
    """The exit code; with ``skipped`` (newer committed checkpoints passed over, newest
    first), also say on stderr that ``pulled`` is not the newest committed checkpoint."""
    if not skipped:
        return 0
    why = "; ".join(f"{n}: {r.splitlines()[0] if r else '?'}" for n, r in skipped)
    code = 0 if args.allow_fallback else EXIT_FELL_BACK
    out(args).diagnostic(f"ckptsync: warning: pulled {pulled}, not the newest committed "
                         f"checkpoint {skipped[0][0]}: {why}"
                         + ("" if args.allow_fallback else
                            f" (exit {code}; --allow-fallback to accept it)"))
    return code


def nothing_committed(args: argparse.Namespace, store: Any) -> RunFinder:
    """The remote holds no committed checkpoint: return its finder when that may be said
    (the run root exists, or ``--allow-empty``); else raise what the prefix is instead.

    Raises:
        NotARunError: a prefix that holds nothing at all (the runs beside it named), or
            nothing ckptsync wrote (the runs under it named).
    """
    finder = RunFinder.of(store)
    probe = finder.probe()
    if probe.kind == "run" or (probe.kind == "empty" and allow_empty(args)):
        return finder
    under = finder.runs_under() if probe.kind == "foreign" else []
    raise not_a_run(store.url_of(), [] if under else finder.runs_beside(),
                    foreign=probe.kind == "foreign", under=under)


def _newer_local(local: str, head: Manifest) -> LocalCheckpoint | None:
    """The newest local checkpoint newer than ``head``, if ``local`` holds one."""
    directory = Path(local).expanduser()
    if not directory.is_dir():
        return None
    newer = [c for c in LocalStore(directory).list() if c.manifest.sort_key() > head.sort_key()]
    return newer[-1] if newer else None


def run_pull(args: argparse.Namespace) -> int:
    store = open_store(args, args.remote)
    o = out(args)
    name = select(store, args.name, args.step)
    head = store.read_manifest(name) if name else store.newest_valid()
    if name is not None and head is None:
        raise NoCheckpointError(f"no committed checkpoint {name} in {store.url_of()}")
    if head is None and all(e.status == "uncommitted" for e in store.scan()):
        nothing_committed(args, store)
        o.diagnostic(f"ckptsync: nothing to pull: {store.url_of()} holds no checkpoint yet "
                     f"(exit {EXIT_NOTHING_TO_DO}: a fresh start)")
        return o.summary(EXIT_NOTHING_TO_DO, None, pulled=0, skipped=0, fell_back=False)
    pinned, pinned_by = pinned_rules(args.rule, args.preset, args.local, args.remote)
    watched = head is not None and head.source.get("kind") == "watched"
    if pinned_by == "flags" or watched:
        if not pinned:
            raise unpinned_error(store, args.remote, args.local)
        return _pull_watched(args, store, o, name, pinned)
    if head is not None:
        newer = _newer_local(args.local, head)
        if newer is not None:
            o.diagnostic(f"ckptsync: warning: {args.local} already holds {label(newer.name)} "
                         f"({newer.name}), newer than {label(head.name)} from "
                         f"{store.url_of()}: a trainer that resumes from the newest local "
                         "checkpoint takes that one, not the pulled one")
    if args.dry_run:
        if head is None:  # committed ones, none valid: the pull itself says why
            raise NoCheckpointError(f"no valid checkpoint to pull in {store.url_of()}")
        o.event("would_pull", f"would pull {head.name} ({label(head.name)}, "
                f"{human_size(head.total_size)}, {len(head.files)} "
                f"file{'s' if len(head.files) != 1 else ''}: "
                f"{', '.join(f.path for f in head.files)}) into {args.local}",
                **manifest_summary(head), paths=[f.path for f in head.files])
        return o.summary(0, None, dry_run=True, would_pull=1)
    local = LocalStore(args.local)
    skipped: list[tuple[str, str]] = []
    prog = progress(args)
    start = time.monotonic()
    ckpt = store.pull(name, local, progress=prog, skipped=skipped)
    seconds = time.monotonic() - start
    store.bind_run(local.directory)
    store.adopt_run()  # a writer of LOCAL afterwards (watch, push) continues this run
    for n, problem in skipped:  # newest first, each passed over for the reason given
        o.event("skipped", None, name=n, problem=problem)
    size = ckpt.manifest.total_size
    o.event("pulled", f"pulled {ckpt.name} ({label(ckpt.name)}) into {ckpt.path} "
            f"({rate(size, seconds)})",
            **manifest_summary(ckpt.manifest), path=str(ckpt.path))
    code = _fell_back(args, ckpt.name, skipped)
    return o.summary(code, None, pulled=1, skipped=len(skipped), fell_back=bool(skipped),
                     bytes=size, seconds=round(seconds, 3))


def _pull_watched(args: argparse.Namespace, store: Any, o: Output, name: str | None,
                  pinned: list[str]) -> int:
    """Zero-code checkpoints go back to their original relative paths, so the trainer's own
    resume flag finds them: only the paths of a rule the user gave."""
    if args.dry_run:
        committed = [x for x in store.list() if is_watched(x) and x.source.get("rule") in pinned
                     and (name is None or x.name == name)]
        newest: dict[str, Manifest] = {}
        for m in sorted(committed, key=lambda m: m.sort_key()):
            newest[str(m.source.get("rule"))] = m
        for m in newest.values():
            o.event("would_restore", f"would restore {label(m.name)} ({m.name}, rule "
                    f"{m.source.get('rule')}): {', '.join(f.path for f in m.files)}",
                    name=m.name, step=m.step, rule=m.source.get("rule"),
                    paths=[f.path for f in m.files], size=m.total_size)
        return o.summary(0, None, dry_run=True, would_restore=len(newest))
    start = time.monotonic()
    restored = restore_watched(store, args.local, name=name, rules=pinned)
    seconds = time.monotonic() - start
    newer: list[tuple[str, str]] = []
    if name is None:  # for each rule, was its newest committed version restored?
        committed = [x for x in store.list() if is_watched(x)]
        remote = {x.name: x for x in committed}  # its remote manifest carries its seq
        for m in restored:
            key = remote.get(m.name, m).sort_key()
            newer += [(x.name, "not valid: see the warnings above") for x in committed
                      if x.source.get("rule") == m.source.get("rule")
                      and x.name != m.name and x.sort_key() > key]
    newer.sort(key=lambda s: name_sort_key(s[0]), reverse=True)
    for n, problem in newer:
        o.event("skipped", None, name=n, problem=problem)
    for m in restored:  # exactly the paths written
        o.event("restored", None, name=m.name, step=m.step, rule=m.source.get("rule"),
                paths=[f.path for f in m.files])
    paths = [f.path for m in restored for f in m.files]
    size = sum(m.total_size for m in restored)
    code = _fell_back(args, ", ".join(m.name for m in restored), newer)
    return o.summary(code, f"restored {', '.join(m.name for m in restored)} into "
                     f"{args.local}: " + ", ".join(paths) + f" ({rate(size, seconds)})",
                     restored=len(restored), skipped=len(newer), fell_back=bool(newer))
