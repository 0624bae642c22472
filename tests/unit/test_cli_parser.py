"""One ``ckptsync`` parser: every subcommand, the daemon's ``watch``, ``status`` and ``wait``
included, comes from :func:`ckptsync.cli.build_parser`; the daemon has no parser of its own."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
from pathlib import Path

import pytest

import ckptsync
from ckptsync.cli import build_parser
from tests.support.cli import run_cli

pytestmark = pytest.mark.core

REPO = Path(__file__).resolve().parents[2]
SUBCOMMANDS = ("push", "pull", "ls", "verify", "gc", "demo", "watch", "status", "wait")


def _ckptsync(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args)


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


@pytest.mark.parametrize("name", ["watch", "status", "wait"])
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


#: The smallest positional arguments of each subcommand.
POSITIONALS = {"push": ["ckpts", "file:///r"], "pull": ["file:///r", "out"], "ls": ["file:///r"],
               "verify": ["file:///r"], "gc": ["file:///r"], "demo": [],
               "watch": ["ckpts", "file:///r"], "status": ["ckpts"], "wait": ["ckpts"]}


def _readme_common_flags() -> list[str]:
    """The flags the README's command-line section says every command takes."""
    text = (REPO / "README.md").read_text()
    start = text.index("Every command, `watch` and `status` included, takes")
    sentence = text[start:text.index("\n\n", start)].split("`push`, `pull`", 1)[0]
    sentence = re.sub(r"\([^)]*\)", "", sentence)  # what a flag does, not a flag promised
    return sorted({m.split()[0].split("/")[0].split("=")[0]
                   for m in re.findall(r"`(-[^`]*)`", sentence)})


def test_readme_promises_the_common_flags() -> None:
    assert _readme_common_flags() == ["--json", "--no-progress", "-o", "-q", "-v", "-vv"]
    assert set(POSITIONALS) == set(SUBCOMMANDS)


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_readme_common_flag_parses_on_every_subcommand(name: str) -> None:
    parser = build_parser()
    args = parser.parse_args([name, *POSITIONALS[name], "--json", "-o", "anon=true", "-vv",
                              "--no-progress"])
    assert args.command == name
    assert args.json and args.no_progress and args.verbose == 2
    assert args.storage_option == ["anon=true"]
    for flag in _readme_common_flags():
        extra = ["k=v"] if flag == "-o" else []
        parser.parse_args([name, *POSITIONALS[name], flag, *extra])


@pytest.mark.parametrize("name", ["push", "gc"])
def test_dry_run_parses(name: str) -> None:
    assert build_parser().parse_args([name, *POSITIONALS[name], "--dry-run"]).dry_run


def test_status_takes_the_common_flags_when_run(tmp_path: Path) -> None:
    r = _ckptsync("status", str(tmp_path), "-v", "-o", "anon=true", "--no-progress", "--json")
    assert r.returncode == 2, r.stderr  # no daemon has run there
    assert "state" not in json.loads(r.stdout)  # no daemon ran there
