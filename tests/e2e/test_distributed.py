"""torch.distributed (gloo, CPU, 2 processes): rank 0 writes, every rank returns after commit.

Each rank is a separate process started like ``torchrun`` would (TCP rendezvous on
127.0.0.1), sharing one checkpoint directory as ranks on one node or a shared file system do.
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptsync.local import LocalStore
from tests.support.helpers import PY, child_env, staging_dirs
from tests.support.paths import SUPPORT

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_ranks(tmp_path: Path, mode: str) -> tuple[Path, list[dict[str, Any]]]:
    directory = tmp_path / "ckpts"
    port = _free_port()
    procs = [
        subprocess.Popen([PY, str(SUPPORT / "helpers.py"), "dist-worker", str(rank), str(WORLD),
                          str(port), str(directory), str(tmp_path / f"rank{rank}.json"), mode],
                         env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
        for rank in range(WORLD)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"rank {rank} failed ({p.returncode}):\n{out}"
    return directory, [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    return _run_ranks(tmp_path_factory.mktemp("ddp"), "ok")


def test_rank0_alone_writes_one_checkpoint(ddp_run: tuple[Path, list[dict[str, Any]]]) -> None:
    directory, reports = ddp_run
    # Hidden bookkeeping (the writer lock, the resumed-from marker) is not a checkpoint.
    entries = [p.name for p in directory.iterdir() if not p.name.startswith(".ckptsync-")]
    assert len(entries) == 1 and staging_dirs(directory) == [], entries
    store = LocalStore(directory)
    (ckpt,) = store.list()
    store.verify(ckpt)
    assert ckpt.step == 3 and ckpt.manifest.meta["world_size"] == WORLD
    assert {f.path for f in ckpt.manifest.files} == {"model.pt", "optimizer.pt", "rng.pt"}
    assert reports[1]["file_ops_calls"] == 0, "rank 1 wrote files"
    assert reports[0]["file_ops_calls"] > 0
    # The model was saved unwrapped: keys without DDP's "module." prefix.
    model_state = torch.load(ckpt.path / "model.pt", weights_only=True)
    assert model_state and not any(k.startswith("module.") for k in model_state)


def test_every_rank_returns_after_the_commit(ddp_run: tuple[Path, list[dict[str, Any]]]) -> None:
    _, reports = ddp_run
    names = [r["visible_after_wait"] for r in reports]
    assert len(names[0]) == 1 and names[0] == names[1]


def test_restore_gives_equal_params_and_each_rank_its_own_rng(
    ddp_run: tuple[Path, list[dict[str, Any]]],
) -> None:
    _, reports = ddp_run
    for r in reports:
        assert r["restored_step"] == 3
        assert r["params_equal_saved"], f"rank {r['rank']}: params differ from the saved ones"
        assert r["adam_steps"] and all(s == 3.0 for s in r["adam_steps"])
        assert r["draws_after_restore"] == r["draws_after_save"], (
            f"rank {r['rank']}: RNG streams not restored to this rank's state"
        )
    assert reports[0]["params"] == reports[1]["params"]
    # The ranks had different streams, so restoring rank 0's on rank 1 would have been wrong.
    assert reports[0]["draws_after_save"] != reports[1]["draws_after_save"]


def test_a_failed_save_on_rank0_raises_on_every_rank(tmp_path: Path) -> None:
    directory, reports = _run_ranks(tmp_path, "rank0-disk-full")
    for r in reports:
        assert "save_error" in r, f"rank {r['rank']} did not learn that the save failed"
    assert "No space left" in reports[0]["save_error"]
    assert "rank 0" in reports[1]["save_error"]
    assert LocalStore(directory).list() == [] and staging_dirs(directory) == []
