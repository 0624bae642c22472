"""The ``ckptsync`` command line: push, pull, ls, verify, gc, demo, watch, status (torch-free).

Each subcommand is one entry of :data:`COMMANDS` (help text, an argument-adding function and
a run function returning the exit code), one module per group: :mod:`.transfers` (push,
pull), :mod:`.inspect` (ls, verify), :mod:`.collect` (gc); the daemon's ``watch`` and
``status`` are defined next to the daemon (:mod:`ckptsync.daemon.cli`) and added to this one
parser by :func:`build_parser`. :mod:`.common` holds what they share (flags, opening the
remote, output, selection), :mod:`.deadline` the ``--timeout`` every one-shot command has,
:mod:`.exits` the one table of exit codes (the README's, ``--help``'s and each subcommand's).

Every subcommand takes the common flags of :func:`common_parser` (``--json``, ``-o
KEY=VALUE``, ``-q``, ``-v``, ``--no-progress``, ``--key-file F``). Expected errors print one
message on stderr, never a traceback; a usage error prints the subcommand's usage (exit 2);
bare ``ckptsync`` prints the help and exits 2, as ``aws`` does; a closed stdout (``| head``)
ends the command quietly with 141, as a closed pipe ends any Unix tool.

``--json``: ``push``, ``pull``, ``ls``, ``verify`` and ``gc`` write JSON Lines
(:mod:`ckptsync.output`), one object per item as it is done and a last ``"event":
"summary"`` line with the counts and the exit code; ``status`` and ``demo`` write one object.

Example::

    ckptsync push ./ckpts s3://bucket/run1
    ckptsync ls s3://bucket/run1 --json
    ckptsync pull s3://bucket/run1 ./restore --step 160
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from ckptsync.cli.collect import add_gc, run_gc
from ckptsync.cli.common import (
    Command,
    add_key_file,
    bad_option,
    common_parser,
    out,
    progress,
    transfer_parser,
)
from ckptsync.cli.deadline import Deadline, resolve_timeout
from ckptsync.cli.inspect import add_ls, add_verify, run_ls, run_verify
from ckptsync.cli.transfers import add_pull, add_push, run_pull, run_push
from ckptsync.config import parse_storage_options
from ckptsync.daemon.cli import add_subcommands as add_daemon_subcommands
from ckptsync.errors import CkptSyncError, ConfigError, RemoteError
from ckptsync.exits import (
    EXIT_DENIED,
    EXIT_FAILED,
    EXIT_FELL_BACK,
    EXIT_INTERRUPTED,
    EXIT_NOTHING_TO_DO,
    EXIT_PIPE,
    EXIT_USAGE,
    exit_help,
)
from ckptsync.output import Output, OutputClosed
from ckptsync.progress import TqdmProgress
from ckptsync.redact import install_filter, scrub
from ckptsync.version import __version__

__all__ = [
    "COMMANDS",
    "EXIT_DENIED",
    "EXIT_FAILED",
    "EXIT_FELL_BACK",
    "EXIT_INTERRUPTED",
    "EXIT_NOTHING_TO_DO",
    "EXIT_PIPE",
    "EXIT_USAGE",
    "Command",
    "TqdmProgress",
    "add_key_file",
    "build_parser",
    "common_parser",
    "main",
]

log = logging.getLogger("ckptsync.cli")

#: The end of ``ckptsync --help``: the install line (the same as the README's) and the exit
#: codes (the README's table).
HELP_EPILOG = """\
install (torch first, the way you normally do; the daemon alone needs no torch):
  pip install "ckptsync[torch,s3]"      or gcs, gdrive instead of s3
  pip install "ckptsync[s3]"            the daemon and the CLI only

