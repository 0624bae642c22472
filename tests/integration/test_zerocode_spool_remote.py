"""The spool knows its remote: a daemon restarted on the same directory with
another remote never uploads a version spooled for the previous one without re-examining it.
It pushes it only when its content is still what the rule finds; it takes the trainer's files
again when they changed; it drops it when they are gone. ``ckptsync watch --once``, real
``file://`` remotes."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from ckptsync.local import hash_file
from ckptsync.remote import RemoteStore
from tests.support.watchkit import run_cli

pytestmark = pytest.mark.core

RULE = "file:ckpt.bin"


def _save(out: Path, gen: int) -> None:
    """The trainer's file, written long ago (quiet at once); every byte says its generation."""
    p = out / "ckpt.bin"
    p.write_bytes(bytes([gen]) * 4096)
    old = time.time() - 600 + gen
    os.utime(p, (old, old))


def _once(out: Path, url: str) -> list[dict[str, Any]]:
    done = run_cli("watch", str(out), url, "--once", "--json", "--rule", RULE)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]


def _generations(url: str) -> list[int]:
    """The generation each committed version of ``url`` holds."""
    root = Path(url.removeprefix("file://"))
    return sorted((root / m.name / "ckpt.bin").read_bytes()[0]
                  for m in RemoteStore(url).list())


@pytest.fixture
def spooled_for_a(tmp_path: Path) -> tuple[Path, str, str]:
    """Generation 1 synced to remote A (and kept in the spool); B is another run's remote."""
    out = tmp_path / "run"
    out.mkdir()
    _save(out, 1)
    a, b = f"file://{tmp_path}/remote-a", f"file://{tmp_path}/remote-b"
    _once(out, a)
    assert _generations(a) == [1]
    assert list((out / ".ckptsync-watch" / "spool").glob("nostep-*"))
    return out, a, b


def test_changed_trainer_files_are_taken_again_for_the_new_remote(
        spooled_for_a: tuple[Path, str, str]) -> None:
    out, _, b = spooled_for_a
    _save(out, 2)  # the trainer saved since; the spool still holds generation 1
    events = _once(out, b)
    assert _generations(b) == [2], "a version spooled for remote A was uploaded to B"
    [seen] = [e for e in events if e["event"] == "spool_reexamined"]
    assert seen["action"] == "retake" and "remote-a" in seen["previous_remote"]
    assert "saved since" in seen["why"]


def test_unchanged_spooled_version_is_pushed_to_the_new_remote_saying_why(
        spooled_for_a: tuple[Path, str, str]) -> None:
    out, a, b = spooled_for_a
    events = _once(out, b)
    [seen] = [e for e in events if e["event"] == "spool_reexamined"]
    assert seen["action"] == "push" and "still what the rule finds" in seen["why"]
    [m] = RemoteStore(b).list()
    assert m.name == RemoteStore(a).list()[0].name
    assert [f.digest for f in m.files] == [hash_file(out / "ckpt.bin")[1]]
    # Recorded: the next run to B re-examines nothing.
    assert not [e for e in _once(out, b) if e["event"] == "spool_reexamined"]


def test_a_spooled_version_whose_files_are_gone_is_not_pushed_to_the_new_remote(
        spooled_for_a: tuple[Path, str, str]) -> None:
    out, _, b = spooled_for_a
    (out / "ckpt.bin").unlink()
    events = _once(out, b)
    assert RemoteStore(b).list() == []
    [seen] = [e for e in events if e["event"] == "spool_reexamined"]
    assert seen["action"] == "drop" and seen["level"] == "warning"
    assert "not pushed" in seen["why"]
