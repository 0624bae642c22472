"""``ckptsync demo``: train a tiny GPT, kill it like a Colab timeout, resume on a "fresh VM".

The demo plays the story ckptsync exists for, with real processes and no cloud account:

1. the reference: the tiny GPT trainer (:mod:`ckptsync.examples.train_tiny_lm`, shipped in
   the package, so the demo needs no source checkout) runs uninterrupted;
2. the same run again, its checkpoints synced by the ``ckptsync watch`` daemon (started with
   :func:`ckptsync.daemon.start_watcher`) to a remote (default: a local directory used
   through ``file://``; ``--remote URL`` and ``-o KEY=VALUE`` for S3, GCS or Drive);
3. the "VM" dies: trainer and daemon are SIGKILLed mid-run, and the local checkpoint
   directory is deleted;
4. on the fresh VM: the newest valid checkpoint is pulled from the remote (digests verified
   while streaming), a new daemon starts, the trainer resumes with ``--resume`` and finishes;
5. a report: where it was killed, which checkpoint it resumed from, the time lost, and whether
   every loss after the resume and the final weights equal the reference bit for bit
   (``exact resume: yes``; otherwise ``no`` and exit code 1). ``report.txt``,
   ``report.json`` and ``loss.png`` are written to the output directory.

torch is imported only by the trainer subprocesses and to compare the final weights, so
``import ckptsync.demo`` stays torch-free. The plot needs matplotlib (a demo/dev dependency);
without it the demo says so and skips the plot.

Example::

    ckptsync demo                                   # ./demo-out, remote file://./demo-out/remote
    ckptsync demo --remote s3://bucket/demos -o client_kwargs='{"endpoint_url": "..."}'
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ckptsync.demo_report import RunRecord, compare, format_report, mib, plot
from ckptsync.errors import CkptSyncError, ConfigError
from ckptsync.redact import redact_url

__all__ = ["DemoConfig", "DemoError", "default_script", "format_report", "run_demo"]

_KV = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


class DemoError(CkptSyncError):
    """The demo could not run (a trainer crashed, the remote failed, nothing to resume)."""


def default_script() -> Path:
    """The trainer the demo runs: ``ckptsync/examples/train_tiny_lm.py`` of this installation.

    Found beside this module (not imported: it imports torch), so that a wheel install runs the
    demo as a source checkout does.
    """
    return Path(__file__).resolve().parent / "examples" / "train_tiny_lm.py"


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs.

    Attributes:
        out_dir: where everything goes (cleared of a previous demo's files first).
        remote: fsspec URL under which the demo makes a fresh run prefix; None means
            ``file://OUT_DIR/remote/run``.
        storage_options: fsspec options for ``remote``.
        steps, save_every, kill_at: the run: ``steps`` steps, a checkpoint every
            ``save_every``, SIGKILL once step ``kill_at`` is logged.
        seed: the trainer's seed.
        script: the trainer (default: :func:`default_script`); it must take the flags of
            :mod:`ckptsync.examples.train_tiny_lm`.
        progress: draw progress bars (stderr).
        narrate_to_stderr: print the running commentary on stderr (stdout stays clean for
            ``--json``).
    """

    out_dir: Path = Path("demo-out")
    remote: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    steps: int = 200
    save_every: int = 20
    kill_at: int = 130
    seed: int = 0
    script: Path | None = None
    progress: bool = True
    narrate_to_stderr: bool = False

    def check(self) -> None:
        if self.steps < 2 or self.save_every < 1:
            raise ConfigError("--steps must be >= 2 and --save-every >= 1")
        if not self.save_every < self.kill_at < self.steps:
            raise ConfigError(
                f"--kill-at {self.kill_at} must lie after the first checkpoint (step "
                f"{self.save_every}) and before the end (step {self.steps})")
        if importlib.util.find_spec("torch") is None:
            raise ConfigError(
                f"the demo trains a model with torch, which {sys.executable} cannot import: "
                "install torch first, the way you normally do, then "
                "pip install \"ckptsync[torch,demo]\"")
        script = self.script or default_script()
        if not script.is_file():
            hint = ("check the --script path, or leave --script out" if self.script else
                    "this installation of ckptsync is incomplete: reinstall it "
                    "(pip install --force-reinstall \"ckptsync[torch,demo]\")")
            raise ConfigError(f"the demo trainer {script} does not exist: {hint}")


