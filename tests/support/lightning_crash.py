"""Kill a Lightning save at every file operation (run as a script, one fork per kill point).

``python -m tests.support.lightning_crash WORK`` saves ``last.ckpt`` at step 1 through
:class:`CkptSyncCheckpointIO` into ``WORK/base`` (uploaded, so its spool is empty again),
then records the file operations of the step-2 save of the same file on a copy. For every
operation and for "before"/"after" it, a forked child copies ``base`` and saves step 2 with
file ops that SIGKILL it there. Writes ``WORK/cases.json`` (the recorded calls and, per case,
its directory and whether SIGKILL ended it) and the two dicts saved (``old.pt``, ``new.pt``).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from ckptsync.integrations.lightning import CkptSyncCheckpointIO
from tests.support.faults import RecordingOps
from tests.support.helpers import kill_at_every_op

CKPT = "last.ckpt"


def lightning_dict(step: int) -> dict[str, Any]:
    """What Lightning hands ``save_checkpoint``, in small: a step, an epoch, a state dict."""
    torch.manual_seed(step)
    return {"global_step": step, "epoch": step // 2,
            "state_dict": {"layer.weight": torch.randn(4, 3), "layer.bias": torch.randn(4)}}


def plugin(root: Path, remote: str, ops: RecordingOps | None = None) -> CkptSyncCheckpointIO:
    return CkptSyncCheckpointIO(remote, root=root, file_ops=ops, teardown_timeout=60)


def main(work_s: str) -> None:
    torch.set_num_threads(1)
    work = Path(work_s)
    base, remote = work / "base", f"file://{work / 'remote'}"
    old, new = lightning_dict(1), lightning_dict(2)
    torch.save(old, work / "old.pt")
    torch.save(new, work / "new.pt")
    first = plugin(base, remote)
    first.save_checkpoint(old, base / CKPT)
    first.teardown()  # uploaded: the spool holds nothing the kill points would see

    counted = RecordingOps()
    shutil.copytree(base, work / "count")
    io = plugin(work / "count", remote, counted)
    io.save_checkpoint(new, work / "count" / CKPT)
    calls = list(counted.calls)  # the save's own: the upload thread starts after them
    io.teardown()

    def save(d: Path, ops: RecordingOps) -> None:
        plugin(d, remote, ops).save_checkpoint(new, d / CKPT)

    cases = kill_at_every_op(calls, base, work, save)
    (work / "cases.json").write_text(json.dumps({"calls": calls, "cases": cases,
                                                 "remote": remote}))


if __name__ == "__main__":
    main(*sys.argv[1:])
