"""Fault scenarios of one rank of a 2-process gloo job (tests/e2e/test_distributed.py runs it):

``python tests/support/dist_scenarios.py SCENARIO RANK WORLD PORT DIRECTORY OUT``

Each scenario makes rank 0 fail (or stall) where only rank 0 works, records on every rank what
``save`` / ``wait`` / ``restore`` did, then goes on as training code that caught the error would:
a save that must commit and a collective that must complete (the process group is usable).
The process group's timeout is short, so a rank left in a pending collective fails instead of
hanging; the test's own bound catches the rest. Writes a JSON report per rank.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ckptsync import Checkpointer
from ckptsync.local import LocalStore
from tests.support.helpers import RecordingOps, fail_at

GATE_S = 5.0  # how long rank 0's gated write waits for rank 1 before writing anyway


class OOMState:
    """State whose ``state_dict()`` runs out of memory (a GPU that filled up while snapshotting)."""

    def state_dict(self) -> dict[str, Any]:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _error(e: BaseException) -> dict[str, str]:
    return {"type": type(e).__name__, "message": str(e),
            "ckptsync": type(e).__module__ == "ckptsync.errors"}  # type: ignore[dict-item]


def _go_on(ck: Checkpointer, model: torch.nn.Module, step: int, report: dict[str, Any]) -> None:
    """What training does after catching the error: save again, and a collective."""
    h = ck.save(step, model=model)
    m = h.wait()
    report["went_on_saved"] = m.name if m is not None else None
    t = torch.ones(1)
    dist.all_reduce(t)
    report["all_reduce"] = float(t.item())


def scenario_save_fails(rank: int, directory: str, report: dict[str, Any], bad: Any) -> None:
    """Rank 0's snapshot of ``bad`` fails after the ranks met in save: every rank must raise."""
    model = torch.nn.Linear(3, 2)
    ck = Checkpointer(directory)
    try:
        ck.save(1, model=model, data=bad if rank == 0 else {"position": 7})
        ck.wait()
        report["save_error"] = None
    except Exception as e:
        report["save_error"] = _error(e)
    _go_on(ck, model, 2, report)
    ck.close()


def scenario_restore_fails(rank: int, directory: str, report: dict[str, Any]) -> None:
    """Rank 0 finds only a corrupt checkpoint: restore must raise on every rank."""
    model = torch.nn.Linear(3, 2)
    ck = Checkpointer(directory)
    ck.save(1, model=model).wait()
    dist.barrier()
    if rank == 0:
        (ckpt,) = LocalStore(directory).list()
        path = ckpt.path / "model.pt"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    dist.barrier()
    try:
        ck.restore(model=model)
        report["restore_error"] = None
    except Exception as e:
        report["restore_error"] = _error(e)
    _go_on(ck, model, 2, report)
    ck.close()


def scenario_handle_waits(rank: int, directory: str, report: dict[str, Any]) -> None:
    """Every rank's save handle returns only once rank 0's commit is durable, and raises on
    every rank when it failed.

    Rank 0's first write waits for rank 1 to say its handle returned (or GATE_S seconds): a
    handle on rank 1 that returned before the commit sees no checkpoint.
    """
    gate = Path(directory).parent / "rank1-returned"
    held: list[bool] = []

    def hold_first_write(idx: int, op: str, path: str, when: str) -> None:
        if when == "before" and op == "write" and not held:
            held.append(True)
            deadline = time.monotonic() + GATE_S
            while not gate.exists() and time.monotonic() < deadline:
                time.sleep(0.05)

    model = torch.nn.Linear(3, 2)
    ops = RecordingOps(hook=hold_first_write) if rank == 0 else RecordingOps()
    ck = Checkpointer(directory, file_ops=ops)
    h = ck.save(1, model=model)
    report["done_before_wait"] = h.done()
    m = h.result()
    report["result_name"] = m.name if m is not None else None
    report["handle_name"] = h.name
    report["visible_after_result"] = [c.name for c in LocalStore(directory).list()]
    if rank == 1:
        gate.touch()
    ck.close()

    # The background commit fails on rank 0 (disk full): every rank's handle raises.
    directory2 = str(Path(directory).parent / "ckpts2")
    ops2 = fail_at(0, lambda: OSError(28, "No space left on device"), ops=["write"]) \
        if rank == 0 else RecordingOps()
    ck2 = Checkpointer(directory2, file_ops=ops2)
    h2 = ck2.save(1, model=model)
    try:
        h2.wait()
        report["handle_error"] = None
    except Exception as e:
        report["handle_error"] = _error(e)
    _go_on(ck2, model, 2, report)
    ck2.close()


