"""The Lightning writer's file operations go through the crash-order seam, like a save's.

:class:`CkptSyncCheckpointIO` commits each ``.ckpt`` into its spool (a local checkpoint) and
then links it into place over the file Lightning resumes from. Through the plugin's
``file_ops`` seam these tests record that order (the spool commit's durable order, then the
link under a temporary name, the rename over the file, the fsync of its directory), and kill
a save with SIGKILL before and after every one of those operations: the file Lightning
resumes from is then the previous save's or the new one, whole, never half of one, and the
next save into the same directory goes through.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptsync.atomic import TEMP_NAME
from ckptsync.local import STAGING_PREFIX
from tests.support.faults import RecordingOps
from tests.support.helpers import PY, assert_durable_commit_order, assert_tree_equal, child_env
from tests.support.lightning_crash import CKPT, lightning_dict, plugin

pytestmark = pytest.mark.full

pytest.importorskip("lightning.pytorch")


def test_a_lightning_save_commits_its_spool_copy_then_links_it_into_place(
        tmp_path: Path) -> None:
    ops = RecordingOps()
    root = tmp_path / "ckpts"
    io = plugin(root, f"file://{tmp_path / 'remote'}", ops)
    io.save_checkpoint(lightning_dict(3), root / CKPT)
    calls = list(ops.calls)
    io.teardown()

    spool = root / ".ckptsync-lightning"
    rels = assert_durable_commit_order(calls, spool)
    assert rels == [CKPT, "ckptsync.json"]
    ops_only = [op for op, _ in calls]
    link_at, replace_at = ops_only.index("link"), ops_only.index("replace")
    src, tmp = (Path(p) for p in calls[link_at][1].split(" -> "))
    assert src.parent.parent == spool and src.name == CKPT  # the committed spool copy
    match = TEMP_NAME.match(tmp.name)
    assert tmp.parent == root and match is not None and match["name"] == CKPT
    assert calls[replace_at][1] == f"{tmp} -> {root / CKPT}"
    rename_at = ops_only.index("rename")
    assert rename_at < link_at < replace_at, "linked before the spool commit"
    assert calls[-1] == ("fsync_dir", str(root)), "the rename over the file is not fsynced"
    assert_tree_equal(torch.load(root / CKPT, weights_only=True), lightning_dict(3))


@pytest.fixture(scope="module")
def crashes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("lightning-crash")
    subprocess.run([PY, "-m", "tests.support.lightning_crash", str(work)], env=child_env(),
                   check=True, timeout=600)
    result: dict[str, Any] = json.loads((work / "cases.json").read_text())
    result["old"] = torch.load(work / "old.pt", weights_only=True)
    result["new"] = torch.load(work / "new.pt", weights_only=True)
    return result


def test_every_kill_point_of_a_lightning_save_was_exercised(crashes: dict[str, Any]) -> None:
    ops = [op for op, _ in crashes["calls"]]
    # The spool commit (staging mkdir, the file, the manifest, the rename), then the link
    # under a temporary name and the rename over the file Lightning resumes from.
    assert ops[0] == "mkdir" and ops.count("rename") == 1
    assert ops.count("link") == 1 and ops.count("replace") == 1
    assert ops.index("rename") < ops.index("link") < ops.index("replace")
    assert len(crashes["cases"]) == 2 * len(ops)
    not_killed = [c for c in crashes["cases"] if not c["killed"]]
    assert not not_killed, f"children not killed by SIGKILL: {not_killed[:3]}"


def test_a_kill_anywhere_in_a_lightning_save_leaves_the_old_or_the_new_file(
        crashes: dict[str, Any]) -> None:
    ops = [op for op, _ in crashes["calls"]]
    replaced = ops.index("replace")
    for case in crashes["cases"]:
        d = Path(case["dir"])
        where = f"killed {case['when']} call {case['n']} ({case['op']} {case['path']})"
        new = case["n"] > replaced or (case["n"] == replaced and case["when"] == "after")
        # Whole: it loads, and it is exactly one of the two saves.
        got = torch.load(d / CKPT, weights_only=True)
        assert_tree_equal(got, crashes["new" if new else "old"], where)
        visible = sorted(p.name for p in d.iterdir() if not p.name.startswith("."))
        assert visible == [CKPT], f"{where}: {visible}"

        # The next run in this directory saves, and leaves no staging leftover in the spool.
        io = plugin(d, crashes["remote"])
        io.save_checkpoint(lightning_dict(5), d / CKPT)
        assert_tree_equal(torch.load(d / CKPT, weights_only=True), lightning_dict(5), where)
        spool = d / ".ckptsync-lightning"
        assert not [p for p in spool.iterdir() if p.name.startswith(STAGING_PREFIX)], where
        assert io.wait(60) == [], where
        io.teardown()
