"""The ``ckptsync`` command line: push, pull, ls, verify, gc, demo, watch, status (torch-free).

Each subcommand is one entry of :data:`COMMANDS` (help text, an argument-adding function and
a run function returning the exit code); add new subcommands there. The daemon's ``watch`` and
``status`` are defined next to the daemon (:mod:`ckptsync.daemon.cli`) and added to this one
parser by :func:`build_parser`.

Every subcommand, ``watch`` and ``status`` included, takes the common flags of
:func:`common_parser` (``--json``, ``-o KEY=VALUE``, ``-v``, ``--no-progress``,
``--key-file F``).

Exit codes (the one table is the README's "The command line"): 0 success; 1 a failure
(remote error, corrupt checkpoint, nothing valid to pull); 2 bad usage or configuration
(unknown scheme, missing optional package, bad option); 3 the remote refused the credentials
or denied access (``watch``: any permanent remote error at start-up); 4 (``pull``) pulled an
older checkpoint than the newest committed one, unless ``--allow-fallback``; 5 nothing to do
(``pull`` of a remote that holds no checkpoint); 130 interrupted (SIGINT). Expected errors
print one message on stderr, never a traceback.

``--json``: the commands in :data:`STREAMING` write JSON Lines (:mod:`ckptsync.output`), one
object per checkpoint as it is done and a last ``"event": "summary"`` line with the counts and
the exit code; ``status`` and ``demo`` write one object.

Example::

    ckptsync push ./ckpts s3://bucket/run1
    ckptsync ls s3://bucket/run1 --json
    ckptsync pull s3://bucket/run1 ./restore
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptsync.config import TransferConfig, parse_storage_options, storage_options_from_env
from ckptsync.crypto import ENV_KEY, ENV_KEY_FILE, KeyRing
from ckptsync.daemon.cli import add_subcommands as add_daemon_subcommands
from ckptsync.errors import (
    CkptSyncError,
    ConfigError,
    CorruptCheckpointError,
    NoCheckpointError,
    RemoteError,
)
from ckptsync.local import LocalStore
from ckptsync.manifest import Manifest, name_sort_key
from ckptsync.output import Output, human_size
from ckptsync.ownership import (
    check_not_local_checkpoint_dir,
    check_remote_outside,
    check_remote_url,
)
from ckptsync.progress import NullProgress, Progress, TqdmProgress
from ckptsync.redact import install_filter, redact_url, scrub
from ckptsync.retention import RetentionPolicy, parse_best
from ckptsync.version import __version__
from ckptsync.zerocode.restore import restore_watched
from ckptsync.zerocode.rules import is_watched

__all__ = [
    "COMMANDS",
    "EXIT_DENIED",
    "EXIT_FAILED",
    "EXIT_FELL_BACK",
    "EXIT_INTERRUPTED",
    "EXIT_NOTHING_TO_DO",
    "EXIT_USAGE",
    "Command",
    "TqdmProgress",
    "build_parser",
    "common_parser",
    "main",
]

log = logging.getLogger("ckptsync.cli")

EXIT_FAILED = 1
#: Bad usage or configuration (argparse's own code for a bad command line too).
EXIT_USAGE = 2
#: The remote refused the credentials or denied access; the daemon's ``EXIT_REMOTE`` (3, any
#: permanent remote error at start-up) is the same code.
EXIT_DENIED = 3
#: ``pull`` restored a valid checkpoint, but an older one than the newest committed: a script
#: that resumes from it should know it lost training (``--allow-fallback`` makes it 0).
EXIT_FELL_BACK = 4
#: Nothing to do: ``pull`` of a remote that holds no committed checkpoint (a fresh run).
EXIT_NOTHING_TO_DO = 5
EXIT_INTERRUPTED = 130

#: The end of ``ckptsync --help``: the install line (the same as the README's) and the exit
#: codes (the README's table, in short).
HELP_EPILOG = f"""\
install (torch first, the way you normally do; the daemon alone needs no torch):
  pip install "ckptsync[torch,s3]"      or gcs, gdrive instead of s3
  pip install "ckptsync[s3]"            the daemon and the CLI only

