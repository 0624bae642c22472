"""Lightning over a link slower than the saves: ``last.ckpt`` still reaches the remote, and a
fresh machine's ``pull_latest`` gives ``fit(ckpt_path="last")`` the newest uploaded step.

The plugin is driven as ``ModelCheckpoint(save_last=True, save_top_k=1)`` drives it (save the
new top-k file, remove the old one, save ``last.ckpt``), in this process, against a
``slowfile://`` remote (tests/support/slowfs.py: every write sleeps), so saves come about
twice as fast as the link uploads. The subprocess version, killed at random points, is
tests/e2e/test_lightning_kill.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from ckptsync.integrations.lightning import CkptSyncCheckpointIO, pull_latest
from ckptsync.remote import RemoteStore
from tests.support import slowfs

pytestmark = pytest.mark.core

pytest.importorskip("lightning.pytorch")

SAVES = 10
SAVE_EVERY_S = 0.12
PAYLOAD = 6 * 4096  # bytes of tensor data per file: a few writes per upload


def _remote_steps(url: str) -> dict[str, int]:
    """Path -> newest step the remote holds of it."""
    out: dict[str, int] = {}
    for m in RemoteStore(url).list():
        for p in m.source["paths"]:
            out[p] = max(out.get(p, -1), m.step)
    return out


def _save(io: CkptSyncCheckpointIO, path: Path, step: int) -> None:
    io.save_checkpoint({"global_step": step, "w": torch.full((PAYLOAD // 4,), float(step))},
                       path)


def test_last_ckpt_reaches_a_slow_remote_and_the_resume_gets_the_newest_uploaded_step(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    slowfs.register()
    # Each file is ~7 writes of 4 KiB, 0.015 s each: ~0.12 s an upload, two uploads a save.
    monkeypatch.setenv("CKPTSYNC_TEST_SLOW_WRITE_S", "0.015")
    monkeypatch.setenv("CKPTSYNC_CHUNK_SIZE", "4096")
    url = f"slowfile://{tmp_path / 'remote'}"
    ckpts = tmp_path / "ckpts"
    io = CkptSyncCheckpointIO(url, teardown_timeout=120)
    resumed: list[tuple[int, int, int]] = []  # (newest uploaded before, resumed, after)
    last_seen: list[tuple[int, int]] = []  # (newest top-k step, last.ckpt step) remote
    try:
        # The first upload also creates the remote root: out of the timed part.
        _save(io, ckpts / "epoch=0-step=0.ckpt", 0)
        assert io.wait(60) == []
        start = time.monotonic()
        for step in range(1, SAVES + 1):
            _save(io, ckpts / f"epoch={step}-step={step}.ckpt", step)
            io.remove_checkpoint(ckpts / f"epoch={step - 1}-step={step - 1}.ckpt")
            _save(io, ckpts / "last.ckpt", step)
            if step >= 3:
                # A fresh machine now: what fit(ckpt_path="last") would load.
                before = max(_remote_steps(url).values())
                got = pull_latest(url, tmp_path / f"fresh{step}")
                after = max(_remote_steps(url).values(), default=0)
                assert got is not None and got.name == "last.ckpt", got
                resumed.append((before, torch.load(got)["global_step"], after))
                up = _remote_steps(url)
                newest_topk = max((v for k, v in up.items() if k != "last.ckpt"), default=0)
                last_seen.append((newest_topk, up.get("last.ckpt", 0)))
            time.sleep(max(0.0, start + step * SAVE_EVERY_S - time.monotonic()))
        behind = SAVES - max(_remote_steps(url).values())
    finally:
        io.teardown()
    # The link was slower than the saves (the remote lagged), yet last.ckpt kept reaching it.
    assert behind >= 1, "the remote kept up: the test's link is not slow enough"
    # last.ckpt is never starved by the new top-k files: once a save's top-k file is up, the
    # newest last.ckpt goes next (the upload in flight aside), so it keeps up with them.
    assert last_seen[-1][1] >= 3, last_seen
    for topk, last in last_seen:
        assert last >= topk - 2, last_seen
    for before, got, after in resumed:
        assert before <= got <= after, resumed  # never behind what was uploaded
    assert _remote_steps(url)["last.ckpt"] == SAVES  # and all of it once the run ends
