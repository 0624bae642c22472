"""The ``watch`` and ``status`` subcommands (argparse definitions and their run functions),
and ``wait`` (defined in :mod:`ckptsync.daemon.wait`).

The one ``ckptsync`` parser (:func:`ckptsync.cli.build_parser`) adds them with one call::

    from ckptsync.daemon.cli import add_subcommands
    add_subcommands(subparsers)        # each subparser sets func= (and _run=) to its runner

Each runner takes the parsed ``argparse.Namespace`` and returns the exit code.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ckptsync.daemon.config import config_from_args
from ckptsync.daemon.exporter import serving
from ckptsync.daemon.metrics import Hooks, Monitor, lag, read_monitor
from ckptsync.daemon.process import run_daemon
from ckptsync.daemon.runtime import EXIT_CONFIG, daemon_status, read_status
from ckptsync.daemon.statusview import STATUS_USAGE, follow, outcome
from ckptsync.daemon.wait import add_subcommand as add_wait
from ckptsync.errors import ConfigError
from ckptsync.exits import exit_help
from ckptsync.output import EventLog, Output
from ckptsync.redact import redact_url
from ckptsync.zerocode.presets import PRESETS, preset_rule

__all__ = ["add_subcommands", "format_status", "pinned_rules", "run_status", "run_watch"]

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

for operators: --metrics-port N serves Prometheus metrics on /metrics and a health check on
/healthz (200 while the daemon runs and its status is fresh, else 503); --on-failure CMD and
--on-lag N CMD run `sh -c CMD` with the event as one JSON object on stdin.

"""

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
    """Add ``watch``, ``status`` and ``wait`` to an ``argparse`` subparsers object;
    ``parents`` hold the flags every command takes (:func:`ckptsync.cli.common_parser`:
    ``--json``, ``-o``, ``-v``, ``--no-progress``)."""
    w = subparsers.add_parser("watch", help=WATCH_HELP, description=WATCH_HELP,
                              epilog=WATCH_EPILOG + exit_help("watch"), parents=list(parents),
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
    w.add_argument("--create", action="store_true",
                   help="create LOCAL_DIR if it does not exist (without it, a missing "
                        "directory is refused: a typo must not look like an idle trainer)")
    w.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus metrics (/metrics) and a health check (/healthz) "
                        "on this port")
    w.add_argument("--metrics-addr", default="127.0.0.1", metavar="ADDR",
                   help="the address --metrics-port binds (default 127.0.0.1; 0.0.0.0 for a "
                        "probe from outside the pod or VM)")
    w.add_argument("--on-failure", metavar="CMD",
                   help="run `sh -c CMD` when a checkpoint's upload fails (once per failing "
                        "checkpoint), the event as JSON on stdin")
    w.add_argument("--on-lag", nargs=2, metavar=("N", "CMD"),
                   help="run `sh -c CMD` when N or more local checkpoints are not committed "
                        "remotely (once, until the lag falls below N), the event as JSON on "
                        "stdin")
    w.add_argument("--nice", type=int, metavar="N",
                   help="lower the daemon's CPU priority by N (0-19) so training gets the CPU "
                        "first (default 0)")
    w.set_defaults(func=run_watch, _run=run_watch)

    s = subparsers.add_parser("status", help=STATUS_HELP, description=STATUS_HELP,
                              parents=list(parents), epilog=exit_help("status"),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("local_dir", metavar="LOCAL_DIR", help="the watched directory")
    if not any(a.dest == "json" for a in s._actions):
        s.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    s.add_argument("--follow", "-f", action="store_true",
                   help="redraw one screen every second: lag (checkpoints, steps, seconds), "
                        "uploads in flight with their MB/s, the last error, the next retry "
                        "(Ctrl-C ends it)")
    s.set_defaults(func=run_status, _run=run_status)

    add_wait(subparsers, parents)  # self-contained: ckptsync/daemon/wait.py


def run_watch(args: argparse.Namespace) -> int:
    """Run the daemon in the foreground (the ``watch`` subcommand)."""
    if getattr(args, "json", False) and args.log_format is None:
        args.log_format = "json"  # a streaming command: one JSON object per line
    if (getattr(args, "verbose", 0) or 0) >= 2:  # -vv: the daemon's own debug records too
        logging.getLogger("ckptsync").setLevel(logging.DEBUG)
    out = _output(args, "watch")
    try:
        config = config_from_args(args)
        hooks = _hooks(args)
        local = Path(args.local_dir).expanduser()
        if not local.is_dir() and not getattr(args, "create", False):
            raise ConfigError(f"LOCAL_DIR {local} does not exist; give the directory the "
                              "trainer saves into, or --create to make it (a typo must not "
                              "look like a trainer that has saved nothing yet)")
    except ConfigError as e:
        out.diagnostic(f"ckptsync watch: error: {e}")
        return EXIT_CONFIG
    events = EventLog(fmt=config.log_format, quiet=bool(getattr(args, "quiet", False)))
    monitor = Monitor(config.local_dir, hooks, interval=config.interval)
    events.listen(monitor.on_event)
    try:
        with monitor.running(), serving(monitor, args.metrics_addr, args.metrics_port):
            return run_daemon(config, events=events)
    except ConfigError as e:  # the metrics port is taken
        out.diagnostic(f"ckptsync watch: error: {e}")
        return EXIT_CONFIG


def _hooks(args: argparse.Namespace) -> Hooks:
    lag_n: int | None = None
    on_lag: str | None = None
    if args.on_lag:
        raw, on_lag = args.on_lag
        try:
            lag_n = int(raw)
        except ValueError:
            raise ConfigError(f"--on-lag N CMD: N must be a whole number of checkpoints, got "
                              f"{raw!r}") from None
        if lag_n < 1:
            raise ConfigError(f"--on-lag N CMD: N must be >= 1, got {lag_n}")
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        raise ConfigError(f"--metrics-port must be a port number, got {args.metrics_port}")
    return Hooks(on_failure=args.on_failure, on_lag=on_lag, lag_threshold=lag_n)


def run_status(args: argparse.Namespace) -> int:
    """Print the daemon status of a directory; exit 0 in sync, 1 pending, 3 the last attempt
    failed, 2 a missing directory or one no daemon ever ran in
    (:func:`~ckptsync.daemon.statusview.outcome`)."""
    out = _output(args, "status")
    local = Path(args.local_dir).expanduser()
    if not local.is_dir():
        out.diagnostic(f"ckptsync status: error: {local} does not exist (or is not a "
                       "directory); give the directory `ckptsync watch` watches")
        return STATUS_USAGE
    if getattr(args, "follow", False):
        return follow(local)
    st = daemon_status(local)
    st["monitor"] = read_monitor(local)
    st["lag"] = lag(st)
    code = outcome(st)
    st["exit_code"] = code
    out.document(st, format_status(st), indent=1, sort_keys=True)
    if code == STATUS_USAGE:
        out.diagnostic(f"ckptsync status: no ckptsync watch has run in {st['local_dir']} "
                       f"(exit {code}): is it the directory the daemon watches?")
    return code


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
    mount = st.get("remote_mount")
    lines = [
        f"directory: {st['local_dir']}",
        f"remote:    {st.get('remote')}",
        *([f"note:      {mount['note']}; {mount['advice']}"] if isinstance(mount, dict) else []),
        f"daemon:    {running}",
        f"last reconcile: {st.get('last_reconcile') or 'never'}",
        *([f"lag:     {st['lag']['checkpoints']} checkpoints, {st['lag']['steps']} steps, "
           f"{st['lag']['seconds']:.0f} s"] if isinstance(st.get("lag"), dict) else []),
        *[f"uploading: {u['name']} ({u['sent']:,} of {u['total']:,} bytes, "
          f"{u['mb_s']:.1f} MB/s)" for u in (st.get("monitor") or {}).get("uploading") or []],
        f"synced:  {len(st['synced'])}" + (f" (newest {st['synced'][-1]})" if st["synced"] else "")
        + " committed remotely" + (" (handed to the mount: see the note)" if mount else ""),
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
    lines.append("in sync: every local checkpoint is committed remotely"
                 + (" (handed to the mount)" if mount else "") if st.get("in_sync")
                 else "NOT in sync: checkpoints are pending, uploading, settling, waiting for "
                 "other nodes or failed"
                 if st["pending"] or st.get("settling") or st["failed"] or st.get("uploading")
                 or st.get("waiting_for_nodes")
                 else "in sync: not known yet (no reconcile reported)")
    return "\n".join(lines)


def pinned_rules(rules: Sequence[str], presets: Sequence[str],
                 target_dir: str | os.PathLike[str], remote_url: str,
                 env: Mapping[str, str] | None = None) -> tuple[list[str], str]:
    """The watch rules a zero-code pull into ``target_dir`` may restore, and where they come
    from (``"flags"``, ``"environment"``, ``"watch"``, or ``""`` for none): ``rules`` and the
    rules of ``presets`` (``--rule``, ``--preset``), else ``CKPTSYNC_RULES`` (a JSON list, or
    one per line) and ``CKPTSYNC_PRESETS`` (comma-separated), as ``watch`` reads them, else
    the rules a ``ckptsync watch`` of ``target_dir`` recorded for this remote. Never the
    bucket's: the rule decides which files under the target are written.

    Raises:
        ConfigError: an unknown preset.
    """
    flags = list(rules) + [preset_rule(p) for p in presets]
    if flags:
        return flags, "flags"
    env = os.environ if env is None else env
    raw = (env.get("CKPTSYNC_RULES") or "").strip()
    listed = (json.loads(raw) if raw.startswith("[") else raw.splitlines()) if raw else []
    named = [p for p in (env.get("CKPTSYNC_PRESETS") or "").replace(",", " ").split() if p]
    from_env = [str(r).strip() for r in listed if str(r).strip()] + list(map(preset_rule, named))
    if from_env:
        return from_env, "environment"
    status = read_status(target_dir) or {}
    if status.get("remote") == redact_url(remote_url):
        watched = [w.get("rule") for w in status.get("watch") or [] if isinstance(w, dict)]
        return [r for r in watched if isinstance(r, str)], "watch"
    return [], ""