def scenario_remote_fails(rank: int, directory: str, report: dict[str, Any]) -> None:
    """With ``on_remote_error="raise"``, rank 0's upload fails for good (no permission):
    ``wait`` raises the RemoteError on every rank, not on rank 0 alone."""
    import fsspec

    from ckptsync.remote import RemoteStore
    from tests.support.faults import FaultFS

    fs = FaultFS(fsspec.filesystem("memory"))
    store = RemoteStore(f"memory://dist-{rank}/run", fs=fs)
    model = torch.nn.Linear(3, 2)
    ck = Checkpointer(directory, remote_store=store, on_remote_error="raise", close_timeout=30)
    fs.set_outage(PermissionError(13, "Access Denied"))
    ck.save(1, model=model).wait()
    try:
        ck.wait()
        report["wait_error"] = None
    except Exception as e:
        report["wait_error"] = _error(e)
    fs.set_outage(None)
    t = torch.ones(1)
    dist.all_reduce(t)
    report["all_reduce"] = float(t.item())
    try:
        ck.close()
    except Exception as e:
        report["close_error"] = _error(e)


def scenario_init_fails(rank: int, directory: str, report: dict[str, Any]) -> None:
    """Rank 0 alone cannot construct its Checkpointer (another writer holds the directory's
    lock): every rank's constructor must raise, so no rank goes on to a save that rank 0 never
    joins. Training that catches it goes on with another directory."""
    model = torch.nn.Linear(3, 2)
    holder = LocalStore(directory)  # another writer, as another process would be
    if rank == 0:
        assert holder.acquire_writer_lock()
    try:
        ck = Checkpointer(directory)
        report["init_error"] = None
        ck.save(1, model=model).wait()  # what training does next (a hang on the old code)
        ck.close()
    except Exception as e:
        report["init_error"] = _error(e)
    holder.release_writer_lock()
    ck2 = Checkpointer(str(Path(directory).parent / "ckpts2"))
    _go_on(ck2, model, 2, report)
    ck2.close()


class BadBatch(RuntimeError):
    """The training code's own error on one rank."""


def scenario_exit_raises(rank: int, directory: str, report: dict[str, Any]) -> None:
    """Rank 1 raises inside ``with Checkpointer(...)`` while rank 0 goes on to the training
    loop's next collective (an all-reduce of a failure flag, as training that agrees on
    failures does). Leaving the ``with`` by an exception must join no collective: rank 1's
    all-reduce after catching its error then meets rank 0's, rank 0 raises the same error and
    leaves its ``with``, and rank 0's own background commit of the save is still finished."""
    model = torch.nn.Linear(3, 2)
    failed = torch.zeros(1)
    try:
        with Checkpointer(directory) as ck:
            h = ck.save(1, model=model)  # in flight when rank 1 raises
            report["save_name"] = h.name if rank == 0 else None
            if rank == 1:
                raise BadBatch("rank 1: bad batch")
            dist.all_reduce(failed)  # the loop's next collective
            if failed.item():
                raise BadBatch(f"{int(failed.item())} rank(s) failed")
    except BadBatch as e:
        report["with_error"] = _error(e)
        if rank == 1:
            failed += 1
            dist.all_reduce(failed)
    report["failed_ranks"] = float(failed.item())
    t = torch.ones(1)
    dist.all_reduce(t)
    report["all_reduce"] = float(t.item())
    report["committed"] = [c.name for c in LocalStore(directory).list()]


def main(scenario: str, rank_s: str, world_s: str, port: str, directory: str, out: str) -> None:
    rank, world = int(rank_s), int(world_s)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    report: dict[str, Any] = {"rank": rank}
    try:
        if scenario == "unsafe":
            scenario_save_fails(rank, directory, report, {"sampler": lambda: None})
        elif scenario == "oom":
            scenario_save_fails(rank, directory, report, OOMState())
        elif scenario == "restore":
            scenario_restore_fails(rank, directory, report)
        elif scenario == "remote":
            scenario_remote_fails(rank, directory, report)
        elif scenario == "handle":
            scenario_handle_waits(rank, directory, report)
        elif scenario == "init":
            scenario_init_fails(rank, directory, report)
        elif scenario == "exit":
            scenario_exit_raises(rank, directory, report)
        else:
            raise SystemExit(f"unknown scenario {scenario}")
    finally:
        Path(out).write_text(json.dumps(report))
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
