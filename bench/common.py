"""Shared pieces of the benchmarks: the state, the S3 server, timing, tables and JSON.

Every benchmark module has ``run(ctx) -> list[Table]``; :mod:`bench.run` starts one SeaweedFS
server for all of them and prints each table. Timings alternate the contenders run by run
(after one warm-up of each), so a noisy neighbour hurts all of them alike.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests/support/servers.py: the SeaweedFS context manager

MB = 1e6


@dataclass(frozen=True)
class Size:
    """A state: ``layers`` Linear(width, width) layers plus AdamW state (3 copies of params)."""

    width: int
    layers: int

    @property
    def params(self) -> int:
        return self.layers * (self.width * self.width + self.width)

    @property
    def nbytes(self) -> int:
        return 3 * 4 * self.params  # params + exp_avg + exp_avg_sq, float32


FULL = Size(2048, 19)  # ~80M params, ~0.96 GB serialized with AdamW state
FULL_BIG = Size(2048, 76)  # ~320M params, ~3.8 GB (memory benchmark)
QUICK = Size(1024, 12)  # ~13M params, ~0.15 GB
QUICK_BIG = Size(1024, 16)  # ~0.2 GB
TINY = Size(256, 3)  # ~2.4 MB: what a save costs apart from its bytes (``--sizes tiny``)


@dataclass
class Ctx:
    quick: bool
    runs: int
    size: Size
    big: Size
    tmp: Path
    endpoint: str = ""
    bucket: str = ""
    storage_options: dict[str, Any] = field(default_factory=dict)
    server: Any = None
    ca_bundle: str = ""  # the bench's self-signed certificate, when the server speaks https
    link: str = ""  # the bounded link between client and server, if any (bench.link)

    def s3(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def fresh_dir(self, prefix: str) -> Path:
        d = self.tmp / f"{prefix}-{uuid.uuid4().hex[:8]}"
        d.mkdir(parents=True)
        return d

    def boto3(self) -> Any:
        """A boto3 client for :attr:`endpoint` (the server, or a bounded link in front of it)."""
        import boto3

        from tests.support.servers import ACCESS_KEY, REGION, SECRET_KEY

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name=REGION,
                            verify=self.ca_bundle or None)

    def s3fs(self) -> Any:
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)

    def aws_env(self) -> dict[str, str]:
        """The AWS variables that point the AWS credential chain and endpoint at this server."""
        from tests.support.servers import ACCESS_KEY, REGION, SECRET_KEY

        env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
               "AWS_DEFAULT_REGION": REGION, "AWS_ENDPOINT_URL": self.endpoint,
               "AWS_ENDPOINT_URL_S3": self.endpoint,
               # Never ask a cloud metadata server (169.254.169.254) for credentials: the
               # benchmarks talk to 127.0.0.1 only, whichever client's chain runs.
               "AWS_EC2_METADATA_DISABLED": "true"}
        if self.ca_bundle:
            # botocore's children read AWS_CA_BUNDLE; the CRT (s3torchconnector) ignores it
            # and takes its trust store from SSL_CERT_FILE, read when a client is made.
            env["AWS_CA_BUNDLE"] = self.ca_bundle
            env["SSL_CERT_FILE"] = self.ca_bundle
        return env

    def env(self) -> dict[str, str]:
        """Environment for child processes and AWS-chain clients (torchsnapshot, DCP)."""
        return {**os.environ, **self.aws_env()}


def over(ctx: Ctx) -> str:
    """`` over https`` / `` over <link>``: the title suffix of a table measured that way."""
    parts = (["https"] if ctx.ca_bundle else []) + ([ctx.link] if ctx.link else [])
    return f" over {', '.join(parts)}" if parts else ""


def sizes(quick: bool) -> tuple[Size, Size]:
    """The state and the big (memory benchmark) state of a quick or a full run."""
    return (QUICK, QUICK_BIG) if quick else (FULL, FULL_BIG)


def default_runs(quick: bool) -> int:
    return 2 if quick else 5


@contextlib.contextmanager
def context(quick: bool, runs: int | None = None, size: tuple[Size, Size] | None = None,
            tls: bool = False) -> Iterator[Ctx]:
    """A fresh SeaweedFS (S3 over https with the bench's own certificate if ``tls``) and
    temporary directory; ``size``: (state, big state), default :func:`sizes`."""
    from tests.support.servers import SeaweedFS, environ

    tmp = Path(tempfile.mkdtemp(prefix="ckptsync-bench-", dir=os.environ.get("BENCH_TMP")))
    try:
        if tls:
            from bench.tls import SeaweedFSTLS

            server: SeaweedFS = SeaweedFSTLS(tmp / "weed")
        else:
            server = SeaweedFS(tmp / "weed")
        with server:
            s = server
            bucket = s.create_bucket()
            state, big = size or sizes(quick)
            ctx = Ctx(quick=quick, runs=runs or default_runs(quick), size=state, big=big,
                      tmp=tmp, endpoint=s.endpoint, bucket=bucket,
                      storage_options=s.storage_options(), server=s,
                      ca_bundle=str(getattr(s, "ca", "") or ""))
            # For the libraries and children that read the environment; overwritten, not
            # defaulted, since each benchmark of a suite gets its own server (bench.run).
            with environ(ctx.aws_env()):
                yield ctx
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

class DiskPeak:
    """The most disk ``path``'s file system had in use above its level at start, sampled
    every 0.2 s on a thread: what a benchmark needs free (its server's data included)."""

    def __init__(self, path: Path) -> None:
        import threading

        self.path = path
        self.start = shutil.disk_usage(path).used
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="bench-disk", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, shutil.disk_usage(self.path).used - self.start)
            if self._stop.wait(0.2):
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def renice(pid: int, nice: int) -> None:
    """Lower the priority of every thread of ``pid`` (Linux: nice is per thread; threads the
    server starts later inherit it from the thread that starts them)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.setpriority(os.PRIO_PROCESS, int(tid), nice)


def make_state(size: Size, seed: int = 0) -> tuple[Any, Any]:
    """A model and an AdamW optimizer whose state is populated (one step taken)."""
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(*[torch.nn.Linear(size.width, size.width)
                                  for _ in range(size.layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def state_dict(model: Any, opt: Any) -> dict[str, Any]:
    return {"model": model.state_dict(), "optimizer": opt.state_dict()}


def fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def client_cpu() -> float:
    """CPU seconds (user + system) of this process and of its children that have exited
    (``ckptsync watch --once``, ``torch.save`` in a child): the client's own CPU. The S3
    server and a bounded link's proxy are children that run until the benchmark ends, so
    they are not counted. A Checkpointer's upload process (``ckptsync.remote.process``) is
    the client's, running or not: counted."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
            + sum(pid_cpu(pid) for pid in upload_processes()))


