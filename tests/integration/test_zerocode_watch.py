"""Zero-code mode never stalls, starves or stops silently.

The daemon runs in this process (a :class:`Watcher` on a thread, real inotify on ``tmp_path``,
a real ``file://`` remote), so that a test can pass a spool fault seam and read its events.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import pytest
import torch

from ckptsync.daemon import (
    VersionTracker,
    WatchConfig,
    read_status,
    snapshot_version,
)
from ckptsync.local import FileOps, LocalStore
from ckptsync.remote import RemoteStore
from ckptsync.zerocode import WatchRule, check_complete, restore_watched
from ckptsync.zerocode.contentstep import pickle_step
from tests.support.daemon import InProcessDaemon
from tests.support.remotes import Remote
from tests.support.watchkit import wait_for

pytestmark = pytest.mark.core


def _taken(d: InProcessDaemon) -> list[dict[str, Any]]:
    return d.events("version_taken")


def _tiny_torch(path: Path, **top: Any) -> None:
    torch.save({"model": {"w": torch.arange(8.0)}, **top}, path)


# --------------------------------------------------------------------------- item 1
def test_dir_version_whose_early_file_saw_no_close_event_is_taken(tmp_path: Path) -> None:
    """The tracker alone: ``created`` without ``closed`` (inotify missed it in a new dir)."""
    out = tmp_path / "out"
    (out / "checkpoint-1").mkdir(parents=True)
    (out / "checkpoint-1" / "config.json").write_text("{}")
    tr = VersionTracker(WatchRule.parse("dir:checkpoint-*:DONE"), out, 0.2)
    t0 = time.monotonic()
    tr.on_event("created", "checkpoint-1", t0, True)
    tr.on_event("created", "checkpoint-1/config.json", t0)  # never "closed"
    time.sleep(0.3)
    (out / "checkpoint-1" / "DONE").write_text("")
    tr.on_event("created", "checkpoint-1/DONE", time.monotonic())
    tr.on_event("closed", "checkpoint-1/DONE", time.monotonic())
    deadline = time.monotonic() + 3
    while tr.due(time.monotonic(), time.time()) is None:
        assert time.monotonic() < deadline, "a finished directory stayed 'settling'"
        time.sleep(0.05)


def test_dir_written_at_once_with_marker_later_is_uploaded(
        tmp_path: Path, file_remote: Remote, daemons: list[InProcessDaemon]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    d = InProcessDaemon(out, file_remote.url, rules=["dir:checkpoint-*:DONE"], settle=0.5,
                        interval=30)
    daemons.append(d)
    wait_for(lambda: read_status(out), "the daemon to start")
    for step in (1, 2, 3):
        v = out / f"checkpoint-{step}"
        v.mkdir()
        (v / "config.json").write_text(json.dumps({"step": step}))
        time.sleep(0.3)
        (v / "DONE").write_text("")
        wait_for(lambda s=step: any(e["paths"][0].startswith(f"checkpoint-{s}/")
                                    for e in _taken(d)),
                 f"checkpoint-{step} to be taken", timeout=5)
    assert d.stop() == 0
    assert len(RemoteStore(file_remote.url).list()) == 3
    st = read_status(out)
    assert st is not None and [w["pending"] for w in st["watch"]] == [False]


# --------------------------------------------------------------------------- item 2
def test_file_rewritten_faster_than_settle_is_taken_within_max_wait_never_torn(
        tmp_path: Path, file_remote: Remote, daemons: list[InProcessDaemon]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    stop = threading.Event()
    written: list[int] = []

    def trainer() -> None:  # nanoGPT: torch.save(checkpoint, "ckpt.pt") every 0.2 s
        i = 0
        while not stop.is_set():
            i += 1
            torch.save({"model": {"w": torch.full((20_000,), float(i))}, "iter_num": i},
                       out / "ckpt.pt")
            written.append(i)
            time.sleep(0.2)

    writer = threading.Thread(target=trainer)
    writer.start()
    try:
        d = InProcessDaemon(out, file_remote.url, rules=["file:ckpt.pt"], settle=1.0, max_wait=1.0,
                            interval=30)
        daemons.append(d)
        wait_for(lambda: len(_taken(d)) >= 2, "two versions while the trainer keeps writing",
                 timeout=8)
        assert not stop.is_set() and writer.is_alive()
        assert d.events("version_forced")  # never quiet: taken because of --max-wait
        wait_for(lambda: d.watcher.pushes.idle() and d.events("pushed"), "an upload")
    finally:
        stop.set()
        writer.join()
    assert d.stop() == 0
    store = RemoteStore(file_remote.url)
    versions = store.list()
    assert versions
    for m in versions:  # every committed version is a whole torch.save, labelled by iter_num
        restored = restore_watched(store, tmp_path / "back" / m.name, m.name)
        state = torch.load(tmp_path / "back" / m.name / "ckpt.pt", weights_only=True)
        assert [r.name for r in restored] == [m.name]
        assert m.step == state["iter_num"]
        assert torch.equal(state["model"]["w"], torch.full((20_000,), float(m.step)))


def test_max_wait_is_a_setting(tmp_path: Path) -> None:
    base = {"local_dir": tmp_path, "remote": "file:///tmp/elsewhere/r"}
    assert WatchConfig.resolve(base, env={}).max_wait == 60.0
    assert WatchConfig.resolve(base, env={"CKPTSYNC_MAX_WAIT": "7"}).max_wait == 7.0
    assert WatchConfig.resolve({**base, "max_wait": 3}, env={"CKPTSYNC_MAX_WAIT": "7"}) \
        .max_wait == 3.0


def _safetensors(n: int) -> bytes:
    header = json.dumps({"__metadata__": {"format": "pt"},
                         "w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}})
    raw = header.encode()
    return len(raw).to_bytes(8, "little") + raw + bytes(4 * n)


def test_safetensors_structure_is_checked(tmp_path: Path) -> None:
    whole = tmp_path / "model.safetensors"
    whole.write_bytes(_safetensors(1000))
    assert check_complete(whole) is None
    torn = tmp_path / "torn.safetensors"
    torn.write_bytes(_safetensors(1000)[:-100])
    assert "announced by its header" in str(check_complete(torn))
    lying = tmp_path / "lying.safetensors"  # a header length of 2**60: refused, not read
    lying.write_bytes((2**60).to_bytes(8, "little") + b"{}")
    assert "does not fit" in str(check_complete(lying))


# --------------------------------------------------------------------------- item 4
def _snap_step(tmp_path: Path, root: Path, rule: str, rels: list[str]) -> int | None:
    snap = snapshot_version(LocalStore(tmp_path / "spool"), root, WatchRule.parse(rule), rels)
    assert snap.ckpt is not None, snap
    assert snap.ckpt.manifest.step == snap.ckpt.step
    return snap.ckpt.step


def test_step_comes_from_content_not_from_an_integer_in_the_name(tmp_path: Path) -> None:
    root = tmp_path / "out"
    root.mkdir()
    # nanoGPT: ckpt.pt with iter_num, and the optimizer's own nested "step" keys before it.
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))])
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    torch.save({"model": {"w": torch.ones(3)}, "optimizer": opt.state_dict(),
                "iter_num": 250, "best_val_loss": 1.5}, root / "ckpt.pt")
    assert _snap_step(tmp_path, root, "file:ckpt.pt", ["ckpt.pt"]) == 250
    # MiniMind: pretrain_64.pth, 64 is the hidden size; no step in the content.
    torch.save({"w": torch.ones(64)}, root / "pretrain_64.pth")
    assert _snap_step(tmp_path, root, "file:pretrain_*.pth", ["pretrain_64.pth"]) is None
    assert _snap_step(tmp_path, root, "file:pretrain_*.pth;step=name",
                      ["pretrain_64.pth"]) == 64
    # Only a top-level int counts: a nested step, a bool, a float epoch do not.
    torch.save({"model": {"step": 9}, "flag": True, "epoch": 2.5}, root / "nested.pt")
    assert _snap_step(tmp_path, root, "file:nested.pt", ["nested.pt"]) is None
    torch.save({"epoch": 3, "w": torch.ones(1)}, root / "ep.pt")
    assert _snap_step(tmp_path, root, "file:ep.pt", ["ep.pt"]) == 3
    torch.save([{"step": 5}], root / "list.pt")  # not a dict at the top
    assert _snap_step(tmp_path, root, "file:list.pt", ["list.pt"]) is None
    with zipfile.ZipFile(root / "ckpt.pt") as z:
        pkl = next(n for n in z.namelist() if n.endswith("/data.pkl"))
        assert pickle_step(z.read(pkl)) == 250
        assert pickle_step(z.read(pkl)[:-40]) is None  # a damaged pickle: no step, no error
    # Hugging Face: checkpoint-500/trainer_state.json says global_step.
    hf = root / "checkpoint-500"
    hf.mkdir()
    (hf / "trainer_state.json").write_text(json.dumps({"global_step": 480, "epoch": 1.2}))
    torch.save({"w": torch.ones(2)}, hf / "optimizer.pt")
    (hf / "DONE").write_text("")
    rels = sorted(f"checkpoint-500/{p.name}" for p in hf.iterdir())
    assert _snap_step(tmp_path, root, "dir:checkpoint-*:DONE", rels) == 480
    assert _snap_step(tmp_path, root, "dir:checkpoint-*:DONE;step=name", rels) == 500
    assert _snap_step(tmp_path, root, "dir:checkpoint-*:DONE;step=checkpoint-(\\d+)",
                      rels) == 500
    assert _snap_step(tmp_path, root, "dir:checkpoint-*:DONE;step=none", rels) is None


# --------------------------------------------------------------------------- item 6
class FullSpool(FileOps):
    """The spool's disk is full: every file create fails with ENOSPC."""

    def open_write(self, path: Path) -> BinaryIO:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_full_disk_once_backs_off_reports_and_exits_non_zero(
        tmp_path: Path, file_remote: Remote) -> None:
    out = tmp_path / "out"
    out.mkdir()
    _tiny_torch(out / "ckpt.pt", iter_num=1)
    cpu0, t0 = time.process_time(), time.monotonic()
    d = InProcessDaemon(out, file_remote.url, rules=["file:ckpt.pt"], spool_ops=FullSpool(),
                        settle=0.0, once=True, interval=30)
    d.thread.join(30)
    assert not d.thread.is_alive(), "--once never exited on a full disk"
    cpu, wall = time.process_time() - cpu0, time.monotonic() - t0
    assert d.code == 1
    errors = d.events("version_error")
    assert 1 <= len(errors) <= 4, len(errors)  # one per back-off, not one per loop
    assert "No space left" in errors[0]["error"] and "free disk space" in errors[0]["error"]
    assert cpu < 0.5 * wall + 0.5, (cpu, wall)
    assert RemoteStore(file_remote.url).list() == []


