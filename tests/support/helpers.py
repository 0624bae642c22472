"""Shared helpers for the client tests: running the example trainer, small training states,
and fault-injecting :class:`ckptsync.local.FileOps` subclasses.

Imported as ``tests.support.helpers``; also run by path as the crash and DDP drivers
(``python tests/support/helpers.py crash-driver|dist-worker ...``, with ``child_env()``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from tests.support.faults import RecordingOps
from tests.support.paths import EXAMPLE, PY, REPO, child_env

# --------------------------------------------------------------------------- subprocesses

def example_cmd(*args: str, slow_write_s: float | None = None, slow_match: str = "") -> list[str]:
    """The command line running the example trainer.

    With ``slow_write_s``, the trainer runs on a simulated slow disk: every
    ``FileOps.write`` to a file whose path contains ``slow_match`` sleeps first, so that
    save stays in flight long enough to be killed.
    """
    if slow_write_s is None:
        return [PY, str(EXAMPLE), *args]
    launcher = (
        "import runpy, sys, time\n"
        "import ckptsync.local as L\n"
        "_write = L.FileOps.write\n"
        "def slow_write(self, f, data):\n"
        f"    if {slow_match!r} in str(getattr(f, 'name', '')):\n"
        f"        time.sleep({slow_write_s!r})\n"
        "    return _write(self, f, data)\n"
        "L.FileOps.write = slow_write\n"
        f"sys.argv = [{str(EXAMPLE)!r}, *sys.argv[1:]]\n"
        f"runpy.run_path({str(EXAMPLE)!r}, run_name='__main__')\n"
    )
    return [PY, "-c", launcher, *args]


def run_example(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(example_cmd(*args), env=child_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, (
        f"example failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    )
    return proc


def start_example(*args: str, slow_write_s: float | None = None,
                  slow_match: str = "") -> subprocess.Popen[str]:
    cmd = example_cmd(*args, slow_write_s=slow_write_s, slow_match=slow_match)
    return subprocess.Popen(cmd, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)


def wait_until(cond: Callable[[], bool], proc: subprocess.Popen[str], what: str,
               timeout: float = 90, poll_s: float = 0.005) -> None:
    """Poll ``cond`` until true; fail (killing ``proc``) if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"trainer exited ({proc.returncode}) before {what}:\n{out}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll_s)


