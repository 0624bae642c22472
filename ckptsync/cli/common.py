"""What every subcommand shares: its flags, opening the remote, output, progress, and picking
a checkpoint by name prefix or step.

Example::

    store = open_store(args, args.remote)           # checks the URL and optional packages
    name = select(store, args.name, args.step)      # a unique prefix or --step N
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptsync.cli.deadline import Deadline
from ckptsync.config import TransferConfig, parse_storage_options, storage_options_from_env
from ckptsync.crypto import ENV_KEY, ENV_KEY_FILE, KeyRing
from ckptsync.errors import ConfigError, NoCheckpointError, RemoteError
from ckptsync.local import LocalStore
from ckptsync.manifest import Manifest, parse_name
from ckptsync.output import Output, human_size
from ckptsync.ownership import check_remote_url, split_protocol
from ckptsync.progress import NullProgress, Progress, TqdmProgress
from ckptsync.redact import redact_url

__all__ = [
    "ALLOW_EMPTY_ENV",
    "Command",
    "add_key_file",
    "add_selection",
    "allow_empty",
    "bad_option",
    "common_parser",
    "endpoint_of",
    "existing_local",
    "label",
    "manifest_summary",
    "open_store",
    "out",
    "parse_age",
    "progress",
    "rate",
    "select",
    "table",
    "transfer_parser",
]

#: ``CKPTSYNC_ALLOW_EMPTY=1``: a prefix that holds nothing at all is a new run (``--allow-empty``).
ALLOW_EMPTY_ENV = "CKPTSYNC_ALLOW_EMPTY"
#: The package each URL scheme needs, and the extra that installs it.
_PACKAGES = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"),
             "gcs": ("gcsfs", "gcs"), "gdrive": ("gdrive_fsspec", "gdrive")}


@dataclass(frozen=True)
class Command:
    """One subcommand: its help line, how it adds arguments, and what it runs."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# --------------------------------------------------------------------------- flags
def common_parser() -> argparse.ArgumentParser:
    """The flags every subcommand takes, ``watch`` and ``status`` included (an argparse
    parent): ``--json``, ``-o``, ``-q``, ``-v``, ``--no-progress``, ``--key-file``."""
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
    common.add_argument("-q", "--quiet", action="store_true",
                        help="print nothing on stdout but --json output; errors and warnings "
                             "still go to stderr, and the exit code says how it went")
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


def transfer_parser() -> argparse.ArgumentParser:
    """Flags of the one-shot commands that talk to a remote (``watch`` has its own)."""
    transfer = argparse.ArgumentParser(add_help=False)
    transfer.add_argument("--workers", type=int, help="parallel file transfers "
                          "(default: CKPTSYNC_MAX_WORKERS or 8)")
    transfer.add_argument("--retries", type=int, help="attempts per operation "
                          "(default: CKPTSYNC_RETRIES or 5)")
    transfer.add_argument("--timeout", type=float, metavar="SECONDS",
                          help="give up once the command has moved no byte for this long "
                               "(a listing: in all), naming the endpoint (exit 1; default: "
                               "CKPTSYNC_TIMEOUT or 300; 0: no deadline)")
    return transfer


# --------------------------------------------------------------------------- remote
def _installed(package: str) -> bool:
    try:
        importlib.import_module(package)
    except ImportError:
        return False
    return True


def _check_packages(url: str, keys: KeyRing | None) -> None:
    """Exit 2 before anything is sent when a package the command needs is missing."""
    scheme = (split_protocol(url)[0] or "file").split("::")[-1]
    package, extra = _PACKAGES.get(scheme, (None, None))
    if package is not None and not _installed(package):
        raise ConfigError(f"{scheme}:// needs the {package!r} package, which is not installed: "
                          f"pip install 'ckptsync[{extra}]'")
    if keys is not None and not _installed("cryptography"):
        raise ConfigError("client-side encryption (--key-file, CKPTSYNC_KEY, CKPTSYNC_KEY_FILE) "
                          "needs the 'cryptography' package, which is not installed: "
                          "pip install 'ckptsync[encrypt]'")