def test_full_disk_daemon_does_not_spin_and_says_so_in_status(
        tmp_path: Path, file_remote: Remote) -> None:
    out = tmp_path / "out"
    out.mkdir()
    _tiny_torch(out / "ckpt.pt", iter_num=1)
    d = InProcessDaemon(out, file_remote.url, rules=["file:ckpt.pt"], spool_ops=FullSpool(),
                        settle=0.0, interval=30)
    try:
        wait_for(lambda: d.events("version_error"), "the first error")
        cpu0 = time.process_time()
        time.sleep(2.0)
        cpu = time.process_time() - cpu0
        errors = d.events("version_error")
        assert len(errors) <= 3, len(errors)
        assert cpu < 0.5, cpu
        st = read_status(out)
        assert st is not None
        assert "No space left" in st["watch"][0]["error"]
    finally:
        assert d.stop() == 0


# --------------------------------------------------------------------------- item 7
def test_no_rule_and_only_trainer_files_warns_in_log_and_status(
        tmp_path: Path, file_remote: Remote) -> None:
    out = tmp_path / "out"
    out.mkdir()
    _tiny_torch(out / "ckpt.pt")
    d = InProcessDaemon(out, file_remote.url, rules=[], interval=30)
    try:
        wait_for(lambda: d.events("no_rule"), "a warning")
        warning = d.events("no_rule")
        assert len(warning) == 1 and warning[0]["level"] == "warning"
        assert "--rule" in warning[0]["hint"] and "ckpt.pt" in warning[0]["hint"]
        st = read_status(out)
        assert st is not None and any("--rule" in w for w in st["warnings"])
    finally:
        assert d.stop() == 0


