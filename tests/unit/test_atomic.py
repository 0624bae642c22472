"""The one seam for temporary names, atomic renames and directory fsyncs (ckptsync/atomic.py).

A file placed whole is written under a temporary name of the one scheme, fsynced, renamed
over its final name, and its directory fsynced, every step through the ``FileOps`` a test
injects; a failure at any step leaves the previous file and no temporary one.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from ckptsync.atomic import TEMP_NAME, TempFile, link_into_place, temp_name, write_atomic
from ckptsync.local import write_json_atomic
from tests.support.faults import RecordingOps
from tests.support.helpers import fail_at

pytestmark = pytest.mark.core


def test_temp_names_are_hidden_unique_and_recognisable() -> None:
    names = {temp_name("model.pt", "part") for _ in range(100)}
    assert len(names) == 100
    for n in names:
        m = TEMP_NAME.match(n)
        assert n.startswith(".") and m is not None
        assert (m["name"], m["kind"]) == ("model.pt", "part")
    # gc tells a stale upload temporary ("part:") from a small write's ("temp:") by its kind.
    m = TEMP_NAME.match(temp_name("ckptsync.json"))
    assert m is not None and m["kind"] == "tmp"
    with pytest.raises(ValueError, match="kind"):
        temp_name("x", "partial")


def test_write_atomic_fsyncs_the_file_then_renames_then_fsyncs_the_directory(
        tmp_path: Path) -> None:
    final = tmp_path / "state.json"
    final.write_bytes(b"old")
    ops = RecordingOps()
    write_atomic(final, b"new", ops)
    assert final.read_bytes() == b"new"
    assert [op for op, _ in ops.calls] == ["open_write", "write", "fsync", "replace",
                                           "fsync_dir"]
    tmp = Path(ops.calls[0][1])
    assert tmp.parent == tmp_path and TEMP_NAME.match(tmp.name)
    assert ops.calls[3][1] == f"{tmp} -> {final}" and ops.calls[4][1] == str(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


@pytest.mark.parametrize("op", ["open_write", "write", "fsync", "replace"])
def test_a_failure_before_the_rename_keeps_the_old_file_and_no_temporary(
        tmp_path: Path, op: str) -> None:
    final = tmp_path / "resumed.json"
    write_json_atomic(final, {"name": "old"})
    ops = fail_at(0, lambda: OSError(errno.ENOSPC, "No space left on device"), ops=[op])
    with pytest.raises(OSError, match="No space"):
        write_json_atomic(final, {"name": "new"}, ops)
    assert final.read_text() == '{\n "name": "old"\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resumed.json"]


class NoLinks(RecordingOps):
    """A file system without hard links (another device, a FUSE mount)."""

    def link(self, src: Path, dst: Path) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")


@pytest.mark.parametrize("links", [True, False])
def test_link_into_place_replaces_the_file_whole_by_link_or_by_fsynced_copy(
        tmp_path: Path, links: bool) -> None:
    src = tmp_path / "spool" / "last.ckpt"
    src.parent.mkdir()
    src.write_bytes(b"x" * 10_000_000)
    dest = tmp_path / "ckpts" / "last.ckpt"
    ops = RecordingOps() if links else NoLinks()
    link_into_place(src, dest, ops)
    link_into_place(src, dest, ops)  # over an existing file too
    assert dest.read_bytes() == src.read_bytes()
    assert (dest.stat().st_ino == src.stat().st_ino) is links
    assert sorted(p.name for p in dest.parent.iterdir()) == ["last.ckpt"]
    ops_only = [op for op, _ in ops.calls]
    if not links:  # the copy's data is on disk before the rename makes it the file
        assert ops_only.index("fsync") < ops_only.index("replace")
    assert ops_only[-2:] == ["replace", "fsync_dir"]


def test_temp_file_aborted_leaves_the_final_file_alone(tmp_path: Path) -> None:
    final = tmp_path / "a.bin"
    final.write_bytes(b"keep")
    with pytest.raises(KeyboardInterrupt), TempFile(final) as t:
        t.write(b"half")
        raise KeyboardInterrupt
    assert final.read_bytes() == b"keep" and sorted(tmp_path.iterdir()) == [final]