def open_store(args: argparse.Namespace, url: str) -> Any:
    """The :class:`~ckptsync.remote.RemoteStore` of ``url`` with the command's flags; arms
    the command's deadline (``--timeout``) naming its endpoint.

    Raises:
        ConfigError: a malformed URL, a missing package, a bad option (exit 2).
    """
    from ckptsync.remote import RemoteStore

    check_remote_url(url, "the REMOTE argument")
    config = TransferConfig.resolve(max_workers=getattr(args, "workers", None),
                                    retries=getattr(args, "retries", None))
    # CKPTSYNC_STORAGE_OPTIONS (JSON), then -o KEY=VALUE flags over it, key by key.
    options = storage_options_from_env() | parse_storage_options(args.storage_option)
    keys = KeyRing.resolve(getattr(args, "key_file", None))  # else CKPTSYNC_KEY(_FILE)
    _check_packages(url, keys)
    deadline: Deadline | None = getattr(args, "deadline", None)
    if deadline is not None:
        deadline.where = endpoint_of(url, options)
    try:
        return RemoteStore(url, options, config=config, keys=keys,
                           allow_plaintext=bool(getattr(args, "allow_plaintext", False)))
    except (TypeError, RemoteError) as e:
        raise bad_option(e, url) or e from None


def bad_option(e: BaseException, url: str) -> ConfigError | None:
    """A usage error for a storage option the backend does not take (``-o nosuch=1``: a
    ``TypeError`` when the backend builds its client, at once or at its first call), or None
    for any other error."""
    cause = e if isinstance(e, TypeError) else e.__cause__
    if not isinstance(cause, TypeError) or "keyword argument" not in str(cause):
        return None
    return ConfigError(f"a storage option (-o KEY=VALUE, CKPTSYNC_STORAGE_OPTIONS) is not one "
                       f"that the backend of {redact_url(url)} takes ({cause}); see the "
                       "backend's fsspec documentation for its options")


def endpoint_of(url: str, options: dict[str, Any]) -> str:
    """What a deadline message names: the URL, and the endpoint it goes to where known."""
    endpoint = (options.get("client_kwargs") or {}).get("endpoint_url") \
        or options.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL")
    shown = redact_url(url)
    return f"{shown} (endpoint {redact_url(str(endpoint))})" if endpoint else shown


def allow_empty(args: argparse.Namespace) -> bool:
    """``--allow-empty``, else ``CKPTSYNC_ALLOW_EMPTY`` (1/true/yes)."""
    if getattr(args, "allow_empty", False):
        return True
    return os.environ.get(ALLOW_EMPTY_ENV, "").strip().lower() in ("1", "true", "yes")


def existing_local(path: str, what: str = "LOCAL_DIR") -> LocalStore:
    """The local checkpoint directory ``path``; a missing one is a usage error (exit 2)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ConfigError(f"{what} {p} does not exist (or is not a directory); give the "
                          "directory the trainer saves into")
    return LocalStore(p)


# --------------------------------------------------------------------------- output
def out(args: argparse.Namespace) -> Output:
    """The command's :class:`Output` (made once per command)."""
    o: Output | None = getattr(args, "output", None)
    if o is None:
        o = args.output = Output(args.command, args.json, quiet=getattr(args, "quiet", False))
    return o


class _CommandProgress:
    """The CLI's progress: a tqdm bar on a terminal (labelled "push step 160", not a
    truncated name), bytes counted for the end-of-transfer summary, and each byte moved
    keeping the deadline off."""

    def __init__(self, bar: Progress, deadline: Deadline | None) -> None:
        self.bar = bar
        self.deadline = deadline
        self.bytes = 0

    def start(self, total: int, description: str) -> None:
        self.bar.start(total, label(description))

    def update(self, n: int) -> None:
        self.bytes += n
        if self.deadline is not None and n > 0:
            self.deadline.touch()
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def progress(args: argparse.Namespace) -> _CommandProgress:
    """The command's progress reporter (bars only on a terminal, never with --json or -q)."""
    quiet = args.json or args.no_progress or getattr(args, "quiet", False)
    bar: Progress = NullProgress() if quiet or not sys.stderr.isatty() else TqdmProgress()
    return _CommandProgress(bar, getattr(args, "deadline", None))