def test_finished_versions_present_at_start_up_are_taken_at_once(
        tmp_path: Path, file_remote: Remote) -> None:
    out = tmp_path / "out"
    out.mkdir()
    _tiny_torch(out / "ckpt.pt", iter_num=7)  # a complete torch.save, just written
    (out / "notes.bin").write_bytes(b"opaque")
    old = time.time() - 60
    os.utime(out / "notes.bin", (old, old))  # quiet for a minute
    (out / "checkpoint-3").mkdir()
    (out / "checkpoint-3" / "w.bin").write_bytes(b"w")
    (out / "checkpoint-3" / "DONE").write_text("")
    t0 = time.monotonic()
    d = InProcessDaemon(out, file_remote.url,
                        rules=["file:ckpt.pt", "file:notes.bin", "dir:checkpoint-*:DONE"],
                        settle=5.0, interval=30)
    try:
        wait_for(lambda: len(_taken(d)) == 3, "the three versions", timeout=10)
        assert time.monotonic() - t0 < 2.5
    finally:
        assert d.stop() == 0


# --------------------------------------------------------------------------- item 3
def _gen_file(path: Path, gen: int, *, rename: bool) -> None:
    """One file of a multi-file save, carrying its generation (a MiniMind-like trainer)."""
    data = json.dumps({"gen": gen}).encode() + b"x" * 4096
    if rename:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    else:
        path.write_bytes(data)


