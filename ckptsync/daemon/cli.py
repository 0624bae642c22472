"""The ``watch`` and ``status`` subcommands (argparse definitions and their run functions).

The one ``ckptsync`` parser (:func:`ckptsync.cli.build_parser`) adds them with one call::

    from ckptsync.daemon.cli import add_subcommands
    add_subcommands(subparsers)        # each subparser sets func= (and _run=) to its runner

Each runner takes the parsed ``argparse.Namespace`` and returns the exit code.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import Any

from ckptsync.daemon.config import config_from_args
from ckptsync.daemon.process import run_daemon
from ckptsync.daemon.runtime import EXIT_CONFIG, daemon_status
from ckptsync.errors import ConfigError
from ckptsync.output import Output
from ckptsync.zerocode.presets import PRESETS

__all__ = ["add_subcommands", "format_status", "run_status", "run_watch"]

WATCH_HELP = "watch a checkpoint directory and sync every finished checkpoint to a remote"
STATUS_HELP = "show what a watch daemon synced, has pending or failed (running or stopped)"

WATCH_EPILOG = """\
settings: flags > CKPTSYNC_* environment (CKPTSYNC_REMOTE, CKPTSYNC_STORAGE_OPTIONS as JSON,
CKPTSYNC_KEEP_LAST, CKPTSYNC_KEEP_BEST, CKPTSYNC_KEEP_EVERY, CKPTSYNC_INTERVAL,
CKPTSYNC_SETTLE, CKPTSYNC_MAX_WAIT, CKPTSYNC_RULES one per line, CKPTSYNC_PRESETS
comma-separated, CKPTSYNC_WORKERS,
CKPTSYNC_STOP_TIMEOUT, CKPTSYNC_LOG_FORMAT, CKPTSYNC_CONFIG) > config file (TOML or JSON)
> defaults.

zero-code rules (trainers that only call torch.save):
  --rule 'file:ckpt.pt'            a fixed file, renamed into place or rewritten in place
  --rule 'dir:checkpoint-*:DONE'   a directory per checkpoint, finished when DONE is written
  options after ';': step=content (default: trainer_state.json's global_step, a torch.save
  dict's step/iter_num/global_step/epoch, else none), step=name (the name's first integer),
  step=REGEX (its first group), step=none

presets (--preset NAME, repeatable, combinable with --rule; LOCAL_DIR is the directory
named below):
{presets}

once running, the daemon never exits on an error: failed uploads are reported (log and
`ckptsync status`) and retried with back-off while the rest keeps syncing.

