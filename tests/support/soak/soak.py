"""``make soak``: randomized SIGKILL trials of a trainer and the daemon.

``python -m tests.support.soak.soak [--trials 200] [--seed S] [--s3-every 10] [--max-seconds 1500]``

Each trial is a fresh run (tests/support/soak/trainer.py: a ``Checkpointer`` with ``keep_last=2``)
in one of two set-ups, drawn at random:

``daemon``      the trainer writes locally; a ``ckptsync watch`` daemon syncs to the remote
``inprocess``   the trainer's own ``remote=`` uploads (no daemon)

At a random moment the trainer, the daemon or both are SIGKILLed (each at its own random
time). Then the trainer runs again to the end (it resumes), ``ckptsync watch --once``
finishes the sync, ``ckptsync verify`` checks every remote checkpoint, and the newest
committed checkpoint is restored on a "fresh machine" and compared, bit for bit, with the
digest the trainer wrote for that step. Violations counted: invalid restores (a restore
that fails, or whose state is not what was saved at its step), committed checkpoints lost
(the newest remote step going backwards, or, without remote retention, a committed name
disappearing), verify failures, diverging resumes (two digests for one step), and a final
remote lag (newest local step - newest remote step after the sync) above 0. Most trials use
file:// remotes (fast); every ``--s3-every``-th uses SeaweedFS. Exit status 1 on any violation.

Lives under tests/ (not bench/): it is a proof that fails, built from the test support
modules (tests/support: servers.py, watchkit.py's daemon script), not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.paths import PY, SCRIPTS, child_env

HERE = Path(__file__).resolve().parent
STEPS = 8  # steps a trainer start runs for (a kill usually cuts it short)
TRIALS_PER_RUN = 5  # trials (kill + restart) of one training run, on one remote
TRIAL_TIMEOUT_S = 90.0


@dataclass
class Metrics:
    """What the trials did and what went wrong (``violations`` must stay empty)."""

    trials: int = 0
    by_setup: Counter[str] = field(default_factory=Counter)
    kills: Counter[str] = field(default_factory=Counter)
    committed: int = 0
    restores: int = 0
    max_lag_at_kill: int = 0
    max_final_lag: int = 0
    violations: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def report(self, seed: int) -> str:
        kills = ", ".join(f"{k} {v}" for k, v in sorted(self.kills.items()))
        setups = ", ".join(f"{k} {v}" for k, v in sorted(self.by_setup.items()))
        kinds = Counter(v.split(":", 1)[0] for v in self.violations)
        return "\n".join([
            f"[soak] seed={seed} trials={self.trials} ({setups}) seconds={self.seconds:.0f}",
            f"[soak] faults: SIGKILLs={sum(self.kills.values())} ({kills})",
            f"[soak] checkpoints committed remotely={self.committed} restores={self.restores}",
            f"[soak] violations={len(self.violations)}: invalid restores="
            f"{kinds['invalid restore']} committed lost={kinds['committed lost']} "
            f"verify failed={kinds['verify failed']} diverging resumes={kinds['diverging resume']}"
            f" final lag>0={kinds['final lag']}",
            f"[soak] remote lag: max at a kill={self.max_lag_at_kill} steps, "
            f"max after the sync={self.max_final_lag} steps",
            *(f"[soak] VIOLATION {v}" for v in self.violations[:20]),
        ])


@dataclass
class Target:
    url: str
    storage_options: dict[str, Any]
    label: str


def _popen(args: list[str], log: Path, **env: str) -> subprocess.Popen[bytes]:
    with open(log, "ab") as f:
        return subprocess.Popen(args, env=child_env(**env), stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def _kill(proc: subprocess.Popen[bytes]) -> bool:
    """SIGKILL ``proc`` if it still runs; True if it was killed by this call."""
    if proc.poll() is not None:
        return False
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    return True


def _remote_steps(target: Target) -> dict[str, int]:
    from ckptsync.remote import RemoteStore

    store = RemoteStore(target.url, target.storage_options)
    store.fs.invalidate_cache()
    return {m.name: m.step for m in store.list() if m.step is not None}


def _local_newest(directory: Path) -> int:
    from ckptsync.local import LocalStore

    steps = [c.step for c in LocalStore(directory).list() if c.step is not None] \
        if directory.exists() else []
    return max(steps, default=0)


def _expected(path: Path, metrics: Metrics, where: str) -> dict[int, str]:
    out: dict[int, str] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        if not line.endswith("}"):
            continue  # the line being written at the kill
        rec = json.loads(line)
        step, dig = int(rec["step"]), str(rec["digest"])
        if out.get(step, dig) != dig:
            metrics.violations.append(f"diverging resume: {where} step {step}")
        out[step] = dig
    return out


def _restore_newest(target: Target, work: Path, expected: dict[int, str], newest: int | None,
                    metrics: Metrics, where: str) -> None:
    """A fresh machine restores the newest committed checkpoint from the remote alone and
    must get exactly the state the trainer saved at that step."""
    import torch

    from ckptsync import Checkpointer
    from tests.support.soak.trainer import digest, new_model

    model = new_model()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    fresh = work / "fresh"
    try:
        with Checkpointer(fresh, remote=target.url, storage_options=target.storage_options) as ck:
            info = ck.restore(model=model, fresh_ok=True)  # killed before its first push
    except Exception as e:
        metrics.violations.append(f"invalid restore: {where}: {type(e).__name__}: {e}")
        return
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
    metrics.restores += 1
    got = info.step if info is not None else None
    if newest is not None and (got is None or got < newest):
        metrics.violations.append(f"invalid restore: {where}: restored {got}, "
                                  f"newest committed {newest}")
    elif got is not None and expected.get(got) != digest(model):
        metrics.violations.append(f"invalid restore: {where}: step {got} restored state "
                                  "differs from what the trainer saved")


def soak_run(r: int, trials: int, rng: random.Random, work: Path, target: Target,
             metrics: Metrics) -> None:
    """One training run of ``trials`` trials: each trial starts the trainer (resuming) for
    ``STEPS`` more steps and SIGKILLs the trainer, the daemon or both at random moments,
    then restores the newest committed checkpoint. The run ends with the trainer finishing,
    ``watch --once``, ``ckptsync verify`` and a last restore."""
    setup = rng.choice(["daemon", "inprocess"])
    run_where = f"run {r} ({setup}, {target.label})"
    metrics.by_setup[f"{setup}/{target.label}"] += trials
    local, expect = work / "ckpts", work / "expect.jsonl"
    env = {"CKPTSYNC_STORAGE_OPTIONS": json.dumps(target.storage_options),
           "CKPTSYNC_RETRIES": "4", "CKPTSYNC_BACKOFF_INITIAL": "0.05",
           "CKPTSYNC_BACKOFF_MAX": "0.5"}

    def trainer(steps: int) -> list[str]:
        cmd = [PY, str(HERE / "trainer.py"), str(local), "--expect", str(expect),
               "--steps", str(steps), "--step-sleep", "0.1"]
        if setup == "inprocess":
            cmd += ["--remote", target.url, "--storage-options",
                    json.dumps(target.storage_options)]
        return cmd

    watch = [PY, str(SCRIPTS / "run_daemon.py"), "watch", str(local), target.url]
    seen: dict[str, int] = {}

    def observe(where: str) -> dict[str, int]:
        now = _remote_steps(target)
        if seen and max(now.values(), default=0) < max(seen.values()):
            metrics.violations.append(
                f"committed lost: {where}: newest remote step went "
                f"{max(seen.values())} -> {max(now.values(), default=0)}")
        if setup == "daemon":  # no remote retention: every committed name stays
            for name in sorted(set(seen) - set(now)):
                metrics.violations.append(f"committed lost: {where}: {name}")
        seen.update(now)
        return now

    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for t in range(trials):
            metrics.trials += 1
            victims = ["trainer"] if setup == "inprocess" else rng.choice(
                [["trainer"], ["daemon"], ["trainer", "daemon"]])
            where = f"{run_where} trial {t}, kill {'+'.join(victims)}"
            if setup == "daemon" and procs.get("daemon") is None:
                procs["daemon"] = _popen([*watch, "--interval", "0.3"], work / "daemon.log",
                                         **env)
            lines = len(expect.read_text().splitlines()) if expect.exists() else 0
            procs["trainer"] = _popen(trainer(_local_newest(local) + STEPS),
                                      work / "trainer.log", **env)
            # Kill points are timed from the trainer's first step, so that they land mid-run.
            deadline = time.monotonic() + TRIAL_TIMEOUT_S
            while (not expect.exists() or len(expect.read_text().splitlines()) <= lines) \
                    and procs["trainer"].poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            t0 = time.monotonic()
            for victim, at in sorted(((v, rng.uniform(0.0, 1.2)) for v in victims),
                                     key=lambda kv: kv[1]):
                time.sleep(max(0.0, at - (time.monotonic() - t0)))
                if _kill(procs[victim]):
                    metrics.kills[victim] += 1
                lag = _local_newest(local) - max(_remote_steps(target).values(), default=0)
                metrics.max_lag_at_kill = max(metrics.max_lag_at_kill, lag)
            if procs["trainer"].wait(TRIAL_TIMEOUT_S) not in (0, -signal.SIGKILL):
                metrics.violations.append(f"invalid restore: {where}: the trainer failed "
                                          f"({procs['trainer'].returncode}), see trainer.log")
                return
            if "daemon" in victims:
                procs.pop("daemon")
            now = observe(where)
            _restore_newest(target, work, _expected(expect, metrics, where),
                            max(now.values(), default=None), metrics, where)
        # The end of the run: the trainer finishes, one sync completes the upload.
        for p in procs.values():
            _kill(p)
        procs.clear()
        res = subprocess.run(trainer(_local_newest(local) + 2), env=child_env(**env),
                             capture_output=True, text=True, timeout=TRIAL_TIMEOUT_S)
        if res.returncode != 0:
            metrics.violations.append(f"invalid restore: {run_where}: the last trainer run "
                                      f"failed ({res.returncode}): {res.stderr[-600:]}")
            return
        res = subprocess.run([*watch, "--once"], env=child_env(**env), capture_output=True,
                             text=True, timeout=TRIAL_TIMEOUT_S)
        if res.returncode != 0:
            metrics.violations.append(f"final lag: {run_where}: watch --once exited "
                                      f"{res.returncode}: {res.stderr[-600:]}")
        now = observe(f"{run_where} after the sync")
        v = subprocess.run([PY, "-m", "ckptsync", "verify", target.url], env=child_env(**env),
                           capture_output=True, text=True, timeout=TRIAL_TIMEOUT_S)
        if v.returncode != 0:
            metrics.violations.append(f"verify failed: {run_where}: {v.stdout[-300:]} "
                                      f"{v.stderr[-300:]}")
        metrics.committed += len(seen)
        final_lag = _local_newest(local) - max(now.values(), default=0)
        metrics.max_final_lag = max(metrics.max_final_lag, final_lag)
        if final_lag > 0:
            metrics.violations.append(f"final lag: {run_where}: {final_lag} steps behind")
        _restore_newest(target, work, _expected(expect, metrics, run_where),
                        max(now.values(), default=None), metrics, f"{run_where} at the end")
    finally:
        for p in procs.values():
            _kill(p)


@contextmanager
def _seaweedfs(work: Path) -> Iterator[Any]:
    from tests.support import servers

    with servers.SeaweedFS(work / "seaweedfs") as s:
        yield s


def run(trials: int, seed: int, work: Path, *, s3_every: int = 5, s3: Any = None,
        max_seconds: float = 1500.0, log: Any = print) -> Metrics:
    """Run ``trials`` trials under ``work``; ``s3`` a running SeaweedFS (started here when
    needed and None). Stops early (counting what ran) past ``max_seconds``."""
    rng = random.Random(seed)
    metrics = Metrics()
    t0 = time.monotonic()
    with ExitStack() as stack:
        r = 0
        while metrics.trials < trials:
            if time.monotonic() - t0 > max_seconds:
                metrics.violations.append(f"time bound: stopped after {metrics.trials} trials "
                                          f"({max_seconds:.0f} s)")
                break
            d = work / f"run{r:03d}"
            d.mkdir(parents=True)
            if s3_every and r % s3_every == s3_every - 1:
                if s3 is None:
                    s3 = stack.enter_context(_seaweedfs(work))
                bucket = s3.create_bucket()
                target = Target(f"s3://{bucket}/run", s3.storage_options(), "seaweedfs")
            else:
                target = Target(f"file://{d / 'remote'}/run", {}, "file")
            before = len(metrics.violations)
            soak_run(r, min(TRIALS_PER_RUN, trials - metrics.trials), rng, d, target, metrics)
            if len(metrics.violations) == before:
                shutil.rmtree(d, ignore_errors=True)  # keep only failing runs' files
            r += 1
            log(f"[soak] {metrics.trials}/{trials} trials, {len(metrics.violations)} "
                f"violations, {time.monotonic() - t0:.0f} s")
    metrics.seconds = time.monotonic() - t0
    return metrics


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--s3-every", type=int, default=5, help="every Nth run on SeaweedFS")
    ap.add_argument("--max-seconds", type=float, default=1500.0)
    ap.add_argument("--workdir", default=None, help="default: a new temporary directory")
    a = ap.parse_args()
    seed = a.seed if a.seed is not None else random.randrange(1 << 30)
    print(f"[soak] seed={seed} (replay with --seed {seed})", flush=True)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="ckptsync-soak-"))
    m = run(a.trials, seed, work, s3_every=a.s3_every, max_seconds=a.max_seconds,
            log=lambda s: print(s, flush=True))
    print(m.report(seed), flush=True)
    if m.violations:
        print(f"[soak] failing trials kept under {work}", flush=True)
        return 1
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
