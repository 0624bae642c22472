"""A Lightning run over a link slower than its saves, SIGKILLed at random points 20 times: a
fresh machine (``pull_latest`` then ``fit(ckpt_path="last")``) always resumes at the newest
step that reached the remote, never from 0 once anything did.

The trainer (tests/support/lightning_run.py, ``ModelCheckpoint(save_last=True,
save_top_k=2)``) uploads through ``slowfile://`` (tests/support/slowfs.py: every write
sleeps), so each save's two files take about twice as long to upload as the trainer takes
to reach its next save. The cheaper in-process variant is
tests/integration/test_lightning_latest.py.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckptsync.remote import RemoteStore
from ckptsync.zerocode.contentstep import torch_save_step
from tests.support import slowfs
from tests.support.faultkit import seed_from_env
from tests.support.paths import child_env

pytestmark = [pytest.mark.full, pytest.mark.serial]

pytest.importorskip("lightning.pytorch")

KILLS = 20
# ~10 KB checkpoints in 4 KiB writes of 0.07 s: ~0.25 s an upload, ~0.5 s a save's two files;
# an epoch (a save) every ~0.25 s.
SLOW = {"CKPTSYNC_TEST_SLOW_WRITE_S": "0.07", "CKPTSYNC_CHUNK_SIZE": "4096"}
TRAIN = ["--epochs", "200", "--batch-sleep", "0.05"]


def _trainer(tmp: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "tests.support.lightning_run", *args],
                            cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=child_env(**SLOW))


class _Started(Exception):
    def __init__(self, step: int) -> None:
        super().__init__(step)
        self.step = step


def _resume_step(dirpath: Path, remote: str) -> int:
    """What a fresh machine does (``pull_latest``, then ``fit(ckpt_path="last")``, as
    tests/support/lightning_run.py ``--resume``), in this process: the step training starts
    at."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from ckptsync.integrations.lightning import CkptSyncCheckpointIO
    from tests.support.lightning_run import Tiny

    class Stop(Callback):
        def on_train_start(self, trainer: pl.Trainer, *args: object) -> None:
            raise _Started(trainer.global_step)

    io = CkptSyncCheckpointIO(remote)
    io.pull_latest(dirpath)
    trainer = pl.Trainer(max_epochs=200, accelerator="cpu", devices=1, plugins=[io],
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[ModelCheckpoint(dirpath=dirpath, save_last=True,
                                                    save_top_k=2, monitor="train_loss",
                                                    filename="{epoch}-{step}"), Stop()])
    try:
        trainer.fit(Tiny(), ckpt_path="last")
    except _Started as e:
        return e.step
    finally:
        io.teardown()
    raise AssertionError("training never started")


def _wait_for_line(proc: subprocess.Popen[str], text: str, timeout: float = 120) -> list[str]:
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.strip())
        if text in line:
            return lines
    proc.kill()
    raise AssertionError(f"the trainer never printed {text!r}: {lines}")


@pytest.mark.timeout(1500)
def test_killed_at_random_points_a_fresh_machine_resumes_at_the_newest_uploaded_step(
        tmp_path: Path) -> None:
    slowfs.register()
    rng = random.Random(seed_from_env(30))
    # (killed after s, newest saved locally, newest uploaded, resumed at)
    outcomes: list[tuple[float, int, int | None, int]] = []
    for run in range(KILLS):
        remote = f"slowfile://{tmp_path / f'remote{run}'}"
        trainer = _trainer(tmp_path, "--dir", f"train{run}", "--remote", remote, *TRAIN)
        _wait_for_line(trainer, "training started")
        after = rng.uniform(0.5, 4.0)
        time.sleep(after)
        os.kill(trainer.pid, signal.SIGKILL)
        assert trainer.wait(60) == -signal.SIGKILL, "the trainer ended before its kill"
        assert trainer.stdout is not None
        trainer.stdout.close()

        steps = [m.step for m in RemoteStore(remote).list()]
        newest = max(steps) if steps else None
        saved = max((torch_save_step(p) or 0 for p in (tmp_path / f"train{run}").glob("*.ckpt")),
                    default=0)
        # A fresh machine: nothing of the killed run's directory, only the remote.
        resumed = _resume_step(tmp_path / f"fresh{run}", remote)
        outcomes.append((round(after, 2), saved, newest, resumed))
        print(f"run {run}: killed after {after:.2f}s at step {saved}, newest uploaded "
              f"{newest}, resumed at {resumed}", flush=True)
    report = "\n".join(f"killed after {a}s: saved step {s}, newest uploaded step {n}, "
                       f"resumed at {r}" for a, s, n, r in outcomes)
    print(report)
    uploaded = [o for o in outcomes if o[2] is not None]
    assert len(uploaded) >= KILLS // 2, f"too few runs uploaded anything:\n{report}"
    for _, _, newest, resumed in outcomes:
        assert resumed == (newest or 0), f"a resume missed the newest uploaded step:\n{report}"
    # The link was slower than the saves: when killed, the remote was behind the trainer.
    behind = [s - n for _, s, n, _ in uploaded if n is not None]
    assert sum(b > 0 for b in behind) >= len(behind) // 2, report