def upload_processes() -> list[int]:
    """The running upload processes of this process's Checkpointers (its children whose
    command is ``python -m ckptsync.remote.process``)."""
    me, found = os.getpid(), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == me and b"ckptsync.remote.process" in (stat.parent / "cmdline").read_bytes():
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return found


def pid_cpu(pid: int) -> float:
    """CPU seconds so far of a running process (``/proc/<pid>/stat``; 0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(contenders: dict[str, Callable[[], float | None]], ctx: Ctx,
            runs: int | None = None, *, gb: float | None = None,
            cpu: dict[str, list[float]] | None = None, before: Callable[[], None] | None = None,
            extra_cpu: Callable[[], float] | None = None) -> dict[str, list[float]]:
    """Run every contender ``runs`` times (default ``ctx.runs``), alternating; a contender
    returns its own sample (seconds) or None to be timed as a whole. One warm-up each, not
    counted, except in ``--quick`` runs, whose figures only show that every row runs.
    An exception makes that contender's row ``unavailable: <error>``.

    ``before`` runs ahead of every sample, untimed (a training step's change of the state).
    With ``gb`` and ``cpu``, the client's CPU seconds per GB of each sample (:func:`client_cpu`
    plus ``extra_cpu()``, e.g. a long-running daemon's) go into ``cpu[name]``."""
    runs = ctx.runs if runs is None else runs
    warmup = not ctx.quick
    out: dict[str, list[float]] = {k: [] for k in contenders}
    if cpu is not None:
        cpu.update({k: [] for k in contenders})
    errors: dict[str, str] = {}

    def cpu_now() -> float:
        return client_cpu() + (extra_cpu() if extra_cpu is not None else 0.0)

    for i in range(runs + (1 if warmup else 0)):
        for name, fn in contenders.items():
            if name in errors:
                continue
            gc.collect()
            try:
                if before is not None:
                    before()
                c0 = cpu_now()
                t0 = time.perf_counter()
                got = fn()
                t = time.perf_counter() - t0 if got is None else got
                used = cpu_now() - c0
            except Exception as e:  # a peer that cannot run here is reported, not dropped
                first = str(e).splitlines()[0][:160] if str(e) else ""
                errors[name] = f"{type(e).__name__}: {first}"
                continue
            if i >= (1 if warmup else 0):
                out[name].append(t)
                if cpu is not None and gb:
                    cpu[name].append(used / gb)
    for name, err in errors.items():
        out[name] = []
        if cpu is not None:
            cpu[name] = []
        UNAVAILABLE[name] = err
    return out


UNAVAILABLE: dict[str, str] = {}


@dataclass
class Target:
    """``ours`` vs ``ref`` (a row, or the best of several rows) must be ``op`` ``factor``;
    with ``cpu``, on the rows' client CPU-s/GB (:attr:`Table.cpu`) instead of their figures."""

    label: str
    ours: str
    refs: list[str]
    factor: float
    higher_is_better: bool = False
    cpu: bool = False

    def evaluate(self, rows: dict[str, list[float]]) -> dict[str, Any]:
        meds = {r: statistics.median(rows[r]) for r in self.refs if rows.get(r)}
        if not rows.get(self.ours) or not meds:
            return {"label": self.label, "ratio": None, "met": None, "ref": None}
        pick = max if self.higher_is_better else min
        ref = pick(meds, key=lambda r: meds[r])
        ratio = statistics.median(rows[self.ours]) / meds[ref] if meds[ref] else float("inf")
        met = ratio >= self.factor if self.higher_is_better else ratio <= self.factor
        return {"label": self.label, "ratio": ratio, "met": met, "ref": ref}


@dataclass
class Table:
    title: str
    unit: str
    rows: dict[str, list[float]]
    baseline: str | None = None
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    higher_is_better: bool = False
    cpu: dict[str, list[float]] = field(default_factory=dict)  # client CPU-s per GB, by row

    def render(self) -> str:
        w = max([len(r) for r in self.rows] + [12]) + 2
        cpu_head = f"  {'client CPU-s/GB':>15}  {'vs ' + (self.baseline or '-')[:8]:>11}" \
            if self.cpu else ""
        lines = [f"\n== {self.title} ({self.unit}; median of n, min-max) ==",
                 f"{'':{w}}{'median':>10}  {'min-max':>19}  {'n':>2}  "
                 f"{'vs ' + (self.baseline or '-'):>10}{cpu_head}"]
        base = self.rows.get(self.baseline or "") or []
        cpu_base = self.cpu.get(self.baseline or "") or []
        for name, xs in self.rows.items():
            if not xs:
                why = UNAVAILABLE.get(name, "no samples")
                lines.append(f"{name:{w}}unavailable: {why}")
                continue
            med = statistics.median(xs)
            ratio = f"{med / statistics.median(base):.2f}x" if base else ""
            line = (f"{name:{w}}{med:10.3f}  {min(xs):8.3f}-{max(xs):<10.3f}  "
                    f"{len(xs):>2}  {ratio:>10}")
            if self.cpu.get(name):
                c = statistics.median(self.cpu[name])
                b = statistics.median(cpu_base) if cpu_base else 0.0
                line += f"  {c:15.2f}  {f'{c / b:.2f}x' if b > 0 else '':>11}"
            lines.append(line)
        for t in self.targets:
            r = t.evaluate(self.basis(t))
            op = ">=" if t.higher_is_better else "<="
            if r["ratio"] is None:
                lines.append(f"  target {t.label}: not measured")
            else:
                lines.append(f"  target {t.label}: {t.ours} / {r['ref']} = {r['ratio']:.2f}x "
                             f"(need {op} {t.factor}x) -> {'MET' if r['met'] else 'NOT MET'}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)

    def basis(self, t: Target) -> dict[str, list[float]]:
        """What ``t`` compares: the rows' figures, or their client CPU-s/GB."""
        return self.cpu if t.cpu else self.rows

    def to_json(self) -> dict[str, Any]:
        def stats(v: list[float]) -> dict[str, Any]:
            return {"samples": v, "median": statistics.median(v) if v else None,
                    "min": min(v) if v else None, "max": max(v) if v else None}

        return {
            "title": self.title, "unit": self.unit, "baseline": self.baseline,
            "rows": {k: stats(v) | {"unavailable": UNAVAILABLE.get(k) if not v else None}
                     for k, v in self.rows.items()},
            "client_cpu_s_per_gb": {k: stats(v) for k, v in self.cpu.items()},
            "targets": [t.evaluate(self.basis(t)) | {"factor": t.factor, "cpu": t.cpu}
                        for t in self.targets],
            "notes": self.notes,
        }


def write_results(tables: list[Table], quick: bool, meta: dict[str, Any]) -> Path:
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = out / f"{'quick' if quick else 'full'}-{stamp}.json"
    path.write_text(json.dumps({"meta": meta, "tables": [t.to_json() for t in tables]},
                               indent=1))
    return path