# --------------------------------------------------------------------------- output
_narration = sys.stdout  # set by run_demo


def _say(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(msg, file=_narration)
    _narration.flush()


# --------------------------------------------------------------------------- processes
class _LogTail:
    """Complete lines appended to a file since the last read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.buf = b""

    def lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        self.buf += data
        *done, self.buf = self.buf.split(b"\n")
        return [d.decode(errors="replace") for d in done if d.strip()]


class _DaemonLines:
    """Turns the daemon's key=value log lines into one readable line per sync."""

    def __init__(self, path: Path) -> None:
        self.tail = _LogTail(path)
        self.pushed = 0  # checkpoints the daemon committed to the remote so far

    def pump(self) -> None:
        for line in self.tail.lines():
            kv = {k: v.strip('"') for k, v in _KV.findall(line)}
            event = kv.get("event")
            if event == "pushed":
                self.pushed += 1
                _say(f"  synced step {kv.get('step')} to the remote "
                     f"({mib(int(kv.get('bytes', 0)))} in {kv.get('seconds')} s)")
            elif kv.get("level") in ("warning", "error") and event != "log":
                _say(f"  daemon: {line}")


#: How long the demo pauses the trainer at the kill step for its first checkpoint to be remote.
SYNC_WAIT_S = 300.0


def _wait_for_first_sync(proc: subprocess.Popen[bytes], synced: Callable[[], bool],
                         tick: Callable[[], None], bar: Any) -> None:
    """Pause the trainer (SIGSTOP) until ``synced()``; DemoError after ``SYNC_WAIT_S``."""
    bar.clear()
    _say("  no checkpoint is on the remote yet: pausing the trainer until the first one is")
    os.kill(proc.pid, signal.SIGSTOP)
    deadline = time.monotonic() + SYNC_WAIT_S
    while not synced():
        tick()
        if time.monotonic() > deadline:
            os.kill(proc.pid, signal.SIGKILL)
            raise DemoError(f"no checkpoint reached the remote in {SYNC_WAIT_S:.0f} s: see the "
                            "daemon's log in the output directory")
        time.sleep(0.05)


def _trainer(cfg: DemoConfig, args: list[str], log: Path, desc: str, *,
             kill_at: int | None = None, first_step: int = 1,
             tick: Callable[[], None] = lambda: None,
             on_kill: Callable[[], None] = lambda: None,
             synced: Callable[[], bool] = lambda: True) -> RunRecord:
    """Run the trainer; follow its per-step log with a progress bar; SIGKILL at ``kill_at``.

    The kill waits for ``synced()``: a demo of resuming needs a checkpoint on the remote. On a
    slow link or a loaded machine none may be there yet at ``kill_at``; the trainer is then
    paused (SIGSTOP) until the first one is, for at most ``SYNC_WAIT_S``, and the demo says so.
    """
    from tqdm import tqdm

    script = cfg.script or default_script()
    cmd = [sys.executable, str(script), "--steps", str(cfg.steps),
           "--save-every", str(cfg.save_every), "--seed", str(cfg.seed),
           "--log-file", str(log), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    out_path = log.with_suffix(".out")
    tail = _LogTail(log)
    losses: dict[int, float] = {}
    times: dict[int, float] = {}
    killed = False
    started = time.monotonic()
    bar = tqdm(total=cfg.steps, initial=first_step - 1, desc=desc, unit="step",
               file=sys.stderr, disable=not cfg.progress, dynamic_ncols=True, leave=True)

    def read() -> None:
        now = time.monotonic()
        for line in tail.lines():
            rec = json.loads(line)
            losses[int(rec["step"])] = float(rec["loss"])
            times[int(rec["step"])] = now
            bar.set_postfix(loss=f"{rec['loss']:.3f}", refresh=False)
            bar.update(1)

    try:
        with open(out_path, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    stdin=subprocess.DEVNULL)
            try:
                while proc.poll() is None:
                    read()
                    tick()
                    if kill_at is not None and losses and max(losses) >= kill_at:
                        if not synced():
                            _wait_for_first_sync(proc, synced, tick, bar)
                        # The Colab timeout: no warning, no cleanup, no atexit.
                        os.kill(proc.pid, signal.SIGKILL)
                        proc.wait()
                        killed = True
                        on_kill()
                        break
                    time.sleep(0.005)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        read()
        tick()
    finally:
        bar.close()
    output = out_path.read_text(errors="replace")
    if not killed and proc.returncode != 0:
        raise DemoError(f"the trainer ({' '.join(cmd)}) failed with exit code "
                        f"{proc.returncode}:\n{output[-2000:]}")
    if kill_at is not None and not killed:
        raise DemoError(f"the trainer finished before step {kill_at}: nothing was killed")
    return RunRecord(losses, times, started, time.monotonic(), killed, output)


# --------------------------------------------------------------------------- the demo
def _run_url(cfg: DemoConfig, out: Path) -> str:
    if cfg.remote is None:
        return f"file://{out / 'remote' / 'run'}"
    # One remote prefix holds one run: a fresh prefix per demo, so that an earlier demo's
    # finished run is never what this one "resumes" from.
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{cfg.remote.rstrip('/')}/ckptsync-demo-{stamp}-{secrets.token_hex(3)}"


def _clean(out: Path) -> None:
    for sub in ("reference", "vm", "remote"):
        shutil.rmtree(out / sub, ignore_errors=True)
    for f in ("report.txt", "report.json", "loss.png"):
        (out / f).unlink(missing_ok=True)


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run the demo; return the report (also written to ``OUT/report.json``).

    Raises:
        ConfigError: bad settings, or the trainer script is missing.
        DemoError: a trainer failed, or the remote holds nothing to resume from.
        RemoteError: the remote cannot be used.
    """
    from ckptsync.daemon import start_watcher
    from ckptsync.local import LocalStore
    from ckptsync.progress import NullProgress, TqdmProgress
    from ckptsync.remote import RemoteStore

    global _narration
    _narration = sys.stderr if cfg.narrate_to_stderr else sys.stdout
    cfg.check()
    out = cfg.out_dir.expanduser().absolute()
    out.mkdir(parents=True, exist_ok=True)
    _clean(out)
    url = _run_url(cfg, out)
    store = RemoteStore(url, dict(cfg.storage_options))
    t_demo = time.monotonic()
    _say(f"ckptsync demo: {cfg.steps} steps of a tiny GPT, a checkpoint every "
         f"{cfg.save_every}, SIGKILL at step {cfg.kill_at}")
    _say(f"  remote: {redact_url(url)}")

    # 1. The reference: the same run, never interrupted.
    ref_dir = out / "reference"
    ref_dir.mkdir()
    _say("[1/4] reference run, uninterrupted")
    ref = _trainer(cfg, ["--ckpt-dir", str(ref_dir / "ckpts"),
                         "--final-weights", str(ref_dir / "final.pt")],
                   ref_dir / "losses.jsonl", "reference")

    # 2. The run to be killed, synced by the daemon.
    vm = out / "vm"
    ckpts = vm / "ckpts"
    _say("[2/4] training with the ckptsync watch daemon syncing every checkpoint")
    watcher = start_watcher(ckpts, url, storage_options=cfg.storage_options, interval=1,
                            log_path=vm / "daemon-1.log")
    lines = _DaemonLines(vm / "daemon-1.log")
    local_at_kill: list[Any] = []

    def vm_dies() -> None:
        # The whole VM goes: the daemon dies with the trainer, mid-upload or not.
        watcher.proc.kill()
        watcher.proc.wait()
        local_at_kill.extend(LocalStore(ckpts).list())

    try:
        run1 = _trainer(cfg, ["--ckpt-dir", str(ckpts)], vm / "losses-1.jsonl",
                        "run (to be killed)", kill_at=cfg.kill_at, tick=lines.pump,
                        on_kill=vm_dies, synced=lambda: lines.pushed > 0)
    finally:
        watcher.stop(timeout=10)
    killed_at = max(run1.losses)
    newest_local = max((c.step or 0 for c in local_at_kill), default=0)
    entries = store.scan()
    committed = [e for e in entries if e.status == "valid"]
    leftovers = [e for e in entries if e.status == "uncommitted"]
    _say(f"  SIGKILL at step {killed_at}: trainer and daemon are gone (the Colab timeout)")
    _say(f"  remote holds {len(committed)} committed checkpoint(s)"
         + (f" and {len(leftovers)} unfinished upload(s), never committed" if leftovers else ""))

    # 3. The fresh VM: no local checkpoints, only the remote.
    _say(f"[3/4] fresh VM: deleting {ckpts}, pulling the newest valid checkpoint")
    shutil.rmtree(ckpts)
    t_recover = time.monotonic()
    progress = TqdmProgress() if cfg.progress else NullProgress()
    try:
        pulled = store.pull(None, LocalStore(ckpts), progress=progress)
    except CkptSyncError as e:
        raise DemoError(f"nothing to resume from in {redact_url(url)}: {e}") from e
    finally:
        progress.close()
    LocalStore(ckpts).verify(pulled, full=True)  # re-hash on disk: what will be loaded
    resumed_from = pulled.step or 0
    m = pulled.manifest
    _say(f"  pulled {m.name} (step {resumed_from}): {len(m.files)} files, "
         f"{mib(m.total_size)}, digests verified")

    _say("[4/4] resuming on the fresh VM (trainer --resume, a new daemon syncing)")
    watcher2 = start_watcher(ckpts, url, storage_options=cfg.storage_options, interval=1,
                             log_path=vm / "daemon-2.log")
    lines2 = _DaemonLines(vm / "daemon-2.log")
    try:
        run2 = _trainer(cfg, ["--ckpt-dir", str(ckpts), "--resume",
                              "--final-weights", str(vm / "final.pt")],
                        vm / "losses-2.jsonl", "resumed run", first_step=resumed_from + 1,
                        tick=lines2.pump)
        watcher2.flush(timeout=120)
        lines2.pump()
    finally:
        code = watcher2.stop(timeout=60)
    if code != 0:
        raise DemoError(f"the second daemon exited with code {code}; see {vm / 'daemon-2.log'}")

    report = compare(ref, run1, run2, ref_dir / "final.pt", vm / "final.pt", steps=cfg.steps,
                     save_every=cfg.save_every, killed_at=killed_at,
                     resumed_from=resumed_from)
    report.update(
        remote=url,
        resumed_from_name=m.name,
        resumed_from_files=len(m.files),
        resumed_from_bytes=m.total_size,
        newest_local_step_at_kill=newest_local,
        remote_committed_at_kill=len(committed),
        remote_uncommitted_at_kill=len(leftovers),
        recovery_seconds=round(min(run2.step_times.values(), default=run2.ended) - t_recover, 2),
        reference_seconds=round(ref.ended - ref.started, 2),
        demo_seconds=round(time.monotonic() - t_demo, 2),
        out_dir=str(out),
    )
    report["plot"] = plot(report, ref, run1, run2, out / "loss.png")
    if report["plot"] is None:
        _say("  (no loss plot: matplotlib is not installed; pip install \"ckptsync[demo]\")")
    text = format_report(report)
    (out / "report.txt").write_text(text + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