exit codes:
  0    success
  {EXIT_FAILED}    failure (a remote error, a corrupt checkpoint, nothing valid to pull)
  {EXIT_USAGE}    bad usage or configuration
  {EXIT_DENIED}    the remote refused the credentials or denied access
  {EXIT_FELL_BACK}    pull fell back to an older checkpoint (--allow-fallback: 0)
  {EXIT_NOTHING_TO_DO}    nothing to do: pull of a remote that holds no checkpoint
  {EXIT_INTERRUPTED}  interrupted (SIGINT; watch --once stopped by a signal before it finished)
"""


# --------------------------------------------------------------------------- progress


def _progress(args: argparse.Namespace) -> Progress:
    if args.json or args.no_progress or not sys.stderr.isatty():
        return NullProgress()
    return TqdmProgress()


# --------------------------------------------------------------------------- helpers


def _store(args: argparse.Namespace, url: str) -> Any:
    from ckptsync.remote import RemoteStore

    check_remote_url(url, "the REMOTE argument")
    config = TransferConfig.resolve(max_workers=args.workers, retries=args.retries)
    # CKPTSYNC_STORAGE_OPTIONS (JSON), then -o KEY=VALUE flags over it, key by key.
    options = storage_options_from_env() | parse_storage_options(args.storage_option)
    keys = KeyRing.resolve(getattr(args, "key_file", None))  # else CKPTSYNC_KEY(_FILE)
    return RemoteStore(url, options, config=config, keys=keys)


def _existing_local(path: str) -> LocalStore:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise NoCheckpointError(f"local checkpoint directory {p} does not exist")
    return LocalStore(p)


#: The commands that work through several checkpoints: with ``--json``, JSON Lines (one
#: object per item as it finishes, then a summary line), see :mod:`ckptsync.output`.
STREAMING = ("push", "pull", "ls", "verify", "gc")


def _out(args: argparse.Namespace) -> Output:
    out: Output | None = getattr(args, "output", None)
    if out is None:
        out = args.output = Output(args.command, args.json)
    return out


def _manifest_summary(m: Manifest) -> dict[str, Any]:
    return {"name": m.name, "step": m.step, "created": m.created, "size": m.total_size,
            "files": len(m.files), "metrics": m.metrics,
            "key_ids": sorted({f.encryption.key_id for f in m.files if f.encryption})}


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in [header, *rows]]
    return "\n".join(lines)


# --------------------------------------------------------------------------- subcommands


def _add_push(p: argparse.ArgumentParser) -> None:
    p.add_argument("local", help="local checkpoint directory (as given to Checkpointer)")
    p.add_argument("remote", help="remote URL, e.g. s3://bucket/run1")
    p.add_argument("--dry-run", action="store_true",
                   help="only print what would be uploaded; write nothing")


def _run_push(args: argparse.Namespace) -> int:
    check_remote_url(args.remote, "the REMOTE argument")
    local = _existing_local(args.local)
    check_remote_outside(args.remote, local.directory, "the REMOTE argument")
    store = _store(args, args.remote)
    out = _out(args)
    pushed = skipped = 0
    progress = _progress(args)
    verb = "would push" if args.dry_run else "pushed"
    for ckpt in local.list():
        # One manifest read per local checkpoint (a few, with retention), not a remote scan.
        if store.read_manifest(ckpt.name) is not None:
            if not args.dry_run:
                store.push(ckpt)  # a no-op, but refuses a different checkpoint of the same name
            skipped += 1
            out.event("skipped", None, name=ckpt.name, reason="already in the remote")
            continue
        if not args.dry_run:
            missing = store.waiting_for(store.push(ckpt, progress=progress))
            if missing is not None:  # one node's part: the checkpoint is not committed yet
                out.event("part_pushed", f"{ckpt.name}: part uploaded, waiting for nodes "
                          f"{list(missing)} (not restorable until every node's part is up)",
                          name=ckpt.name, step=ckpt.step, waiting_for_nodes=list(missing))
                continue
        pushed += 1
        out.event("would_push" if args.dry_run else "pushed",
                  f"{verb} {ckpt.name} ({human_size(ckpt.manifest.total_size)})",
                  name=ckpt.name, step=ckpt.step, size=ckpt.manifest.total_size,
                  files=len(ckpt.manifest.files))
    return out.summary(
        0, f"{pushed} {verb}, {skipped} already in {redact_url(args.remote)}",
        dry_run=args.dry_run, **{"would_push" if args.dry_run else "pushed": pushed},
        skipped=skipped)


PULL_EPILOG = f"""\
exit codes: 0 pulled the newest committed checkpoint (or the one --name gives);
{EXIT_FELL_BACK} pulled an older valid one because every newer one is corrupt, partial or
unusable (named on stderr) -- pass --allow-fallback to exit 0 then; {EXIT_NOTHING_TO_DO} nothing
to do: the remote holds no checkpoint (a fresh run); 1 failure (remote error, nothing valid
to pull); 2 bad usage or configuration; {EXIT_DENIED} credentials refused or access denied;
{EXIT_INTERRUPTED} interrupted."""


def _add_pull(p: argparse.ArgumentParser) -> None:
    p.add_argument("remote", help="remote URL")
    p.add_argument("local", help="local checkpoint directory to pull into")
    p.add_argument("--name", help="checkpoint name (default: the newest valid one)")
    p.add_argument("--rule", action="append", default=[], metavar="RULE",
                   help="zero-code: restore only versions of this watch rule (repeatable), "
                        "e.g. 'file:ckpt.pt'; without it, every rule the remote names is "
                        "restored")
    p.add_argument("--allow-fallback", action="store_true",
                   help=f"exit 0, not {EXIT_FELL_BACK}, when an older checkpoint than the "
                        "newest committed one was pulled")
    p.epilog = PULL_EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter


def _fell_back(args: argparse.Namespace, pulled: str, skipped: list[tuple[str, str]]) -> int:
    """The exit code; with ``skipped`` (newer committed checkpoints passed over, newest
    first), also say on stderr that ``pulled`` is not the newest committed checkpoint."""
    if not skipped:
        return 0
    why = "; ".join(f"{n}: {r.splitlines()[0] if r else '?'}" for n, r in skipped)
    code = 0 if args.allow_fallback else EXIT_FELL_BACK
    _out(args).diagnostic(f"ckptsync: warning: pulled {pulled}, not the newest committed "
                          f"checkpoint {skipped[0][0]}: {why}"
                          + ("" if args.allow_fallback else
                             f" (exit {code}; --allow-fallback to accept it)"))
    return code


def _run_pull(args: argparse.Namespace) -> int:
    store = _store(args, args.remote)
    out = _out(args)
    head = store.read_manifest(args.name) if args.name else store.newest_valid()
    if head is None and args.name is None and all(e.status == "uncommitted"
                                                   for e in store.scan()):
        out.diagnostic(f"ckptsync: nothing to pull: {redact_url(args.remote)} holds no "
                       f"checkpoint (exit {EXIT_NOTHING_TO_DO})")
        return out.summary(EXIT_NOTHING_TO_DO, None, pulled=0, skipped=0, fell_back=False)
    if args.rule or (head is not None and head.source.get("kind") == "watched"):
        # Zero-code checkpoints go back to their original relative paths, so the trainer's
        # own resume flag finds them.
        restored = restore_watched(store, args.local, name=args.name, rules=args.rule)
        newer: list[tuple[str, str]] = []
        if args.name is None:  # for each rule, was its newest committed version restored?
            committed = [x for x in store.list() if is_watched(x)]
            for m in restored:
                newer += [(x.name, "not valid: see the warnings above") for x in committed
                          if x.source.get("rule") == m.source.get("rule")
                          and x.sort_key() > m.sort_key()]
        newer.sort(key=lambda s: name_sort_key(s[0]), reverse=True)
        for n, problem in newer:
            out.event("skipped", None, name=n, problem=problem)
        for m in restored:  # exactly the paths written
            out.event("restored", None, name=m.name, step=m.step, rule=m.source.get("rule"),
                      paths=[f.path for f in m.files])
        paths = [f.path for m in restored for f in m.files]
        code = _fell_back(args, ", ".join(m.name for m in restored), newer)
        return out.summary(code, f"restored {', '.join(m.name for m in restored)} into "
                           f"{args.local}: " + ", ".join(paths),
                           restored=len(restored), skipped=len(newer), fell_back=bool(newer))
    local = LocalStore(args.local)
    skipped: list[tuple[str, str]] = []
    ckpt = store.pull(args.name, local, progress=_progress(args), skipped=skipped)
    for n, problem in skipped:  # newest first, each passed over for the reason given
        out.event("skipped", None, name=n, problem=problem)
    out.event("pulled", f"pulled {ckpt.name} (step {ckpt.step}) into {ckpt.path}",
              **_manifest_summary(ckpt.manifest), path=str(ckpt.path))
    code = _fell_back(args, ckpt.name, skipped)
    return out.summary(code, None, pulled=1, skipped=len(skipped), fell_back=bool(skipped))


def _add_ls(p: argparse.ArgumentParser) -> None:
    p.add_argument("remote", help="remote URL")
    p.add_argument("--all", action="store_true", help="also show uncommitted leftovers")


def _run_ls(args: argparse.Namespace) -> int:
    store = _store(args, args.remote)
    entries = [e for e in store.scan() if args.all or e.status != "uncommitted"]
    out = _out(args)
    if args.json:
        for e in entries:
            d: dict[str, Any] = {"name": e.name, "status": e.status, "size": e.size,
                                 "problem": e.problem}
            if e.manifest is not None:
                d.update(_manifest_summary(e.manifest), status=e.status, size=e.size)
            out.event("checkpoint", None, **d)
        by_status = {s: sum(e.status == s for e in entries)
                     for s in ("valid", "partial", "corrupt", "uncommitted")}
        return out.summary(0, None, checkpoints=len(entries), **by_status)
    rows = []
    for e in entries:
        m = e.manifest
        metrics = " ".join(f"{k}={v:.4g}" for k, v in (m.metrics if m else {}).items())
        rows.append([
            e.name,
            "" if m is None or m.step is None else str(m.step),
            m.created[:19].replace("T", " ") if m else "",
            human_size(e.size),
            metrics,
            e.status,
        ])
    if not rows:
        out.line(f"no checkpoints in {redact_url(args.remote)}")
        return 0
    out.line(_table(rows, ["NAME", "STEP", "CREATED (UTC)", "SIZE", "METRICS", "STATUS"]))
    return 0


def _add_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument("remote", help="remote URL")
    p.add_argument("--name", help="verify only this checkpoint (default: every committed one)")
    p.add_argument("--quick", action="store_true", help="check sizes only, no digests")


def _run_verify(args: argparse.Namespace) -> int:
    store = _store(args, args.remote)
    names = [args.name] if args.name else [
        e.name for e in store.scan() if e.status != "uncommitted"]
    if not names:
        raise NoCheckpointError(f"no committed checkpoint in {redact_url(args.remote)}")
    out = _out(args)
    bad = 0
    progress = _progress(args)
    for name in names:
        try:
            store.verify(name, full=not args.quick, progress=progress)
            out.event("verified", f"ok       {name}", name=name, ok=True, problem=None)
        except CorruptCheckpointError as e:
            bad += 1
            out.event("verified", f"CORRUPT  {name}: {e}", name=name, ok=False, problem=str(e))
    if bad and not args.json:
        out.diagnostic(f"{bad} of {len(names)} checkpoint(s) failed verification")
    return out.summary(1 if bad else 0, None, verified=len(names), ok=len(names) - bad,
                       corrupt=bad)


def _add_gc(p: argparse.ArgumentParser) -> None:
    p.add_argument("remote", help="remote URL")
    p.add_argument("--keep-last", type=int, metavar="N", help="keep the N newest")
    p.add_argument("--keep-best", metavar="METRIC:min|max:K", help="keep the K best by METRIC")
    p.add_argument("--keep-every", type=int, metavar="M", help="keep every Mth step")
    p.add_argument("--grace", type=float, metavar="SECONDS",
                   help="age after which an uncommitted upload is removed "
                        "(default: CKPTSYNC_GRACE or 86400)")
    p.add_argument("--dry-run", action="store_true", help="only print what would be removed")


def _run_gc(args: argparse.Namespace) -> int:
    policy = RetentionPolicy(
        keep_last=args.keep_last,
        keep_best=parse_best(args.keep_best) if args.keep_best else None,
        keep_every=args.keep_every,
    )
    check_remote_url(args.remote, "the REMOTE argument")
    check_not_local_checkpoint_dir(args.remote, "the REMOTE argument")
    store = _store(args, args.remote)
    out = _out(args)
    # Before anything is deleted: a root that ckptsync never wrote to is refused (exit 2).
    if not store.check_owned():
        return out.summary(0, f"nothing to collect: {store.url_of()} is empty",
                           dry_run=args.dry_run, deleted=0, leftovers=0)
    verb = "would delete" if args.dry_run else "deleted"
    event = "would_delete" if args.dry_run else "deleted"
    deleted = store.apply_retention(policy, dry_run=args.dry_run) if policy.active else []
    for n in deleted:  # each phase reports once it is done: retention, then leftovers
        out.event(event, f"{verb} {n}", name=n, kind="checkpoint")
    leftovers = store.gc(args.grace, dry_run=args.dry_run)
    for n in leftovers:
        out.event(event, f"{verb} leftover {n}", name=n, kind="leftover")
    return out.summary(
        0, f"{len(deleted)} checkpoint(s) and {len(leftovers)} leftover(s) {verb}",
        dry_run=args.dry_run, deleted=len(deleted), leftovers=len(leftovers))


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo-out", metavar="DIR",
                   help="output directory: report.txt, report.json, loss.png (default ./demo-out)")
    p.add_argument("--remote", metavar="URL",
                   help="sync to this fsspec URL (a fresh prefix under it) instead of "
                        "file://OUT/remote/run; storage options with -o KEY=VALUE")
    p.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    p.add_argument("--save-every", type=int, default=20, metavar="N",
                   help="checkpoint every N steps (default 20)")
    p.add_argument("--kill-at", type=int, default=130, metavar="STEP",
                   help="SIGKILL the trainer once this step is done (default 130)")
    p.add_argument("--script", metavar="PATH",
                   help="trainer to run (default: the packaged ckptsync.examples.train_tiny_lm)")


def _run_demo(args: argparse.Namespace) -> int:
    # Lazy: the demo (and torch, which it needs to compare weights) loads only when asked for.
    from ckptsync.demo import DemoConfig, format_report, run_demo

    report = run_demo(DemoConfig(
        out_dir=Path(args.out), remote=args.remote,
        storage_options=parse_storage_options(args.storage_option),
        steps=args.steps, save_every=args.save_every, kill_at=args.kill_at,
        script=Path(args.script) if args.script else None,
        progress=isinstance(_progress(args), TqdmProgress),  # bars only on a terminal
        narrate_to_stderr=args.json,
    ))
    _out(args).document(report, format_report(report))
    return 0 if report["exact"] else 1


@dataclass(frozen=True)
class Command:
    """One subcommand: its help line, how it adds arguments, and what it runs."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