_NAME_IN_TEXT = re.compile(r"(?:step-\d+|nostep)-\d{8}T\d+Z-[0-9a-f]+")


def label(text: str) -> str:
    """``text`` with each checkpoint name in it as people say it: ``push step 160``."""
    def say(m: re.Match[str]) -> str:
        parsed = parse_name(m.group(0))
        if parsed is None:
            return m.group(0)
        step, stamp = parsed
        return f"step {step}" if step is not None else f"version {stamp[:15]}"

    return _NAME_IN_TEXT.sub(say, text)


def manifest_summary(m: Manifest) -> dict[str, Any]:
    return {"name": m.name, "step": m.step, "created": m.created, "size": m.total_size,
            "files": len(m.files), "metrics": m.metrics,
            "key_ids": sorted({f.encryption.key_id for f in m.files if f.encryption})}


def rate(size: int, seconds: float) -> str:
    """``1.2 GiB in 12.3 s, 98.1 MB/s``: the end-of-transfer summary's figures."""
    speed = size / seconds / 1e6 if seconds > 0 else 0.0
    return f"{human_size(size)} in {seconds:.1f} s, {speed:.1f} MB/s"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in [header, *rows]]
    return "\n".join(lines)


# --------------------------------------------------------------------------- selection
def add_selection(p: argparse.ArgumentParser, what: str) -> None:
    """``--name NAME`` (a unique prefix is enough) and ``--step N``."""
    p.add_argument("--name", help=f"{what} this checkpoint: its name or a unique prefix of "
                                  "it (e.g. step-000000000160)")
    p.add_argument("--step", type=int, metavar="N",
                   help=f"{what} the checkpoint of step N (the newest one, if several)")


def select(store: Any, name: str | None, step: int | None) -> str | None:
    """The full name that ``name`` (a name or a unique prefix) or ``step`` picks; None when
    neither is given.

    Raises:
        ConfigError: both given, or a prefix that several checkpoints share (exit 2).
        NoCheckpointError: nothing committed matches (exit 1).
    """
    if name is not None and step is not None:
        raise ConfigError("give --name or --step, not both")
    if name is None and step is None:
        return None
    if name is not None and parse_name(name) is not None:
        return name  # a whole name: read as it is (the store says if it is not there)
    committed = store.list()
    if step is not None:
        hits = [m for m in committed if m.step == step]
        if not hits:
            steps = sorted({m.step for m in committed if m.step is not None})
            raise NoCheckpointError(
                f"no committed checkpoint of step {step} in {store.url_of()}; its steps: "
                f"{_few(steps) or 'none'}")
        return max(hits, key=lambda m: m.sort_key()).name
    assert name is not None
    matches = [m.name for m in committed if m.name.startswith(name)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise NoCheckpointError(
            f"no committed checkpoint named {name!r} (or starting with it) in "
            f"{store.url_of()}; `ckptsync ls {store.url_of()}` lists them")
    raise ConfigError(f"{name!r} names {len(matches)} checkpoints in {store.url_of()} "
                      f"({_few(matches)}); give more of the name, or --step N")


def _few(items: list[Any], n: int = 5) -> str:
    shown = ", ".join(map(str, items[:n]))
    return shown + (f" ... ({len(items)} in all)" if len(items) > n else "")


_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> float:
    """``2h`` (s, m, h, d, w; a bare number is seconds) as the epoch time that long ago.

    Raises:
        argparse.ArgumentTypeError: it does not parse (a usage error).
    """
    m = _AGE.match(text)
    if m is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an age such as 30m, 2h or 7d")
    return time.time() - float(m.group(1)) * _UNIT[m.group(2)]
