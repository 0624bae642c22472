"""``ckptsync demo``: the user's first minute. Run for real (subprocesses, SIGKILL, a remote),
on shorter runs than ``make demo`` so the suite stays fast; ``make demo`` in .ci/run runs the
default one.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from ckptsync.remote import RemoteStore
from tests.support.paths import REPO
from tests.support.remotes import Remote

pytestmark = pytest.mark.core

SHORT = ["--steps", "80", "--save-every", "10", "--kill-at", "55", "--no-progress"]


def _demo(tmp_path: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ckptsync", "demo", "--out",
                           str(tmp_path / "out"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=tmp_path)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR"
    assert zlib.crc32(data[12:16 + length]) == struct.unpack(">I", data[16 + length:20 + length])[0]
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _assert_exact(report: dict, stdout: str) -> None:
    assert stdout.rstrip().splitlines()[-1] == "exact resume: yes", stdout
    assert report["exact"] is True
    assert 55 <= report["killed_at"] < 80
    assert report["resumed_from"] % 10 == 0 and 10 <= report["resumed_from"] <= report["killed_at"]
    assert report["steps_redone"] == report["killed_at"] - report["resumed_from"]
    assert report["resumed_steps"] == list(range(report["resumed_from"] + 1, 81))
    assert report["losses_differing_after_resume"] == []
    assert report["losses_differing_before_kill"] == []
    assert report["weights_compared"] > 0 and report["weights_differing"] == []


def test_demo_kills_resumes_from_the_remote_and_reports_an_exact_resume(tmp_path: Path) -> None:
    r = _demo(tmp_path, *SHORT)
    assert r.returncode == 0, r.stdout + r.stderr
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    _assert_exact(report, r.stdout)
    # The report a person reads says where it died, what it resumed from, and the verdict.
    text = (out / "report.txt").read_text()
    assert text == r.stdout[r.stdout.index("\nckptsync demo report"):].lstrip("\n") or \
        text.strip() in r.stdout
    assert f"SIGKILL at step {report['killed_at']}" in text
    assert f"{report['resumed_from_name']} (step {report['resumed_from']})" in text
    assert "digests verified" in text and f"{report['steps_redone']} steps redone" in text
    # One line per sync while it ran.
    assert "synced step 10 to the remote" in r.stdout
    assert _png_size(out / "loss.png") == (800, 450)
    # The default remote is a local directory, and it holds the whole run, every file intact.
    store = RemoteStore(f"file://{out}/remote/run")
    steps = [m.step for m in store.list()]
    assert steps == list(range(10, 81, 10))
    for m in store.list():
        store.verify(m.name)


@pytest.mark.full
def test_demo_against_s3_with_storage_options(tmp_path: Path, s3_remote: Remote) -> None:
    opts = [f"-o{k}={json.dumps(v)}" for k, v in s3_remote.storage_options.items()]
    r = _demo(tmp_path, *SHORT, "--remote", s3_remote.url, *opts, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["exact"] is True
    # A fresh prefix under the given URL (one prefix, one run), holding the run.
    assert report["remote"].startswith(s3_remote.url + "/ckptsync-demo-")
    store = RemoteStore(report["remote"], s3_remote.storage_options)
    assert store.list()[-1].step == 80
    assert report["resumed_from_name"] in [m.name for m in store.list()]
    # No credential in anything the demo wrote.
    for f in (tmp_path / "out").rglob("*"):
        if f.is_file() and f.suffix in (".json", ".txt", ".log", ".jsonl", ".out"):
            assert s3_remote.storage_options["secret"] not in f.read_text(errors="replace")


@pytest.mark.full
def test_demo_exits_1_when_the_resume_is_not_exact(tmp_path: Path) -> None:
    # A trainer that forgets to restore its data sampler's position: a classic resume bug.
    script = tmp_path / "forgetful_trainer.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(REPO / 'examples')!r})\n"
        "import train_tiny_lm as t\n"
        "t.RandomBatches.load_state_dict = lambda self, state: None\n"
        "t.main()\n"
    )
    r = _demo(tmp_path, *SHORT, "--script", str(script))
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stdout.rstrip().splitlines()[-1] == "exact resume: no"
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["exact"] is False
    assert report["losses_differing_after_resume"][0] == report["resumed_from"] + 1
    assert report["weights_differing"]


def test_demo_rejects_a_kill_before_the_first_checkpoint(tmp_path: Path) -> None:
    r = _demo(tmp_path, "--steps", "80", "--save-every", "10", "--kill-at", "5")
    assert r.returncode == 2
    assert "--kill-at 5 must lie after the first checkpoint" in r.stderr
    assert "Traceback" not in r.stderr


def test_demo_is_registered_without_importing_torch() -> None:
    code = ("import sys\n"
            "from ckptsync.cli import build_parser\n"
            "import ckptsync.demo\n"
            "build_parser().parse_args(['demo', '--remote', 's3://b/p', '-o', 'anon=true'])\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.full
@pytest.mark.serial
def test_demo_on_a_slow_link_kills_only_once_a_checkpoint_is_remote(
        tmp_path: Path, seaweedfs_remote: Remote) -> None:
    """On a link slower than the trainer (a loaded machine, a far bucket) no checkpoint is
    remote yet at the kill step: the demo pauses the trainer until the first one is, says so,
    and still resumes exactly (it failed with 'nothing to resume from' on a loaded CI run)."""
    from tests.support.fault_proxy import FaultProxy
    from tests.support.faultkit import upstream_of

    with FaultProxy(*upstream_of(seaweedfs_remote.extra["endpoint"]), lifetime=400,
                    rate=150_000) as proxy:  # request bodies at 150 kB/s
        opts = json.loads(json.dumps(seaweedfs_remote.storage_options))
        opts["client_kwargs"]["endpoint_url"] = proxy.endpoint
        r = _demo(tmp_path, "--steps", "40", "--save-every", "10", "--kill-at", "25",
                  "--no-progress", "--remote", seaweedfs_remote.url,
                  *[f"-o{k}={json.dumps(v)}" for k, v in opts.items()], timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "pausing the trainer until the first one is" in r.stdout, r.stdout
    assert r.stdout.rstrip().splitlines()[-1] == "exact resume: yes", r.stdout