def _generations(store: RemoteStore, dest: Path) -> list[dict[str, int]]:
    """For each committed version: ``{path: generation}`` of the files it restores."""
    out: list[dict[str, int]] = []
    for m in store.list():
        restore_watched(store, dest / m.name, m.name)
        out.append({f.path: json.loads((dest / m.name / f.path).read_bytes()[:20]
                                       .split(b"}")[0] + b"}")["gen"] for f in m.files})
    return out


@pytest.mark.parametrize("rename", [True, False], ids=["rename", "in-place"])
def test_multi_file_rule_commits_only_whole_generations(
        rename: bool, tmp_path: Path, file_remote: Remote, daemons: list[InProcessDaemon]) -> None:
    """Two files of ``file:*.pth`` written 0.5 s apart (settle longer than the gap): every
    version holds both files of one save, never one old and one new."""
    out = tmp_path / "out"
    out.mkdir()
    _gen_file(out / "pretrain_512.pth", 0, rename=rename)
    _gen_file(out / "pretrain_512_moe.pth", 0, rename=rename)
    d = InProcessDaemon(out, file_remote.url, rules=["file:*.pth"], settle=1.0, max_wait=0,
                        interval=30)
    daemons.append(d)
    wait_for(lambda: len(_taken(d)) == 1, "generation 0")
    for gen in (1, 2, 3):
        _gen_file(out / "pretrain_512.pth", gen, rename=rename)
        time.sleep(0.5)
        _gen_file(out / "pretrain_512_moe.pth", gen, rename=rename)
        wait_for(lambda g=gen: len(_taken(d)) >= g + 1, f"generation {gen}", timeout=8)
    wait_for(lambda: d.watcher.pushes.idle() and len(RemoteStore(file_remote.url).list()) >= 4,
             "the uploads", timeout=15)
    assert d.stop() == 0
    gens = _generations(RemoteStore(file_remote.url), tmp_path / "back")
    for g in gens:
        assert len(g) == 2 and len(set(g.values())) == 1, gens
    assert sorted(next(iter(g.values())) for g in gens) == [0, 1, 2, 3]


class Meddle(FileOps):
    """The trainer acts while the spool copies the set: ``action`` runs when the copy of the
    file named ``when`` begins (the files before it are copied already)."""

    def __init__(self, when: str, action: Any) -> None:
        self.when, self.action = when, action

    def open_write(self, path: Path) -> BinaryIO:
        if path.name == self.when:
            self.action()
        return super().open_write(path)


def _two_files(root: Path) -> list[str]:
    root.mkdir()
    _gen_file(root / "a.pth", 1, rename=False)
    _gen_file(root / "b.pth", 1, rename=False)
    return ["a.pth", "b.pth"]


@pytest.mark.parametrize("meddle", ["rewrite", "rotate", "add"])
def test_a_set_changed_during_its_copy_is_never_committed(meddle: str, tmp_path: Path) -> None:
    """``a.pth`` is copied, then (while ``b.pth`` is copied) the trainer rewrites ``a.pth``,
    deletes it (rotation), or adds ``c.pth``: the set copied was never on disk at one time as
    a whole, so nothing is committed, the attempt is no failure, and the next one commits."""
    root = tmp_path / "out"
    rels = _two_files(root)
    actions = {
        "rewrite": lambda: _gen_file(root / "a.pth", 2, rename=False),
        "rotate": lambda: os.unlink(root / "a.pth"),
        "add": lambda: _gen_file(root / "c.pth", 2, rename=False),
    }
    spool = LocalStore(tmp_path / "spool", Meddle("b.pth", actions[meddle]))
    rule = WatchRule.parse("file:*.pth")
    tr = VersionTracker(rule, root, settle=0.0)
    due = tr.due(time.monotonic(), time.time())
    assert due is not None and due.rels == rels
    tr.begin(due, time.monotonic())
    snap = snapshot_version(spool, root, rule, due.rels)
    tr.record(snap, due.rels, due.guard)
    assert snap.ckpt is None and snap.skipped in ("changed", "missing"), snap
    assert spool.list() == [] and tr.failures == 0 and tr.error is None
    again = tr.due(time.monotonic(), time.time())
    assert again is not None and again.rels == rule.current_files(root)
    snap = snapshot_version(LocalStore(tmp_path / "spool"), root, rule, again.rels)
    assert snap.ckpt is not None and [f.path for f in snap.ckpt.manifest.files] == again.rels
