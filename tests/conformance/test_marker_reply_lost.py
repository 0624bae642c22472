"""The first push of a run writes the root marker with a create-only write; when that write
takes effect but its reply is lost, the retry meets the marker it wrote itself. That outcome is
ambiguous and is resolved by reading the remote (DESIGN.md, "The daemon"): the marker names the
fresh run id this push chose, so it is this run's, and the push goes on, instead of refusing
the local directory as a second run in the prefix (as ``ckptsync watch`` did through a flaky
link). Written once against ``store_remote``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from ckptsync.local import LocalStore
from ckptsync.ownership import ROOT_MARKER, RunFile
from tests.support.faults import FaultFS
from tests.support.stores import make_local, make_store

pytestmark = pytest.mark.core


def test_a_marker_write_whose_reply_is_lost_is_this_runs_own(store_remote: Any,
                                                             tmp_path: Path) -> None:
    if make_store(store_remote).backend.commit == "rename":
        pytest.skip("a directory's marker is linked into place on this machine, not written "
                    "through the filesystem: its outcome is never ambiguous")
    fs = FaultFS(store_remote.fs())
    fs.drop_reply_on("pipe_file", suffix=ROOT_MARKER)
    local = LocalStore(tmp_path / "ckpts")
    store = make_store(store_remote, fs=fs)
    store.bind_run(local.directory)  # as a Checkpointer or `ckptsync watch` of it does

    pushed = store.push(make_local(local, 1, {"model.pt": os.urandom(2000)}))

    assert fs.count("pipe_file", ROOT_MARKER) >= 2  # written, reply lost, written again
    marker = make_store(store_remote).read_marker()
    assert marker is not None and marker.run is not None
    assert RunFile(local.directory).read() == marker.run == pushed.run
    assert [m.name for m in make_store(store_remote).list()] == [pushed.name]