exit codes: 0 done or stopped by SIGTERM/SIGINT; 1 --once left failed checkpoints (or a
crash); 2 bad configuration or another daemon watches the directory (at start-up: do not
restart); 3 permanent remote error at start-up (bad credentials, no such bucket); 130 --once
stopped by SIGTERM/SIGINT before everything was committed (run it again)."""

_PRESET_DIRS = {
    "hf-trainer": "TrainingArguments(output_dir=LOCAL_DIR)",
    "accelerate": "ProjectConfiguration(project_dir=LOCAL_DIR, automatic naming)",
    "lightning": "the Trainer's default_root_dir (or ModelCheckpoint's dirpath)",
    "dcp": "dcp.save(state, checkpoint_id=LOCAL_DIR/<one dir per step>)",
}
WATCH_EPILOG = WATCH_EPILOG.format(presets="\n".join(
    f"  --preset {name:<11} = --rule '{rule}'\n{'':16}LOCAL_DIR: {_PRESET_DIRS.get(name, '')}"
    for name, rule in PRESETS.items()))


def add_subcommands(subparsers: Any,
                    parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Add ``watch`` and ``status`` to an ``argparse`` subparsers object; ``parents`` hold
    the flags every command takes (:func:`ckptsync.cli.common_parser`: ``--json``, ``-o``,
    ``-v``, ``--no-progress``)."""
    w = subparsers.add_parser("watch", help=WATCH_HELP, description=WATCH_HELP,
                              epilog=WATCH_EPILOG, parents=list(parents),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    w.add_argument("local_dir", metavar="LOCAL_DIR", help="directory the trainer writes to")
    w.add_argument("remote", metavar="REMOTE_URL", nargs="?", default=None,
                   help="fsspec URL (s3://bucket/run, gs://..., gdrive://..., file:///...)")
    if not any(a.dest == "storage_option" for a in w._actions):  # called without parents
        w.add_argument("-o", "--storage-option", action="append", default=[],
                       metavar="KEY=VALUE",
                       help="fsspec storage option (VALUE parsed as JSON when it parses)")
    if not any(a.dest == "key_file" for a in w._actions):
        w.add_argument("--key-file", action="append", default=[], metavar="FILE",
                       help="encryption key file; repeatable (the first encrypts)")
    w.add_argument("--keep-last", type=int, help="remote retention: keep the last N")
    w.add_argument("--keep-best", metavar="METRIC:min|max:K",
                   help="remote retention: keep the best K by a metric")
    w.add_argument("--keep-every", type=int, metavar="M",
                   help="remote retention: keep every Mth step")
    w.add_argument("--once", action="store_true",
                   help="sync what is there now, then exit (0 when everything is committed)")
    w.add_argument("--interval", type=float, metavar="SECONDS",
                   help="seconds between full reconciles (default 5)")
    w.add_argument("--settle", type=float, metavar="SECONDS",
                   help="zero-code: seconds a version's files must stay unchanged (default 2)")
    w.add_argument("--max-wait", type=float, metavar="SECONDS",
                   help="zero-code: a file rewritten more often than --settle is still taken "
                        "at least this often, when a complete copy can be made (default 60; "
                        "0: only once quiet)")
    w.add_argument("--rule", action="append", default=[], metavar="RULE",
                   help="zero-code watch rule (repeatable), see below")
    w.add_argument("--preset", action="append", default=[], metavar="NAME",
                   help="zero-code rule of a framework's own checkpoints (repeatable): "
                        + ", ".join(PRESETS) + "; see below")
    w.add_argument("--config", metavar="FILE", help="config file (TOML or JSON)")
    w.add_argument("--workers", type=int, help="checkpoints uploaded at once (default 2)")
    w.add_argument("--stop-timeout", type=float, metavar="SECONDS",
                   help="on SIGTERM, wait this long for in-flight uploads (default 30)")
    w.add_argument("--parent-pid", type=int, metavar="PID",
                   help="when PID exits, upload what is pending and exit")
    w.add_argument("--log-format", choices=("kv", "json"),
                   help="log line format on stderr (default kv; --json: json)")
    w.add_argument("--nice", type=int, metavar="N",
                   help="lower the daemon's CPU priority by N (0-19) so training gets the CPU "
                        "first (default 0)")
    w.set_defaults(func=run_watch, _run=run_watch)

    s = subparsers.add_parser("status", help=STATUS_HELP, description=STATUS_HELP,
                              parents=list(parents))
    s.add_argument("local_dir", metavar="LOCAL_DIR", help="the watched directory")
    if not any(a.dest == "json" for a in s._actions):
        s.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    s.set_defaults(func=run_status, _run=run_status)


def run_watch(args: argparse.Namespace) -> int:
    """Run the daemon in the foreground (the ``watch`` subcommand)."""
    if getattr(args, "json", False) and args.log_format is None:
        args.log_format = "json"  # a streaming command: one JSON object per line
    if (getattr(args, "verbose", 0) or 0) >= 2:  # -vv: the daemon's own debug records too
        logging.getLogger("ckptsync").setLevel(logging.DEBUG)
    try:
        config = config_from_args(args)
    except ConfigError as e:
        _output(args, "watch").diagnostic(f"ckptsync watch: error: {e}")
        return EXIT_CONFIG
    return run_daemon(config)


def run_status(args: argparse.Namespace) -> int:
    """Print the daemon status of a directory; exit 0 (1 when checkpoints failed, or the
    daemon stopped with an error)."""
    st = daemon_status(args.local_dir)
    _output(args, "status").document(st, format_status(st), indent=1, sort_keys=True)
    return 1 if st.get("failed") or st.get("error") else 0


def _output(args: argparse.Namespace, command: str) -> Output:
    """The command's output (``ckptsync.cli.main`` made it), else a new one."""
    out = getattr(args, "output", None)
    return out if isinstance(out, Output) else Output(command, bool(getattr(args, "json", False)))


def format_status(st: dict[str, Any]) -> str:
    """Human-readable status text."""
    if "state" not in st:
        return f"{st['local_dir']}: no ckptsync watch daemon has run here"
    running = f"running (pid {st.get('pid')})" if st["running"] else \
        f"not running (last state: {st.get('state')}, pid was {st.get('pid')})"
    lines = [
        f"directory: {st['local_dir']}",
        f"remote:    {st.get('remote')}",
        f"daemon:    {running}",
        f"last reconcile: {st.get('last_reconcile') or 'never'}",
        f"synced:  {len(st['synced'])}" + (f" (newest {st['synced'][-1]})" if st["synced"] else "")
        + " committed remotely",
        f"pending: {len(st['pending']) + len(st.get('settling', []))}"
        + "".join(f"\n  {n}" + (" (uploading)" if n in st.get("uploading", []) else "")
                  for n in st["pending"])
        + "".join(f"\n  a version of rule {r} (being written, settling or copied)"
                  for r in st.get("settling", [])),
        f"failed:  {len(st['failed'])}" + "".join(
            f"\n  {f['name']} ({f['attempts']} attempts): {f['error']}" for f in st["failed"]),
    ]
    waiting = st.get("waiting_for_nodes") or {}
    if waiting:  # multi-node parts: this node's is up, the checkpoint is not committed
        lines.append(f"waiting for other nodes: {len(waiting)}" + "".join(
            f"\n  {n}: part uploaded, waiting for nodes {nodes} (not restorable until then)"
            if nodes else f"\n  {n}: every node's part is uploaded, its commit is under way"
            for n, nodes in waiting.items()))
    for w in st.get("watch", []):
        state = f"error: {w['error']}" if w.get("error") else \
            (f"settling: {w['reason']}" if w.get("reason") else "writing/settling") \
            if w["pending"] else "idle"
        lines.append(f"rule {w['rule']}: {state}")
    lines += [f"warning: {w}" for w in st.get("warnings", [])]
    if st.get("error"):
        lines.append(f"error: {st['error']}")
    elif st.get("last_error") and not st.get("in_sync"):
        lines.append(f"last error: {st['last_error']}")
    # "In sync" only on the daemon's own word that nothing at all is outstanding.
    lines.append("in sync: every local checkpoint is committed remotely" if st.get("in_sync")
                 else "NOT in sync: checkpoints are pending, uploading, settling, waiting for "
                 "other nodes or failed"
                 if st["pending"] or st.get("settling") or st["failed"] or st.get("uploading")
                 or st.get("waiting_for_nodes")
                 else "in sync: not known yet (no reconcile reported)")
    return "\n".join(lines)

