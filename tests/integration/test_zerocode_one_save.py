"""A zero-code version is one save.

A trainer renames ``a.pth``, ``b.pth``, ``c.pth`` into place 0.4 s apart every 2.5 s under
``watch --rule 'file:*.pth'``: every committed version's files come from one save (each
file's bytes say which save wrote it). Real files, real inotify, a real ``file://`` remote;
the daemon runs on a thread of this process.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ckptsync.daemon import VersionTracker, read_status
from ckptsync.hashing import hash_file
from ckptsync.remote import RemoteStore
from ckptsync.zerocode import WatchRule, restore_watched
from tests.support.daemon import InProcessDaemon
from tests.support.remotes import Remote
from tests.support.watchkit import wait_for

pytestmark = [pytest.mark.full, pytest.mark.serial]

FILES = ("a.pth", "b.pth", "c.pth")
GAP_S, PERIOD_S = 0.4, 2.5


def _opaque(path: Path, save: int) -> None:
    path.write_bytes(json.dumps({"save": save}).encode() + b"\n" + bytes([save % 256]) * 8192)


def _torch(path: Path, save: int) -> None:
    torch.save({"step": save, "w": torch.full((2048,), float(save))}, path)


def _save_of(path: Path, fmt: str) -> int:
    if fmt == "opaque":
        return int(json.loads(path.read_bytes().split(b"\n", 1)[0])["save"])
    state = torch.load(path, weights_only=True)
    assert torch.equal(state["w"], torch.full((2048,), float(state["step"])))
    return int(state["step"])


class Trainer:
    """Renames the three files of save N into place, ``GAP_S`` apart, every ``PERIOD_S``."""

    def __init__(self, out: Path, write: Callable[[Path, int], None]) -> None:
        self.out, self.write = out, write
        self.saves = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="test-trainer")

    def _run(self) -> None:
        while not self.stop.is_set():
            self.saves += 1
            t0 = time.monotonic()
            for i, name in enumerate(FILES):
                tmp = self.out / f".{name}.tmp"
                self.write(tmp, self.saves)
                os.replace(tmp, self.out / name)
                if i < len(FILES) - 1:
                    time.sleep(GAP_S)
            self.stop.wait(max(0.0, PERIOD_S - (time.monotonic() - t0)))

    def __enter__(self) -> Trainer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def _newest_digests(url: str) -> dict[str, str]:
    versions = RemoteStore(url).list()
    return {f.path: f.digest for f in versions[-1].files} if versions else {}


def _committed_saves(url: str, dest: Path, fmt: str) -> list[tuple[int | None, dict[str, int]]]:
    """Per committed version: its step label and ``{path: the save that wrote it}``."""
    store = RemoteStore(url)
    out = []
    for m in store.list():
        restore_watched(store, dest / m.name, m.name)
        out.append((m.step, {f.path: _save_of(dest / m.name / f.path, fmt) for f in m.files}))
    return out


@pytest.mark.parametrize(("fmt", "settle"), [("opaque", 1.0), ("opaque", 2.0), ("torch", 2.0)],
                         ids=["opaque-quiet-points", "opaque-never-quiet", "step-in-content"])
def test_every_committed_version_of_a_renamed_set_is_one_save(
        fmt: str, settle: float, tmp_path: Path, file_remote: Remote,
        daemons: list[InProcessDaemon]) -> None:
    """``settle`` 1 s: the set is quiet for 1.7 s between saves, each version is taken there.
    2 s (the default): it is never quiet while the trainer runs; opaque files are held (and
    ``status`` says why) until it stops; files that name their step are taken at once."""
    out = tmp_path / "out"
    out.mkdir()
    d = InProcessDaemon(out, file_remote.url, rules=["file:*.pth"], settle=settle, interval=30)
    daemons.append(d)
    wait_for(lambda: read_status(out), "the daemon to start")
    reasons: list[str] = []
    with Trainer(out, _opaque if fmt == "opaque" else _torch) as trainer:
        deadline = time.monotonic() + 5 * PERIOD_S
        while time.monotonic() < deadline:
            st = read_status(out) or {}
            reasons += [w["reason"] for w in st.get("watch", []) if w.get("reason")]
            time.sleep(0.1)
        during = len(d.events("version_taken"))
    final = {name: hash_file(out / name)[1] for name in FILES}
    wait_for(lambda: _newest_digests(file_remote.url) == final, "the last save uploaded",
             timeout=30, poll=0.2)
    assert d.stop() == 0
    versions = _committed_saves(file_remote.url, tmp_path / "back", fmt)
    assert versions, d.events()[-20:]
    for step, saves in versions:
        assert len(set(saves.values())) == 1, f"a version mixing saves: {versions}"
        if fmt == "torch":
            assert step == next(iter(saves.values())), versions
    newest = versions[-1][1]
    assert sorted(newest) == list(FILES) and set(newest.values()) == {trainer.saves}, versions
    if settle == 1.0 or fmt == "torch":
        assert during >= 3, f"only {during} versions while the trainer ran"
    else:  # never quiet, nothing says which save a file is from: held, and said so
        assert during == 0
        assert any("names no step" in r for r in reasons), reasons


def _gen(root: Path, step: int, names: tuple[str, ...] = FILES) -> None:
    for name in names:
        _torch(root / name, step)


def test_a_set_is_taken_at_once_only_when_every_file_names_the_same_step(tmp_path: Path) -> None:
    """The tracker alone: a set whose files all changed and name one step is due at once;
    one whose files name two steps, or where one file did not change, is held with the
    reason, and taken once quiet."""
    root = tmp_path / "out"
    root.mkdir()
    _gen(root, 1)
    tr = VersionTracker(WatchRule.parse("file:*.pth"), root, settle=30.0)
    now, wall = time.monotonic(), time.time() + 1  # files written "now", not quiet
    due = tr.due(now, wall)
    assert due is not None and due.rels == list(FILES)
    tr.taken = dict(due.sigs)
    _torch(root / "a.pth", 2)  # save 2 has begun: a.pth new, b and c still save 1
    assert tr.due(now + 1, wall + 1) is None
    assert "a.pth changed since the last version but b.pth did not" in str(tr.reason)
    _torch(root / "b.pth", 2)
    _torch(root / "c.pth", 3)  # (a trainer writing two saves at once)
    assert tr.due(now + 2, wall + 2) is None
    assert "files of different saves" in str(tr.reason) and "step 3" in str(tr.reason)
    _torch(root / "c.pth", 2)
    due = tr.due(now + 3, wall + 3)
    assert due is not None and due.rels == list(FILES)
    tr.taken = dict(due.sigs)
    _torch(root / "a.pth", 3)  # then quiet for the settle time: taken whole, as it is
    assert tr.due(now + 4, wall + 4) is None
    assert tr.due(now + 40, wall + 40) is not None
