"""The order of a local commit's file operations, not only its outcome.

A SIGKILL does not lose what the page cache holds, so the kill tests
(test_crash_consistency.py) pass even without a single fsync; a power cut would not. These
tests record every file operation of a real save and of a real pull through
:class:`helpers.RecordingOps` and check the durable order of DESIGN.md's local commit: each
file fsynced after its last write, the manifest last and fsynced, the staging directory
fsynced, the rename, the parent fsynced. Deleting any one fsync call from ckptsync/local.py
makes them fail.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ckptsync import Checkpointer
from ckptsync.local import LocalStore
from ckptsync.manifest import MANIFEST_NAME
from ckptsync.remote import RemoteStore
from tests.support.helpers import RecordingOps, assert_durable_commit_order, crash_state

pytestmark = pytest.mark.core


def test_a_save_fsyncs_each_file_then_the_manifest_then_the_directory_then_renames(
        tmp_path: Path) -> None:
    ops = RecordingOps()
    with Checkpointer(tmp_path / "ckpts", file_ops=ops) as ck:
        ck.save(1, **crash_state()).wait()
        first = len(ops.calls)
        ck.save(2, **crash_state()).wait()
    for calls in (ops.calls[:first], ops.calls[first:]):
        rels = assert_durable_commit_order(calls, (tmp_path / "ckpts").absolute())
        assert {"model.pt", "table.pt"} <= set(rels) and rels[-1] == MANIFEST_NAME


def test_a_pull_commits_locally_in_the_same_durable_order(tmp_path: Path) -> None:
    with Checkpointer(tmp_path / "a") as ck:
        ck.save(3, **crash_state()).wait()
        (saved,) = ck.store.list()
    remote = RemoteStore(f"file://{tmp_path / 'remote'}")
    remote.push(saved)
    ops = RecordingOps()
    got = remote.pull(None, LocalStore(tmp_path / "b", ops=ops))
    rels = assert_durable_commit_order(ops.calls, (tmp_path / "b").absolute())
    assert sorted(rels) == sorted([*(f.path for f in saved.manifest.files), MANIFEST_NAME])
    for f in saved.manifest.files:
        assert got.file(f.path).read_bytes() == saved.file(f.path).read_bytes()
    assert torch.load(got.file("model.pt"), weights_only=True).keys()


def test_the_real_file_ops_do_call_fsync() -> None:
    """The recorded calls above reach the kernel: fsync of a pipe and of a /proc directory
    fail with EINVAL, so an ``os.fsync`` removed from FileOps shows here."""
    import errno
    import os

    import pytest

    from ckptsync.local import FileOps

    r, w = os.pipe()
    try:
        with pytest.raises(OSError) as e:
            FileOps().fsync(r)
        assert e.value.errno == errno.EINVAL
    finally:
        os.close(r)
        os.close(w)
    with pytest.raises(OSError) as e:
        FileOps().fsync_dir(Path("/proc"))
    assert e.value.errno == errno.EINVAL
