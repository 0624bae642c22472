"""Crash consistency: SIGKILL at every file operation of a save never leaves a half checkpoint.

A driver subprocess forks one child per kill point; the child saves through a
:class:`ckptsync.local.FileOps` subclass that SIGKILLs it just before or just after the Nth
call (every call of one save: each file's open, writes and fsync, the manifest, the staging
directory's fsync, the rename, the parent's fsync). Then a fresh ``Checkpointer`` on what the
child left behind must list only complete checkpoints, clean the leftovers, and restore the
newest complete one.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptsync import Checkpointer
from ckptsync.local import LocalStore
from ckptsync.manifest import MANIFEST_NAME
from tests.support.helpers import (
    PY,
    assert_tree_equal,
    child_env,
    crash_state,
    staging_dirs,
    state_trees,
)
from tests.support.paths import SUPPORT

pytestmark = pytest.mark.full


@pytest.fixture(scope="module", params=["after-a-complete-checkpoint", "first-save"])
def crashes(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    work = tmp_path_factory.mktemp(f"crash-{request.param}")
    with_previous = "1" if request.param == "after-a-complete-checkpoint" else "0"
    subprocess.run([PY, str(SUPPORT / "helpers.py"), "crash-driver", str(work / "base"), str(work),
                    with_previous], env=child_env(), check=True, timeout=240)
    result = json.loads((work / "cases.json").read_text())
    result["with_previous"] = with_previous == "1"
    result["refs"] = {1: torch.load(work / "ref1.pt", weights_only=True),
                      2: torch.load(work / "ref2.pt", weights_only=True)}
    return result


def test_every_kill_point_was_exercised(crashes: dict[str, Any]) -> None:
    ops = [op for op, _ in crashes["calls"]]
    # One save: a staging mkdir, files (open, writes, fsync), the manifest, the rename.
    assert ops[0] == "mkdir" and ops.count("rename") == 1
    assert ops.count("open_write") >= 3  # model.pt, table.pt, rng.pt, ckptsync.json
    manifest_open = [i for i, (op, p) in enumerate(crashes["calls"])
                     if op == "open_write" and p.endswith(MANIFEST_NAME)]
    assert len(manifest_open) == 1 and manifest_open[0] < ops.index("rename")
    assert len(crashes["cases"]) == 2 * len(ops)
    not_killed = [c for c in crashes["cases"] if not c["killed"]]
    assert not not_killed, f"children not killed by SIGKILL: {not_killed[:3]}"


def test_a_kill_anywhere_leaves_the_previous_state_or_the_new_checkpoint(
    crashes: dict[str, Any],
) -> None:
    ops = [op for op, _ in crashes["calls"]]
    rename_at = ops.index("rename")
    leftovers_seen = 0
    for case in crashes["cases"]:
        d = Path(case["dir"])
        where = f"killed {case['when']} call {case['n']} ({case['op']} {case['path']})"
        committed = case["n"] > rename_at or (case["n"] == rename_at and case["when"] == "after")
        leftovers_seen += bool(staging_dirs(d))

        # A reader looking at the directory sees only whole checkpoints.
        for entry in d.iterdir():
            if not entry.name.startswith("."):
                assert (entry / MANIFEST_NAME).is_file(), f"{where}: half checkpoint {entry}"

        ck = Checkpointer(d)
        try:
            assert staging_dirs(d) == [], f"{where}: staging leftovers not cleaned at start-up"
            store = LocalStore(d)
            for c in store.list():
                store.verify(c)  # raises if any visible checkpoint is incomplete
            steps = [m.step for m in ck.list()]
            expected_steps = ([1] if crashes["with_previous"] else []) + ([2] if committed else [])
            assert steps == expected_steps, f"{where}: visible checkpoints {steps}"

            fresh = crash_state()
            with torch.no_grad():
                fresh["model"].weight.zero_()
            info = ck.restore(**fresh)
            if not expected_steps:
                assert info is None, f"{where}: restored {info} from nothing"
                continue
            assert info is not None, f"{where}: nothing restored"
            assert info.step == expected_steps[-1], f"{where}: restored step {info.step}"
            assert_tree_equal(state_trees(fresh), crashes["refs"][info.step], where)
        finally:
            ck.close()
    # The kill points inside the save really did leave staging directories behind.
    assert leftovers_seen >= rename_at
