"""One ``ckptsync`` parser: every subcommand, the daemon's ``watch`` and ``status`` included,
comes from :func:`ckptsync.cli.build_parser`; the daemon has no parser of its own."""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import ckptsync
from ckptsync.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
SUBCOMMANDS = ("push", "pull", "ls", "verify", "gc", "demo", "watch", "status")


def _ckptsync(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ckptsync", *args], capture_output=True,
                          text=True, timeout=120, cwd=REPO, env=dict(os.environ))


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(actions) == 1
    return dict(actions[0].choices)


def test_every_subcommand_is_in_the_top_level_help() -> None:
    r = _ckptsync("--help")
    assert r.returncode == 0, r.stderr
    listed = r.stdout.split("COMMAND", 1)[1]
    for name in SUBCOMMANDS:
        assert f"\n    {name} " in listed or f"\n    {name}\n" in listed, (name, r.stdout)


@pytest.mark.parametrize("name", ["watch", "status"])
def test_daemon_subcommand_help(name: str) -> None:
    r = _ckptsync(name, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: ckptsync {name} ")
    assert "LOCAL_DIR" in r.stdout


def test_build_parser_is_the_only_parser() -> None:
    subs = _subparsers(build_parser())
    assert set(subs) == set(SUBCOMMANDS)
    # Each subcommand runs through the same dispatch (``_run``) of the one parser.
    for name in SUBCOMMANDS:
        assert callable(subs[name].get_default("_run")), name
    # The daemon's second parser (``watch_cli.main``) is gone, and so are the old modules.
    # (An editable install of another checkout may still map an old name to its own copy:
    # only this package's directory counts.)
    pkg = Path(ckptsync.__file__).parent
    for old in ("watch_cli", "zerocode", "launcher", "contentstep"):
        spec = importlib.util.find_spec(f"ckptsync.{old}")
        assert spec is None or Path(str(spec.origin)).parent != pkg, old
        assert not (pkg / f"{old}.py").exists(), old
    import ckptsync.daemon.cli as daemon_cli

    assert not hasattr(daemon_cli, "main")


def test_watch_arguments_parse_through_the_one_parser(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        ["watch", str(tmp_path), "file:///elsewhere", "--once", "--rule", "file:ckpt.pt",
         "-o", "anon=true"])
    assert args.command == "watch" and args.once and args.rule == ["file:ckpt.pt"]
    assert args.storage_option == ["anon=true"]
    args = build_parser().parse_args(["status", str(tmp_path), "--json"])
    assert args.command == "status" and args.json