""" + exit_help()

#: Commands with no deadline: they run for as long as they are meant to.
UNBOUNDED = ("demo", "watch", "status", "wait")  # wait: its own --timeout bounds it
#: The commands that work through several checkpoints: JSON Lines with ``--json``.
STREAMING = ("push", "pull", "ls", "verify", "gc")


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
    p.epilog = exit_help("demo")


def _run_demo(args: argparse.Namespace) -> int:
    # Lazy: the demo (and torch, which it needs to compare weights) loads only when asked for.
    from ckptsync.demo import DemoConfig, format_report, run_demo

    report = run_demo(DemoConfig(
        out_dir=Path(args.out), remote=args.remote,
        storage_options=parse_storage_options(args.storage_option),
        steps=args.steps, save_every=args.save_every, kill_at=args.kill_at,
        script=Path(args.script) if args.script else None,
        progress=isinstance(progress(args).bar, TqdmProgress),  # bars only on a terminal
        narrate_to_stderr=args.json,
    ))
    out(args).document(report, format_report(report))
    return 0 if report["exact"] else 1


#: Subcommands by name. Add new ones here; ``watch`` and ``status`` come from
#: :mod:`ckptsync.daemon.cli` (see :func:`build_parser`).
COMMANDS: dict[str, Command] = {
    "push": Command("upload every committed local checkpoint not yet in the remote",
                    add_push, run_push),
    "pull": Command("download the newest valid (or a named) checkpoint, digest-verified; "
                    f"exit {EXIT_FELL_BACK} if that is older than the newest committed one",
                    add_pull, run_pull),
    "ls": Command("list a run's checkpoints (name, step, time, size, files, metrics, "
                  "status), or the runs under a bucket or folder", add_ls, run_ls),
    "verify": Command("check remote checkpoints' sizes and digests (exit 1 on a mismatch)",
                      add_verify, run_verify),
    "gc": Command("apply retention and remove uncommitted leftovers older than a grace period; "
                  "deletes only what ckptsync wrote", add_gc, run_gc),
    "demo": Command("train a tiny GPT, SIGKILL it, resume on a fresh VM from the remote, "
                    "and check the resume is bit-exact", _add_demo, _run_demo),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``ckptsync`` argument parser (the only one): one subparser per :data:`COMMANDS`
    entry, then the daemon's ``watch`` and ``status``; each takes :func:`common_parser`'s
    flags and ends its help with its exit codes."""
    common, transfer = common_parser(), transfer_parser()
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
                           parents=[common, transfer],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    # Defined next to what they drive; each sets ``_run`` like the COMMANDS entries do.
    add_daemon_subcommands(sub, parents=[common])
    return parser


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser | None = action.choices.get(name)
            return found
    return None


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; an unknown flag is reported with the subcommand's usage, not the
    top-level one (argparse's own ``parse_args`` reports it at the top)."""
    args, extras = parser.parse_known_args(argv)
    if extras:
        sub = _subparser(parser, args.command) or parser
        sub.error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def _exit_code(e: CkptSyncError) -> int:
    if isinstance(e, ConfigError):
        return EXIT_USAGE
    if isinstance(e, RemoteError) and e.denied:
        return EXIT_DENIED
    return EXIT_FAILED


def _pipe_closed() -> int:
    """stdout's reader went away: stop quietly, and keep the interpreter's last flush of
    stdout from failing too (the process's own stdout only, never a test's stand-in)."""
    stdout = sys.__stdout__
    if stdout is not None and sys.stdout is stdout:
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stdout.fileno())
    return EXIT_PIPE


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ckptsync`` console script; returns the exit code.

    Nothing it prints holds a credential: log records (botocore's and s3fs's DEBUG ones at
    ``-vv`` too) go through :class:`ckptsync.redact.SecretFilter`, and error messages and
    tracebacks through :func:`ckptsync.redact.scrub`.
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if not argv:  # bare `ckptsync`: the help, and the usage error's code (as aws does)
            parser.print_help()
            return EXIT_USAGE
        args = _parse(parser, argv)
    except (BrokenPipeError, OutputClosed):
        return _pipe_closed()
    verbose = getattr(args, "verbose", 0) or 0
    level = logging.WARNING if verbose == 0 else (logging.INFO if verbose == 1 else logging.DEBUG)
    logging.basicConfig(level=level, format="ckptsync: %(levelname)s: %(message)s")
    install_filter(logging.getLogger().handlers)
    # JSON Lines end with a summary line on a failure too (the error is on stderr as well).
    o = args.output = Output(args.command, bool(getattr(args, "json", False)),
                             quiet=bool(getattr(args, "quiet", False)))
    try:
        seconds = 0.0 if args.command in UNBOUNDED else resolve_timeout(
            getattr(args, "timeout", None))
        with Deadline(seconds, f"ckptsync {args.command}") as deadline:
            args.deadline = deadline
            code: int = args._run(args)
        return code
    except (BrokenPipeError, OutputClosed):
        return _pipe_closed()
    except CkptSyncError as e:
        if isinstance(e, RemoteError):  # -o nosuch=1, found at the backend's first call
            e = bad_option(e, str(getattr(args, "remote", "") or "")) or e
        o.diagnostic(f"ckptsync: error: {scrub(str(e))}")
        # -vv: where it came from, with the backend's exception (scrubbed by the filter).
        log.debug("traceback of the error above", exc_info=True)
        return _failed(o, _exit_code(e), scrub(str(e)))
    except KeyboardInterrupt:
        o.diagnostic("ckptsync: interrupted")
        return _failed(o, EXIT_INTERRUPTED, "interrupted")
    except Exception as e:  # a bug: its traceback, without the secrets it may hold
        trace = "".join(traceback.format_exception(e))
        o.diagnostic(f"ckptsync: internal error (please report it):\n{scrub(trace)}")
        return _failed(o, EXIT_FAILED, f"internal error: {scrub(repr(e))}")


def _failed(o: Output, code: int, error: str) -> int:
    if o.command in STREAMING:
        with contextlib.suppress(OutputClosed):
            o.failed(code, error)
    return code

