"""The one table of exit codes: every command's, ``watch``, ``status`` and ``wait`` included.

The README's "Exit codes" table, ``ckptsync --help`` and each subcommand's help are this
table (:func:`exit_help` renders a command's rows); tests/unit/test_cli_exits.py checks the
README against it and that a test produces each code.

Example::

    parser.epilog = exit_help("pull")
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field

__all__ = [
    "EXIT_DENIED",
    "EXIT_FAILED",
    "EXIT_FELL_BACK",
    "EXIT_INTERRUPTED",
    "EXIT_NOTHING_TO_DO",
    "EXIT_OK",
    "EXIT_PIPE",
    "EXIT_TABLE",
    "EXIT_USAGE",
    "ExitCode",
    "exit_help",
]

EXIT_OK = 0
EXIT_FAILED = 1
#: Bad usage or configuration (argparse's own code for a bad command line too).
EXIT_USAGE = 2
#: The remote refused the credentials or denied access; the daemon's ``EXIT_REMOTE`` (any
#: permanent remote error at start-up) and ``status``'s "the last attempt failed" too.
EXIT_DENIED = 3
#: ``pull`` restored a valid checkpoint, but an older one than the newest committed.
EXIT_FELL_BACK = 4
#: Nothing to do: ``pull`` of a run that holds no checkpoint yet (a fresh start).
EXIT_NOTHING_TO_DO = 5
EXIT_INTERRUPTED = 130
#: The reader of stdout went away (``ckptsync ls --json | head -1``): 128 + SIGPIPE, what a
#: shell reports for a command a closed pipe ended.
EXIT_PIPE = 141

ALL = "*"


@dataclass(frozen=True)
class ExitCode:
    """One row: the code, what it means for every command, and what it means for some
    commands in particular (``command -> meaning``)."""

    code: int
    meaning: str
    commands: dict[str, str] = field(default_factory=dict)
    only: tuple[str, ...] = ()  # the commands that can exit with it (empty: every one)


EXIT_TABLE: tuple[ExitCode, ...] = (
    ExitCode(EXIT_OK, "success", {
        "status": "every local checkpoint is committed remotely",
        "wait": "every local checkpoint is committed remotely",
        "gc": "success (an empty remote: nothing collected)",
        "watch": "done, or stopped by SIGTERM/SIGINT"}),
    ExitCode(EXIT_FAILED, "failure: a remote error, the --timeout deadline passed, a prefix "
             "that holds no run (a typo: the runs beside it are named)", {
                 "verify": "also a corrupt checkpoint",
                 "pull": "also nothing valid to pull",
                 "demo": "also the resume was not exact",
                 "watch": "also --once left failed checkpoints",
                 "status": "checkpoints are pending (not committed remotely yet)",
                 "wait": "still pending at the timeout (or no daemon runs to upload them)"}),
    ExitCode(EXIT_USAGE, "bad usage or configuration: a bad flag or argument, a missing "
             "local directory, an empty, unknown or malformed URL, a missing optional package",
             {"gc": "also a root that holds nothing ckptsync wrote",
              "watch": "also another daemon watches the directory (do not restart)",
              "status": "also no ckptsync watch has run in the directory",
              "wait": "also no ckptsync watch has run in the directory"}),
    ExitCode(EXIT_DENIED, "the remote refused the credentials or denied access", {
        "watch": "also any permanent remote error at start-up (a missing bucket too)",
        "status": "the last upload attempt failed and nothing newer succeeded",
        "wait": "the last upload attempt failed and nothing newer succeeded"}),
    ExitCode(EXIT_FELL_BACK, "pull fell back to an older checkpoint: every newer committed "
             "one is corrupt, partial or unusable (named on stderr; --allow-fallback: 0)",
             only=("pull",)),
    ExitCode(EXIT_NOTHING_TO_DO, "nothing to do: pull of a run that holds no checkpoint "
             "yet, or of an empty prefix with --allow-empty (a fresh start)", only=("pull",)),
    ExitCode(EXIT_INTERRUPTED, "interrupted (SIGINT, Ctrl-C)", {
        "watch": "also --once stopped by SIGTERM/SIGINT before everything was committed (run it "
                 "again)"}),
    ExitCode(EXIT_PIPE, "the reader of stdout went away (a closed pipe, as in | head -1)"),
)


def exit_help(command: str | None = None) -> str:
    """The exit-code lines of ``command``'s help (every row, in general, without one). A
    command's own meaning replaces the general one, or adds to it where it starts "also"."""
    lines = ["exit codes:"]
    for row in EXIT_TABLE:
        if command is not None and row.only and command not in row.only:
            continue
        meaning = row.meaning
        special = row.commands.get(command or "")
        if special is not None:
            meaning = f"{meaning}; {special[5:]}" if special.startswith("also ") else special
        elif command is None and row.commands:
            meaning += "".join(f"; {c}: {m.removeprefix('also ')}"
                               for c, m in row.commands.items())
        lines.append(textwrap.fill(meaning, width=92, initial_indent=f"  {row.code:<5}",
                                   subsequent_indent=" " * 7))
    return "\n".join(lines)
