"""``gc``: retention and leftovers on a remote; ``--dry-run`` says what it would delete and
what it keeps, with the rule that keeps each one."""

from __future__ import annotations

import argparse
from typing import Any

from ckptsync.cli.common import label, open_store, out
from ckptsync.exits import exit_help
from ckptsync.manifest import parse_name
from ckptsync.ownership import check_not_local_checkpoint_dir, check_remote_url
from ckptsync.retention import CheckpointInfo, RetentionPolicy, keep_reasons, parse_best

__all__ = ["add_gc", "run_gc"]


def add_gc(p: argparse.ArgumentParser) -> None:
    p.add_argument("remote", help="remote URL")
    p.add_argument("--keep-last", type=int, metavar="N", help="keep the N newest")
    p.add_argument("--keep-best", metavar="METRIC:min|max:K", help="keep the K best by METRIC")
    p.add_argument("--keep-every", type=int, metavar="M", help="keep every Mth step")
    p.add_argument("--grace", type=float, metavar="SECONDS",
                   help="age after which an uncommitted upload is removed "
                        "(default: CKPTSYNC_GRACE or 86400)")
    p.add_argument("--dry-run", action="store_true",
                   help="only print what would be removed, and what is kept and why")
    p.epilog = exit_help("gc")


def _kept(store: Any, policy: RetentionPolicy, doomed: list[str]) -> dict[str, list[str]]:
    """Why each committed checkpoint that stays is kept (the retention rules, or why
    retention does not count it)."""
    run = store.run_id
    why: dict[str, list[str]] = {}
    infos = []
    for key, e in enumerate(store.scan()):
        if e.status == "uncommitted" or e.name in doomed:
            continue
        if e.status != "valid" or e.manifest is None:
            why[e.name] = [f"{e.status}: left for a human to look at (ckptsync ls)"]
        elif parse_name(e.name) is None:
            why[e.name] = ["not a ckptsync name: never deleted"]
        elif e.manifest.run not in (None, run):
            why[e.name] = [f"another run's ({e.manifest.run}): never deleted"]
        else:
            infos.append(CheckpointInfo(e.name, e.manifest.step, (key,), e.manifest.metrics))
    why.update(keep_reasons(infos, policy))
    return why


def run_gc(args: argparse.Namespace) -> int:
    policy = RetentionPolicy(
        keep_last=args.keep_last,
        keep_best=parse_best(args.keep_best) if args.keep_best else None,
        keep_every=args.keep_every,
    )
    check_remote_url(args.remote, "the REMOTE argument")
    check_not_local_checkpoint_dir(args.remote, "the REMOTE argument")
    store = open_store(args, args.remote)
    o = out(args)
    # Before anything is deleted: a root that ckptsync never wrote to is refused (exit 2).
    if not store.check_owned():
        return o.summary(0, f"nothing to collect: {store.url_of()} is empty",
                         dry_run=args.dry_run, deleted=0, leftovers=0)
    verb = "would delete" if args.dry_run else "deleted"
    event = "would_delete" if args.dry_run else "deleted"
    deleted = store.apply_retention(policy, dry_run=args.dry_run) if policy.active else []
    for n in deleted:  # each phase reports once it is done: retention, then leftovers
        o.event(event, f"{verb} {n} ({label(n)})", name=n, kind="checkpoint")
    leftovers = store.gc(args.grace, dry_run=args.dry_run)
    for n in leftovers:
        o.event(event, f"{verb} leftover {n}", name=n, kind="leftover")
    if args.dry_run:
        for n, reasons in sorted(_kept(store, policy, deleted).items()):
            o.event("would_keep", f"would keep {n} ({label(n)}): {'; '.join(reasons)}",
                    name=n, reasons=reasons)
    return o.summary(
        0, f"{len(deleted)} checkpoint(s) and {len(leftovers)} leftover(s) {verb}",
        dry_run=args.dry_run, deleted=len(deleted), leftovers=len(leftovers))
