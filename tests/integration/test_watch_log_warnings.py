"""``ckptsync watch --json`` writes one JSON object per stderr line, Python warnings included:
a library's warning becomes a ``log`` event (its text cut to a bounded length), and watchdog's
benign duplicate-callback warning (a 2 KiB repr of its internals, seen in a CI run of the
zero-code test with 8,000 files) is dropped. The remote is ``warnfile://``
(tests/support/slowfs.py): a local filesystem whose listings issue both warnings for real."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ckptsync.remote import RemoteStore
from tests.support.slowfs import LONG_WARNING
from tests.support.watchkit import make_checkpoints, run_cli

pytestmark = pytest.mark.core


def test_warnings_in_the_daemon_are_bounded_json_events(tmp_path: Path) -> None:
    local, remote = tmp_path / "ckpts", tmp_path / "remote"
    [name] = make_checkpoints(local, [1])
    done = run_cli("watch", str(local), f"warnfile://{remote}", "--create", "--once", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    assert [m.name for m in RemoteStore(f"file://{remote}").list()] == [name]
    lines = done.stderr.splitlines()
    records = [json.loads(line) for line in lines]  # every line: a JSON object
    assert max(len(line) for line in lines) < 2_000
    warned = [r for r in records if r["event"] == "log" and r["logger"] == "py.warnings"]
    assert warned and all(r["level"] == "warning" for r in warned)
    assert all(LONG_WARNING[:100] in r["msg"] and r["msg"].endswith("more characters)")
               for r in warned), warned
    assert "already exists for watch" not in done.stderr