def sigkill(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    if proc.stdout:
        proc.stdout.close()


def read_losses(path: Path) -> dict[int, str]:
    """step -> repr of the loss, from the trainer's JSON-lines log (last line per step)."""
    out: dict[int, str] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        if not line.endswith("}"):
            continue  # a line being written when the trainer was killed
        rec = json.loads(line)
        out[int(rec["step"])] = repr(float(rec["loss"]))
    return out


def last_logged_step(path: Path) -> int:
    steps = read_losses(path)
    return max(steps) if steps else 0


def committed_steps(directory: Path) -> list[int]:
    """Steps of the committed checkpoints in ``directory`` (what a reader can see)."""
    from ckptsync.local import LocalStore

    return [c.step for c in LocalStore(directory).list() if c.step is not None]


def staging_dirs(directory: Path) -> list[Path]:
    if not directory.exists():
        return []
    return sorted(p for p in directory.iterdir() if p.name.startswith(".staging-"))


def file_bytes(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` by relative path (to prove nothing was touched)."""
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- small states
class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(11, 8)
        self.lin = torch.nn.Linear(8, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.drop = torch.nn.Dropout(0.2)
        self.head = torch.nn.Linear(8, 11, bias=False)
        self.head.weight = self.emb.weight  # tied, like an LM
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.head(self.drop(self.norm(torch.relu(self.lin(self.emb(x))))))


class Counter:
    """A user object with its own state_dict (not a torch class)."""

    def __init__(self) -> None:
        self.seen = 0
        self.history: list[int] = []

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "history": list(self.history)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.seen = int(state["seen"])
        self.history = list(state["history"])


def make_training_state(seed: int = 0) -> dict[str, Any]:
    """A model, AdamW, a warmup+cosine schedule, an enabled CPU GradScaler, a user object
    and a plain dict, freshly built (deterministic for a seed)."""
    torch.manual_seed(seed)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.SequentialLR(
        opt,
        [torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=3),
         torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)],
        milestones=[3],
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    return {"model": model, "optimizer": opt, "scheduler": sched, "scaler": scaler,
            "counter": Counter(), "table": {"ema": torch.zeros(4), "epoch": 0, "tag": "a"}}


def train_steps(state: Mapping[str, Any], n: int) -> None:
    """Run ``n`` training steps, touching every object's state."""
    model, opt, sched, scaler = (state[k] for k in ("model", "optimizer", "scheduler", "scaler"))
    for _ in range(n):
        x = torch.randint(0, 11, (4, 5))
        loss = model(x).logsumexp(-1).mean()
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        state["counter"].seen += 1
        state["counter"].history.append(int(x.sum()))
        state["table"]["ema"].mul_(0.9).add_(torch.randn(4))
        state["table"]["epoch"] += 1


def state_trees(state: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of every object's state tree (for comparing later)."""
    import copy

    out: dict[str, Any] = {}
    for k, obj in state.items():
        tree = obj.state_dict() if hasattr(obj, "state_dict") else obj
        out[k] = copy.deepcopy(tree)
    return out


def assert_tree_equal(a: Any, b: Any, where: str = "state") -> None:
    """Exact equality of two state trees: tensors bit for bit (dtype and shape too)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{where}: tensor vs {type(b).__name__}"
        assert a.dtype == b.dtype and a.shape == b.shape, (
            f"{where}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
        )
        assert torch.equal(a, b), f"{where}: tensors differ"
    elif isinstance(a, Mapping):
        assert isinstance(b, Mapping), f"{where}: mapping vs {type(b).__name__}"
        assert list(a.keys()) == list(b.keys()), f"{where}: keys {list(a)} vs {list(b)}"
        for k in a:
            assert_tree_equal(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), f"{where}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_tree_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b and type(a) is type(b), f"{where}: {a!r} != {b!r}"


def assert_state_equal(state: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    assert_tree_equal(state_trees(state), dict(expected))


# --------------------------------------------------------------------------- fault seams
_OPS = ("open_write", "write", "fsync", "mkdir", "rename", "fsync_dir")


def kill_at(n: int, when: str) -> RecordingOps:
    """File ops that SIGKILL this process just before or just after call number ``n``."""

    def hook(idx: int, op: str, path: str, w: str) -> None:
        if idx == n and w == when:
            os.kill(os.getpid(), signal.SIGKILL)

    return RecordingOps(hook)


def fail_at(n: int, exc: Callable[[], BaseException], ops: Iterable[str] = _OPS) -> RecordingOps:
    """File ops that raise ``exc()`` instead of the ``n``-th call among ``ops`` (once)."""
    wanted = set(ops)
    seen = {"n": 0, "fired": False}

    def hook(idx: int, op: str, path: str, when: str) -> None:
        if when != "before" or op not in wanted or seen["fired"]:
            return
        if seen["n"] == n:
            seen["fired"] = True
            raise exc()
        seen["n"] += 1

    return RecordingOps(hook)


# --------------------------------------------------------------------------- crash driver
def kill_at_every_op(calls: list[tuple[str, str]], base: Path, work: Path,
                     save: Callable[[Path, RecordingOps], None]) -> list[dict[str, Any]]:
    """For every recorded file operation and for "before"/"after" it, fork a child that copies
    ``base`` to a directory of its own under ``work`` and runs ``save(directory, ops)`` with
    file ops that SIGKILL it there. Returns one case per kill point: its directory, the
    operation, and whether SIGKILL ended the child (a child that was not killed at its point
    prints why and exits 3)."""
    cases = []
    for n in range(len(calls)):
        for when in ("before", "after"):
            d = work / f"kill-{n:04d}-{when}"
            shutil.copytree(base, d)
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:  # child
                code = 0
                try:
                    save(d, kill_at(n, when))
                except BaseException:
                    # Not killed at its kill point: the parent records killed=False, which the
                    # tests report; say why here.
                    traceback.print_exc()
                    code = 3
                os._exit(code)
            _, status = os.waitpid(pid, 0)
            killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            cases.append({"dir": str(d), "n": n, "when": when, "op": calls[n][0],
                          "path": calls[n][1], "killed": killed})
    return cases


def crash_state() -> dict[str, Any]:
    """A small state (few tensors, so few file operations per save)."""
    torch.manual_seed(11)
    return {"model": torch.nn.Linear(4, 3),
            "table": {"w": torch.randn(5), "step": 1, "tag": "crash"}}


def crash_driver(base: str, work: str, with_previous: str) -> None:
    """Run in a subprocess: SIGKILL a save at every file operation, one fork per point.

    ``base`` gets one complete checkpoint (step 1) when ``with_previous == "1"``. A counting
    run records the operations of the next save (step 2); then, for every operation index and
    for "before"/"after" it, a forked child copies ``base`` and saves step 2 with file ops
    that kill it there. Writes ``work/cases.json`` and the reference states ``ref1.pt``,
    ``ref2.pt`` (plain ``torch.save`` of each step's state trees).
    """
    from ckptsync import Checkpointer

    torch.set_num_threads(1)
    base_p, work_p = Path(base), Path(work)
    state = crash_state()
    torch.save(state_trees(state), work_p / "ref1.pt")
    if with_previous == "1":
        with Checkpointer(base_p) as ck:
            ck.save(1, **state)
    else:
        base_p.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        state["model"].weight.add_(1.0)
    state["table"]["w"].mul_(2)
    state["table"]["step"] = 2
    torch.save(state_trees(state), work_p / "ref2.pt")

    counted = RecordingOps()
    shutil.copytree(base_p, work_p / "count")
    with Checkpointer(work_p / "count", file_ops=counted) as ck:
        ck.save(2, **state).wait()
    calls = counted.calls

    def save(d: Path, ops: RecordingOps) -> None:
        ck = Checkpointer(d, file_ops=ops)
        ck.save(2, **state).wait()
        ck.close()

    cases = kill_at_every_op(calls, base_p, work_p, save)
    (work_p / "cases.json").write_text(json.dumps({"calls": calls, "cases": cases}))




# --------------------------------------------------------------------------- distributed
def dist_worker(rank_s: str, world_s: str, port: str, directory: str, out: str, mode: str) -> None:
    """One rank of a gloo job: DDP model, save on every rank, wait, verify, restore.

    ``mode`` "ok" or "rank0-disk-full" (rank 0's disk fails the save). Writes a JSON report.
    """
    import random

    import numpy as np
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from ckptsync import Checkpointer, CkptSyncError
    from ckptsync.local import LocalStore

    rank, world = int(rank_s), int(world_s)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    report: dict[str, Any] = {"rank": rank}
    try:
        torch.manual_seed(0)  # same initial weights everywhere (DDP also broadcasts them)
        model = DistributedDataParallel(torch.nn.Sequential(torch.nn.Linear(6, 8),
                                                            torch.nn.Dropout(0.3),
                                                            torch.nn.Linear(8, 2)))
        opt = torch.optim.AdamW(model.parameters(), lr=0.05)
        # Each rank has its own data and RNG streams.
        torch.manual_seed(100 + rank)
        random.seed(100 + rank)
        np.random.seed(100 + rank)
        for _ in range(3):
            loss = model(torch.randn(5, 6)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        saved = [p.detach().clone() for p in model.parameters()]
        ops = fail_at(0, lambda: OSError(28, "No space left on device"), ops=["write"]) \
            if mode == "rank0-disk-full" and rank == 0 else RecordingOps()
        ck = Checkpointer(directory, file_ops=ops)
        try:
            ck.save(3, model=model, optimizer=opt, metrics={"loss": loss.item()})
            ck.wait()
        except CkptSyncError as e:
            report["save_error"] = f"{type(e).__name__}: {e}"
            ck.close()
            return
        store = LocalStore(directory)
        visible = store.list()
        for c in visible:
            store.verify(c)
        report["visible_after_wait"] = [c.name for c in visible]
        report["file_ops_calls"] = len(ops.calls)
        report["draws_after_save"] = [random.random(), np.random.rand(2).tolist(),
                                      torch.rand(3).tolist()]
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.0)
        torch.rand(10)
        random.random()
        np.random.rand(4)
        info = ck.restore(model=model, optimizer=opt)
        report["restored_step"] = info.step if info else None
        report["draws_after_restore"] = [random.random(), np.random.rand(2).tolist(),
                                         torch.rand(3).tolist()]
        report["params_equal_saved"] = all(torch.equal(p, s)
                                           for p, s in zip(model.parameters(), saved, strict=True))
        report["params"] = [p.detach().flatten().tolist() for p in model.parameters()]
        report["adam_steps"] = [float(s["step"]) for s in opt.state_dict()["state"].values()]
        ck.close()
    finally:
        Path(out).write_text(json.dumps(report))
        dist.destroy_process_group()


if __name__ == "__main__":
    {"crash-driver": crash_driver, "dist-worker": dist_worker}[sys.argv[1]](*sys.argv[2:])


# --------------------------------------------------------------------------- commit order
def assert_durable_commit_order(calls: list[tuple[str, str]], directory: Path) -> list[str]:
    """Check one local commit's file operations (a :class:`RecordingOps` record) in order.

    DESIGN.md's local commit: every file fsynced after its last write; the manifest opened
    after every other file's fsync, written, fsynced; the staging directory fsynced after
    that; the rename that publishes it; the parent fsynced after the rename. Fails naming the
    step that is missing or out of order (for instance when an fsync call was deleted).
    Returns the relative paths of the files committed, manifest last.
    """
    from ckptsync.local import STAGING_PREFIX
    from ckptsync.manifest import MANIFEST_NAME

    def last(op: str, path: str) -> int:
        hits = [i for i, (o, p) in enumerate(calls) if o == op and p == path]
        return hits[-1] if hits else -1

    renames = [(i, p) for i, (o, p) in enumerate(calls) if o == "rename"]
    assert len(renames) == 1, f"expected one rename, got {renames}"
    rename_at, rename = renames[0]
    src, dst = (Path(x) for x in rename.split(" -> "))
    assert src.parent == dst.parent == directory and src.name.startswith(STAGING_PREFIX), rename
    opened = [p for o, p in calls if o == "open_write" and Path(p).is_relative_to(src)]
    rels = [Path(p).relative_to(src).as_posix() for p in opened]
    assert rels and rels[-1] == MANIFEST_NAME, f"the manifest is not written last: {rels}"
    manifest = opened[-1]
    manifest_open = last("open_write", manifest)
    for path in opened:
        wrote, synced = last("write", path), last("fsync", path)
        assert synced >= 0, f"{path} is never fsynced"
        assert synced > wrote, f"{path} is written after its fsync"
        if path != manifest:
            assert synced < manifest_open, f"{path} is fsynced after the manifest is opened"
    staging_synced = last("fsync_dir", str(src))
    assert staging_synced > last("fsync", manifest), (
        "the staging directory is not fsynced after the manifest")
    assert rename_at > staging_synced, "the rename comes before the staging directory's fsync"
    assert last("fsync_dir", str(directory)) > rename_at, (
        "the parent directory is not fsynced after the rename")
    return rels
