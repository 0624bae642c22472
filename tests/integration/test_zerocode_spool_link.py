"""Zero-code spool by hard link: a file renamed into place shares its
inode with the spool (no second copy on disk); a file rewritten in place is still copied; a
trainer rewriting a hard-linked file in place is never committed with bytes that mix versions.

The daemon runs in this process (real inotify on ``tmp_path``, a real ``file://`` remote).
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from ckptsync.daemon import VersionTracker, read_status, snapshot_version
from ckptsync.errors import CorruptCheckpointError
from ckptsync.local import FileOps, LocalStore, hash_file
from ckptsync.remote import RemoteStore
from ckptsync.zerocode import WatchRule, restore_watched
from tests.support.daemon import InProcessDaemon
from tests.support.remotes import Remote
from tests.support.watchkit import wait_for

pytestmark = pytest.mark.core

SIZE = 256 * 1024


def _payload(gen: int) -> bytes:
    """One generation of an opaque checkpoint file: every byte says which one it is."""
    return bytes([gen]) * SIZE


def _rename_in(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _spooled(spool: LocalStore, rel: str) -> list[os.stat_result]:
    return [c.file(rel).stat() for c in spool.list()]


def test_renamed_into_place_version_is_spooled_by_hard_link_not_copied(
        tmp_path: Path, file_remote: Remote, daemons: list[InProcessDaemon]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    d = InProcessDaemon(out, file_remote.url, rules=["file:ckpt.bin"], settle=5.0, interval=30)
    daemons.append(d)
    wait_for(lambda: read_status(out), "the daemon to start")  # its inotify watch is set
    _rename_in(out / "ckpt.bin", _payload(1))
    wait_for(lambda: d.events("version_taken"), "the renamed version (finished at once: no settle)")
    src = (out / "ckpt.bin").stat()
    spooled = _spooled(d.watcher.spool, "ckpt.bin")
    assert [(s.st_ino, s.st_dev) for s in spooled] == [(src.st_ino, src.st_dev)]
    assert src.st_nlink == 2  # one inode on disk, not two copies
    wait_for(lambda: RemoteStore(file_remote.url).list(), "the upload")
    assert d.stop() == 0
    store = RemoteStore(file_remote.url)
    [m] = store.list()
    restore_watched(store, tmp_path / "back", m.name)
    assert (tmp_path / "back" / "ckpt.bin").read_bytes() == _payload(1)


def test_rewritten_in_place_version_is_still_copied(tmp_path: Path) -> None:
    root = tmp_path / "out"
    root.mkdir()
    (root / "ckpt.bin").write_bytes(_payload(1))  # open("wb"): the inode is reused later
    rule = WatchRule.parse("file:ckpt.bin")
    tr = VersionTracker(rule, root, settle=0.0)
    tr.on_event("created", "ckpt.bin", time.monotonic())
    due = tr.due(time.monotonic(), time.time())
    assert due is not None and due.link == frozenset()
    spool = LocalStore(tmp_path / "spool")
    snap = snapshot_version(spool, root, rule, due.rels, link=due.link)
    assert snap.ckpt is not None
    copy = snap.ckpt.file("ckpt.bin").stat()
    assert copy.st_ino != (root / "ckpt.bin").stat().st_ino and copy.st_nlink == 1
    (root / "ckpt.bin").write_bytes(_payload(2))  # the trainer's next save, in place
    assert snap.ckpt.file("ckpt.bin").read_bytes() == _payload(1)


class NoLinks(FileOps):
    """A spool on a file system without hard links (or across devices)."""

    def link(self, src: Path, dst: Path) -> None:
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(dst))


def test_a_refused_link_falls_back_to_a_copy(tmp_path: Path) -> None:
    root = tmp_path / "out"
    root.mkdir()
    _rename_in(root / "ckpt.bin", _payload(3))
    rule = WatchRule.parse("file:ckpt.bin")
    snap = snapshot_version(LocalStore(tmp_path / "spool", NoLinks()), root, rule, ["ckpt.bin"],
                            link=["ckpt.bin"])
    assert snap.ckpt is not None
    assert snap.ckpt.file("ckpt.bin").stat().st_ino != (root / "ckpt.bin").stat().st_ino
    assert snap.ckpt.file("ckpt.bin").read_bytes() == _payload(3)
    assert [(f.size, f.digest) for f in snap.ckpt.manifest.files] == [
        hash_file(root / "ckpt.bin")]


def test_hard_linked_file_rewritten_in_place_before_upload_is_refused(
        tmp_path: Path, file_remote: Remote) -> None:
    root = tmp_path / "out"
    root.mkdir()
    _rename_in(root / "ckpt.bin", _payload(1))
    rule = WatchRule.parse("file:ckpt.bin")
    snap = snapshot_version(LocalStore(tmp_path / "spool"), root, rule, ["ckpt.bin"],
                            link=["ckpt.bin"])
    assert snap.ckpt is not None and snap.ckpt.file("ckpt.bin").stat().st_nlink == 2
    with open(root / "ckpt.bin", "r+b") as f:  # half of the next save, in place
        f.write(_payload(2)[: SIZE // 2])
    store = RemoteStore(file_remote.url)
    with pytest.raises(CorruptCheckpointError, match=r"ckpt\.bin"):
        store.push(snap.ckpt)
    assert store.list() == []


class RewriteAtCommit(FileOps):
    """The trainer rewrites its file in place (the same inode) just as the daemon commits the
    spool version that hard-linked it: after every stat check of the snapshot passed."""

    def __init__(self, path: Path) -> None:
        self.path, self.done = path, False
        self.linked = 0

    def link(self, src: Path, dst: Path) -> None:
        super().link(src, dst)
        self.linked += 1

    def fsync_dir(self, path: Path) -> None:
        if not self.done and path.name.startswith(".staging-"):
            self.done = True
            with open(self.path, "r+b") as f:  # the next save, in place
                f.write(_payload(2))
        super().fsync_dir(path)


def test_in_place_rewrite_racing_a_hard_linked_spool_is_never_committed(
        tmp_path: Path, file_remote: Remote, daemons: list[InProcessDaemon]) -> None:
    """Version 1 is renamed in and hard-linked; the trainer then rewrites the file in place
    with version 2, so the spool's manifest (version 1's digest) no longer matches its bytes.
    That is never committed: the daemon drops the spooled version (not a failure) and
    commits the next one, whole."""
    out = tmp_path / "out"
    out.mkdir()
    ops = RewriteAtCommit(out / "ckpt.bin")
    d = InProcessDaemon(out, file_remote.url, rules=["file:ckpt.bin"], spool_ops=ops, settle=1.0,
                        interval=30)
    daemons.append(d)
    wait_for(lambda: read_status(out), "the daemon to start")
    _rename_in(out / "ckpt.bin", _payload(1))
    wait_for(lambda: d.events("push_dropped"), "the changed spool version to be dropped",
             timeout=20)
    store = RemoteStore(file_remote.url)
    wait_for(lambda: store.list(), "the next version's upload", timeout=20)
    assert d.stop() == 0
    assert ops.linked >= 1
    [dropped] = d.events("push_dropped")
    assert dropped["reason"] == "changed"
    assert not d.events("push_failed")
    for m in store.list():
        back = tmp_path / "back" / m.name
        restore_watched(store, back, m.name)  # verifies every digest
        assert (back / "ckpt.bin").read_bytes() == _payload(2), "mixed bytes committed"