#: Subcommands by name. Add new ones here; ``watch`` and ``status`` come from
#: :mod:`ckptsync.daemon.cli` (see :func:`build_parser`).
COMMANDS: dict[str, Command] = {
    "push": Command("upload every committed local checkpoint not yet in the remote",
                    _add_push, _run_push),
    "pull": Command("download the newest valid (or a named) checkpoint, digest-verified; "
                    f"exit {EXIT_FELL_BACK} if that is older than the newest committed one",
                    _add_pull, _run_pull),
    "ls": Command("list remote checkpoints: name, step, time, size, metrics, status",
                  _add_ls, _run_ls),
    "verify": Command("check remote checkpoints' sizes and digests (exit 1 on a mismatch)",
                      _add_verify, _run_verify),
    "gc": Command("apply retention and remove uncommitted leftovers older than a grace period; "
                  "deletes only what ckptsync wrote",
                  _add_gc, _run_gc),
    "demo": Command("train a tiny GPT, SIGKILL it, resume on a fresh VM from the remote, "
                    "and check the resume is bit-exact", _add_demo, _run_demo),
}


def common_parser() -> argparse.ArgumentParser:
    """The flags every subcommand takes, ``watch`` and ``status`` included (an argparse
    parent): ``--json``, ``-o/--storage-option``, ``--no-progress``, ``-v/--verbose``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true",
                        help="machine-readable output on stdout: push, pull, ls, verify "
                             "and gc write JSON Lines (an object per checkpoint as it is done, "
                             "then a summary); status and demo one object; watch logs JSON "
                             "lines on stderr")
    common.add_argument("-o", "--storage-option", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="fsspec storage option (VALUE parsed as JSON when it parses); "
                             "repeatable. Prefer the backend's credential chain for secrets")
    common.add_argument("--no-progress", action="store_true",
                        help="no progress bars (there are none when stderr is not a terminal)")
    common.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    add_key_file(common)
    return common


def add_key_file(p: argparse.ArgumentParser) -> None:
    """``--key-file F`` (repeatable): client-side encryption keys (:mod:`ckptsync.crypto`)."""
    p.add_argument("--key-file", action="append", default=[], metavar="FILE",
                   help="encryption key (32 bytes, hex or base64); repeatable for rotation: "
                        "the first encrypts what is pushed, each decrypts by key id. "
                        f"Default: {ENV_KEY_FILE} or {ENV_KEY}")


def _transfer_parser() -> argparse.ArgumentParser:
    """Transfer flags of the one-shot commands (``watch`` has its own ``--workers``)."""
    transfer = argparse.ArgumentParser(add_help=False)
    transfer.add_argument("--workers", type=int, help="parallel file transfers "
                          "(default: CKPTSYNC_MAX_WORKERS or 8)")
    transfer.add_argument("--retries", type=int, help="attempts per operation "
                          "(default: CKPTSYNC_RETRIES or 5)")
    return transfer


def build_parser() -> argparse.ArgumentParser:
    """The ``ckptsync`` argument parser (the only one): one subparser per :data:`COMMANDS`
    entry, then the daemon's ``watch`` and ``status``; each takes :func:`common_parser`'s
    flags."""
    common, transfer = common_parser(), _transfer_parser()

    parser = argparse.ArgumentParser(
        prog="ckptsync",
        description="Crash-safe PyTorch checkpoints, synced atomically to S3, GCS or Drive.",
        epilog=HELP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ckptsync {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help,
                           parents=[common, transfer])
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    # Defined next to what they drive; each sets ``_run`` like the COMMANDS entries do.
    add_daemon_subcommands(sub, parents=[common])
    return parser


def _exit_code(e: CkptSyncError) -> int:
    if isinstance(e, ConfigError):
        return EXIT_USAGE
    if isinstance(e, RemoteError) and e.denied:
        return EXIT_DENIED
    return EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ckptsync`` console script; returns the exit code.

    Nothing it prints holds a credential: log records (botocore's and s3fs's DEBUG ones at
    ``-vv`` too) go through :class:`ckptsync.redact.SecretFilter`, and error messages and
    tracebacks through :func:`ckptsync.redact.scrub`.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = getattr(args, "verbose", 0) or 0
    level = logging.WARNING if verbose == 0 else (logging.INFO if verbose == 1 else logging.DEBUG)
    logging.basicConfig(level=level, format="ckptsync: %(levelname)s: %(message)s")
    install_filter(logging.getLogger().handlers)
    # JSON Lines end with a summary line on a failure too (the error is on stderr as well).
    out = args.output = Output(args.command, bool(getattr(args, "json", False)))
    try:
        code: int = args._run(args)
        return code
    except CkptSyncError as e:
        out.diagnostic(f"ckptsync: error: {scrub(str(e))}")
        # -vv: where it came from, with the backend's exception (scrubbed by the filter).
        log.debug("traceback of the error above", exc_info=True)
        return _failed(out, _exit_code(e), scrub(str(e)))
    except KeyboardInterrupt:
        out.diagnostic("ckptsync: interrupted")
        return _failed(out, EXIT_INTERRUPTED, "interrupted")
    except Exception as e:  # a bug: its traceback, without the secrets it may hold
        trace = "".join(traceback.format_exception(e))
        out.diagnostic(f"ckptsync: internal error (please report it):\n{scrub(trace)}")
        return _failed(out, EXIT_FAILED, f"internal error: {scrub(repr(e))}")


def _failed(out: Output, code: int, error: str) -> int:
    if out.command in STREAMING:
        out.failed(code, error)
    return code


if __name__ == "__main__":
    sys.exit(main())
