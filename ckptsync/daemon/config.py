"""The daemon's configuration: :class:`WatchConfig` and where its settings come from.

Per setting: arguments (flags) > ``CKPTSYNC_*`` environment > config file (TOML or JSON) >
defaults; :meth:`WatchConfig.resolve` merges them, :func:`config_from_args` builds the
arguments from the ``watch`` subcommand's flags (``-o KEY=VALUE`` parsed by
:func:`ckptsync.config.parse_storage_option`, the one storage-option parser).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptsync.config import ENV_PREFIX, parse_storage_option, storage_options_from_env
from ckptsync.crypto import KeyRing
from ckptsync.errors import ConfigError
from ckptsync.ownership import check_remote_outside, check_remote_url
from ckptsync.redact import redact_url
from ckptsync.retention import BestRule, RetentionPolicy, parse_best
from ckptsync.zerocode.presets import preset_rule
from ckptsync.zerocode.rules import WatchRule

__all__ = ["WatchConfig", "config_from_args"]

ENV = ENV_PREFIX


@dataclass(frozen=True)
class WatchConfig:
    """Everything the daemon needs; build it with :meth:`resolve`.

    Attributes:
        local_dir: the directory to watch (native checkpoints and zero-code files).
        remote: fsspec URL of the remote root.
        storage_options: passed to fsspec unchanged.
        keep_last, keep_best, keep_every: remote retention (None: keep everything).
        once: reconcile, upload everything, exit.
        interval: seconds between full reconciles.
        settle: seconds a zero-code version's files must stay unchanged (stat) to be taken.
        max_wait: a zero-code file rewritten more often than ``settle`` is still taken at
            least this often, when a complete copy can be made (0: only once quiet).
        rules: zero-code rules (:class:`~ckptsync.zerocode.rules.WatchRule`).
        workers: checkpoints uploaded at once.
        parent_pid: when this process exits, upload what is pending and exit.
        stop_timeout: seconds SIGTERM waits for in-flight uploads before abandoning them.
        log_format: ``"kv"`` (key=value) or ``"json"`` lines on stderr.
        nice: added to the daemon process's CPU niceness at start (0-19; 0 leaves it), so
            that a trainer on the same cores gets the CPU first (Unix only).
        keys: encrypt every upload (``--key-file``, else ``CKPTSYNC_KEY`` /
            ``CKPTSYNC_KEY_FILE``; :mod:`ckptsync.crypto`); None: no encryption.
    """

    local_dir: Path
    remote: str
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    keep_last: int | None = None
    keep_best: BestRule | None = None
    keep_every: int | None = None
    once: bool = False
    interval: float = 5.0
    settle: float = 2.0
    max_wait: float = 60.0
    rules: tuple[WatchRule, ...] = ()
    workers: int = 2
    parent_pid: int | None = None
    stop_timeout: float = 30.0
    log_format: str = "kv"
    nice: int = 0
    keys: KeyRing | None = None

    def __repr__(self) -> str:
        # Storage options hold credentials and a URL may hold a password: show neither.
        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        shown["remote"] = redact_url(self.remote)
        shown["storage_options"] = f"<keys: {', '.join(sorted(self.storage_options)) or '-'}>"
        body = ", ".join(f"{k}={v if k == 'storage_options' else repr(v)}"
                         for k, v in shown.items())
        return f"WatchConfig({body})"

    def __post_init__(self) -> None:
        if self.interval <= 0 or min(self.settle, self.max_wait, self.stop_timeout) < 0:
            raise ConfigError("interval must be > 0; settle, max-wait and stop-timeout >= 0")
        if not 0 <= self.nice <= 19:
            raise ConfigError(f"nice must be between 0 and 19, got {self.nice}")
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        if self.log_format not in ("kv", "json"):
            raise ConfigError(f"log format must be 'kv' or 'json', got {self.log_format!r}")
        check_remote_url(self.remote, "REMOTE_URL (or CKPTSYNC_REMOTE, or 'remote' in the "
                         "config file)")
        check_remote_outside(self.remote, self.local_dir, "REMOTE_URL")

    @property
    def policy(self) -> RetentionPolicy:
        return RetentionPolicy(self.keep_last, self.keep_best, self.keep_every)

    @classmethod
    def resolve(
        cls, args: Mapping[str, Any], env: Mapping[str, str] | None = None
    ) -> WatchConfig:
        """Merge per setting: ``args`` (None = unset) > ``CKPTSYNC_*`` env > config file > defaults.

        The config file is ``args["config"]`` or ``$CKPTSYNC_CONFIG``: TOML (``.toml``) or
        JSON, with the setting names as keys (``remote``, ``storage_options``, ``keep_last``,
        ``keep_best``, ``keep_every``, ``interval``, ``settle``, ``max_wait``, ``rules``,
        ``workers``, ``stop_timeout``, ``log_format``, ``nice``, ``presets``); TOML may nest
        them under ``[watch]``.
        ``presets`` (names from :data:`ckptsync.zerocode.presets.PRESETS`; the environment's
        ``CKPTSYNC_PRESETS`` separated by commas) expand to their rules, added to ``rules``.
        ``storage_options`` are merged key by key with the same precedence.

        Raises:
            ConfigError: an unreadable file, an unknown key, a value that does not parse.
        """
        env = os.environ if env is None else env
        cfg_path = args.get("config") or env.get(ENV + "CONFIG")
        file_vals = _read_config_file(Path(cfg_path)) if cfg_path else {}
        env_vals = _env_values(env)
        arg_vals = {k: v for k, v in args.items() if v is not None and k != "config"}
        for key in ("rules", "presets"):
            if arg_vals.get(key) == []:
                del arg_vals[key]
        merged: dict[str, Any] = {}
        for layer in (file_vals, env_vals, arg_vals):
            for k, v in layer.items():
                if k == "storage_options":
                    merged.setdefault(k, {}).update(v)
                else:
                    merged[k] = v
        if merged.get("keys") is None:
            merged["keys"] = KeyRing.from_env(env)
        presets = merged.pop("presets", None) or []
        if isinstance(presets, str):
            presets = [p for p in re.split(r"[,\s]+", presets) if p]
        if presets:
            rules = list(merged.get("rules", ()))
            merged["rules"] = rules + [r for r in map(preset_rule, presets) if r not in rules]
        if "local_dir" not in merged:
            raise ConfigError("no LOCAL_DIR to watch")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(merged) - known
        if unknown:
            raise ConfigError(f"unknown watch settings {sorted(unknown)}; known: {sorted(known)}")
        try:
            merged["local_dir"] = Path(merged["local_dir"]).expanduser().absolute()
            merged["remote"] = str(merged.get("remote") or "")
            for k in ("keep_last", "keep_every", "workers", "parent_pid", "nice"):
                if merged.get(k) is not None:
                    merged[k] = int(merged[k])
            for k in ("interval", "settle", "max_wait", "stop_timeout"):
                if merged.get(k) is not None:
                    merged[k] = float(merged[k])
            if isinstance(merged.get("keep_best"), str):
                merged["keep_best"] = parse_best(merged["keep_best"])
            merged["rules"] = tuple(r if isinstance(r, WatchRule) else WatchRule.parse(str(r))
                                    for r in merged.get("rules", ()))
            merged["once"] = bool(merged.get("once", False))
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"invalid watch setting: {e}") from e
        return cls(**merged)


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from e
    try:
        if path.suffix == ".toml":
            import tomllib

            data: Any = tomllib.loads(raw.decode())
            data = data.get("watch", data)
        else:
            data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} does not parse: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table/object of settings")
    out = {k.replace("-", "_"): v for k, v in data.items()}
    if "storage_options" in out and not isinstance(out["storage_options"], dict):
        raise ConfigError(f"config file {path}: storage_options must be a table/object")
    return out


def _env_values(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("remote", "keep_last", "keep_best", "keep_every", "interval", "settle",
                "max_wait", "workers", "stop_timeout", "log_format", "nice", "presets"):
        raw = env.get(ENV + key.upper())
        if raw is not None and raw.strip():
            out[key] = raw.strip()
    opts = storage_options_from_env(env)
    if opts:
        out["storage_options"] = opts
    raw = env.get(ENV + "RULES")
    if raw and raw.strip():
        out["rules"] = (json.loads(raw) if raw.lstrip().startswith("[")
                        else [r for r in raw.splitlines() if r.strip()])
    return out


def config_from_args(args: Any, env: Mapping[str, str] | None = None) -> WatchConfig:
    """Build a :class:`WatchConfig` from the ``watch`` subcommand's parsed arguments."""
    opts: dict[str, Any] = {}
    for i, text in enumerate(getattr(args, "storage_option", None) or [], 1):
        k, v = parse_storage_option(text, i)
        opts[k] = v
    return WatchConfig.resolve(
        {
            "local_dir": args.local_dir,
            "remote": args.remote,
            "config": args.config,
            "storage_options": opts or None,
            "keep_last": args.keep_last,
            "keep_best": args.keep_best,
            "keep_every": args.keep_every,
            "once": True if args.once else None,
            "interval": args.interval,
            "settle": args.settle,
            "max_wait": getattr(args, "max_wait", None),
            "rules": list(args.rule or []),
            "presets": list(getattr(args, "preset", None) or []),
            "workers": args.workers,
            "parent_pid": args.parent_pid,
            "stop_timeout": args.stop_timeout,
            "log_format": args.log_format,
            "nice": getattr(args, "nice", None),
            "keys": KeyRing.load(getattr(args, "key_file", None) or []),
        },
        env,
    )
