"""Zero-code mode: a trainer that only calls ``torch.save`` (tests/support/scripts/zc_trainer.py) is
killed in the middle of a write; the remote holds only complete versions, and after
``restore_watched`` into an empty directory the trainer's own ``--resume`` continues from the
newest one. One test per way of writing a checkpoint (rename, in place, directory + marker).
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from ckptsync import start_watcher  # the public name, as a notebook imports it
from ckptsync.daemon import snapshot_version
from ckptsync.errors import ConfigError
from ckptsync.local import LocalStore
from ckptsync.ownership import RUN_FILE
from ckptsync.remote import RemoteStore
from ckptsync.zerocode import WatchRule, check_complete, restore_watched
from tests.support.formats import put_tree, rewrite_as_v1
from tests.support.jsonlines import events, summary
from tests.support.remotes import Remote
from tests.support.watchkit import PY, SCRIPTS, child_env, wait_for

TRAINER = SCRIPTS / "zc_trainer.py"
RULES = {"rename": "file:ckpt.pt", "inplace": "file:ckpt.pt", "dirs": "dir:checkpoint-*:DONE"}


# conftest: no child outlives a test
pytestmark = [pytest.mark.usefixtures("no_process_leak"), pytest.mark.core]


def _trainer(out: Path, mode: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([PY, str(TRAINER), "--out", str(out), "--mode", mode, *args],
                            env=child_env(), stdout=subprocess.PIPE, text=True)


@pytest.mark.parametrize("mode", ["rename", pytest.param("inplace", marks=pytest.mark.full),
                                  pytest.param("dirs", marks=pytest.mark.full)])
def test_trainer_killed_mid_write_remote_holds_only_complete_versions_and_resumes(
        tmp_path: Path, s3_remote: Remote, mode: str) -> None:
    out = tmp_path / "run"
    out.mkdir()
    w = start_watcher(out, s3_remote.url, storage_options=s3_remote.storage_options,
                      rules=[RULES[mode]], settle=0.3, interval=1,
                      log_path=tmp_path / "daemon.log")
    try:
        trainer = _trainer(out, mode, "--steps", "50", "--slow", "0.03", "--pause", "1.0")
        assert trainer.stdout is not None
        saved = 0
        for line in trainer.stdout:
            if line.startswith("saved"):
                saved = int(line.split()[1])
            if line.startswith("writing") and int(line.split()[1]) == 4:
                break
        torn = out / {"rename": "ckpt.pt.tmp", "inplace": "ckpt.pt",
                      "dirs": "checkpoint-0004/model.pt"}[mode]
        # Kill only once step 4's file is visibly half-written.
        wait_for(lambda: torn.exists() and check_complete(torn) is not None,
                 "the write to start", proc=trainer)
        trainer.send_signal(signal.SIGKILL)  # in the middle of writing step 4
        trainer.wait()
        trainer.stdout.close()
        assert saved == 3
        w.flush(timeout=60)
    finally:
        assert w.stop() == 0
    log = (tmp_path / "daemon.log").read_text()
    if mode == "inplace":
        # The file on disk is a torn step 4: it was seen, found incomplete and not committed.
        assert check_complete(out / "ckpt.pt") is not None
        assert "reason=incomplete" in log

    store = RemoteStore(s3_remote.url, s3_remote.storage_options)
    versions = [m for m in store.list() if m.source.get("kind") == "watched"]
    assert versions, log
    steps = []
    for m in versions:
        store.verify(m.name, full=True)
        got = store.pull(m.name, LocalStore(tmp_path / "check"))
        assert m.source["rule"] == RULES[mode]
        for f in m.files:
            if f.path.endswith(".pt"):
                state = torch.load(got.file(f.path), weights_only=True)  # complete, loadable
                steps.append(int(state["step"]))
                if mode == "dirs":
                    assert m.step == state["step"]  # read from model.pt, not the name
    assert steps == sorted(set(steps)) and steps[-1] <= 3  # no duplicate, nothing torn
    if mode != "inplace":
        assert steps[-1] == 3  # the last complete version is never lost
    assert len(steps) == len({tuple(sorted(f.digest for f in m.files)) for m in versions})

    # A fresh machine: restore the newest version at its original paths, resume with the
    # trainer's own flag.
    fresh = tmp_path / "fresh"
    restored = restore_watched(store, fresh)
    assert [m.name for m in restored] == [versions[-1].name]
    # No temp dir left; the run it continues is recorded (a watch of it is the same run).
    assert [p.name for p in fresh.iterdir() if p.name.startswith(".")] == [RUN_FILE]
    done = subprocess.run([PY, str(TRAINER), "--out", str(fresh), "--mode", mode, "--resume",
                           "--steps", str(steps[-1] + 1)], env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"resumed {steps[-1]}" in done.stdout and f"saved {steps[-1] + 1}" in done.stdout


def test_rewrite_with_identical_content_is_not_committed_again(
        tmp_path: Path, file_remote: Remote) -> None:
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"step": 1, "w": torch.arange(10)}, out / "weights_1.pt")
    w = start_watcher(out, file_remote.url, rules=["file:weights_*.pt;step=weights_(\\d+)"],
                      settle=0.2, interval=1)
    try:
        w.flush(timeout=60)
        data = (out / "weights_1.pt").read_bytes()
        (out / "weights_1.pt").write_bytes(data)  # rewritten, same bytes
        w.flush(timeout=60)
    finally:
        assert w.stop() == 0
    listed = RemoteStore(file_remote.url).list()
    assert len(listed) == 1 and listed[0].step == 1
    assert listed[0].source["paths"] == ["weights_1.pt"]


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_a_v1_watched_checkpoint_pulls_back_to_its_path(
        kind: str, tmp_path: Path, file_remote: Remote, s3_remote: Remote) -> None:
    """``ckptsync pull`` puts a zero-code version that ``ckptsync/1`` wrote
    (sha256 entries) back at its original path, verified."""
    remote = file_remote if kind == "file" else s3_remote
    out = tmp_path / "run"
    (out / "sub").mkdir(parents=True)
    torch.save({"step": 4, "w": torch.arange(10.0)}, out / "sub" / "weights_4.pt")
    rule = WatchRule.parse("file:sub/weights_*.pt;step=weights_(\\d+)")
    snap = snapshot_version(LocalStore(tmp_path / "spool"), out, rule, ["sub/weights_4.pt"])
    ckpt = snap.ckpt
    assert ckpt is not None
    rewrite_as_v1(ckpt.path)
    put_tree(remote.fs(), ckpt.path, f"{remote.path}/{ckpt.name}")
    fresh = tmp_path / "fresh"
    env = child_env(CKPTSYNC_STORAGE_OPTIONS=json.dumps(remote.storage_options))
    p = subprocess.run([PY, "-m", "ckptsync.cli", "pull", remote.url, str(fresh), "--json",
                        "--rule", rule.spec],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert [(e["event"], e["name"], e["paths"]) for e in events(p.stdout)] == [
        ("restored", ckpt.name, ["sub/weights_4.pt"])]
    assert summary(p.stdout)["fell_back"] is False and summary(p.stdout)["exit_code"] == 0
    restored = fresh / "sub" / "weights_4.pt"
    assert restored.read_bytes() == (out / "sub" / "weights_4.pt").read_bytes()
    assert torch.equal(torch.load(restored, weights_only=True)["w"], torch.arange(10.0))


def test_rules_parse_and_torn_files_are_detected(tmp_path: Path) -> None:
    r = WatchRule.parse("dir:runs/ckpt-*:DONE;step=ckpt-(\\d+)")
    assert r.kind == "dir" and r.version_dir("runs/ckpt-12/a/b.pt") == "runs/ckpt-12"
    assert r.step_of("runs/ckpt-12") == 12
    assert WatchRule.parse("file:last.pt;step=none").step_of("last7.pt") is None
    for bad in ("nope:x", "dir:only-glob", "file:../escape.pt", "file:a.pt;color=red"):
        with pytest.raises(ConfigError):
            WatchRule.parse(bad)
    good = tmp_path / "good.pt"
    torch.save({"w": torch.randn(1000)}, good)
    assert check_complete(good) is None
    torn = tmp_path / "torn.pt"
    torn.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert check_complete(torn) is not None
    (tmp_path / "empty.pt").write_bytes(b"")
    assert check_complete(tmp_path / "empty.pt") == "empty file"
