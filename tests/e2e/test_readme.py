"""Every shell command in README.md (and examples/zero_code/README.md) is exercised.

Commands are extracted from the ```bash blocks. Each is either run here, in README order, in a
sandbox (``RUN``), or mirrored exactly by another test (``MIRRORED``). The test fails when a
README command is in neither table, so a new command cannot go untested.

How a command is run here (the substitutions, nothing else changes):
- ``s3://my-bucket/`` -> ``file://<tmp>/bucket/`` (a local remote; every backend is covered by
  the conformance suite in tests/conformance/);
- ``ckptsync`` -> ``<this python> -m ckptsync``; ``python`` -> this python; ``examples/`` ->
  the repository's; ``--steps 200`` -> ``--steps 40`` (speed);
- ``CMD &`` starts a background daemon (``CKPTSYNC_INTERVAL=1`` in its environment);
- a ``ckptsync pull`` is the "new machine": first every background daemon is left to finish
  its uploads and is stopped with SIGTERM (exit 0), then commands run in a fresh empty
  directory.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckptsync.local import LocalStore
from ckptsync.watch import daemon_status
from tests.support.paths import REPO

READMES = [REPO / "README.md", REPO / "examples" / "zero_code" / "README.md"]

#: README command -> the test that mirrors it exactly (file::test).
MIRRORED = {
    "make demo": "tests/e2e/test_readme.py::test_make_targets_are_what_the_readme_says "
                 "(and .ci/run runs it; tests/e2e/test_demo.py runs the demo itself)",
    "make test": "tests/e2e/test_readme.py::test_make_targets_are_what_the_readme_says "
                 "(.ci/run runs it)",
    **{cmd: "tests/e2e/test_sharded.py::test_readme_torchrun_example_resumes_and_reshards "
              "(README_TORCHRUN there)"
       for cmd in (
           "torchrun --standalone --nproc_per_node 2 examples/distributed/train_fsdp.py "
           "--ckpt-dir ckpts --steps 20",
           "torchrun --standalone --nproc_per_node 2 examples/distributed/train_fsdp.py "
           "--ckpt-dir ckpts --steps 40",
           "torchrun --standalone --nproc_per_node 1 examples/distributed/train_fsdp.py "
           "--ckpt-dir ckpts --steps 60")},
    'pip install ".[torch,s3]"': "tests/e2e/test_readme.py::test_install_extras_exist",
    'pip install ".[s3]"': "tests/e2e/test_deploy.py::"
                           "test_sidecar_entrypoint_is_torch_free_and_syncs_another_process_"
                           "checkpoint (builds a venv with exactly this install)",
}

#: README command -> a substring its output must contain when run here ("" = exit 0 only).
RUN = {
    "ckptsync watch checkpoints s3://my-bucket/run-17 --keep-last 3 &": "",
    "python examples/train_tiny_lm.py --ckpt-dir checkpoints --steps 200 --save-every 20":
        "done: 40 steps",
    "ckptsync status checkpoints": "daemon:    running",
    "ckptsync watch runs/zc s3://my-bucket/zc-run --rule 'file:ckpt.pt' &": "",
    "python examples/zero_code/train.py --ckpt-dir runs/zc --steps 200 --save-every 20":
        "done at step 40",
    "ckptsync pull s3://my-bucket/run-17 checkpoints": "(step 40)",
    "python examples/train_tiny_lm.py --ckpt-dir checkpoints --steps 200 --save-every 20 "
    "--resume": "(step 40)",
    "ckptsync ls s3://my-bucket/run-17": "valid",
    "ckptsync verify s3://my-bucket/run-17": "ok ",
    "ckptsync gc s3://my-bucket/run-17 --keep-last 3 --dry-run": "0 checkpoint(s)",
    "ckptsync pull s3://my-bucket/zc-run runs/zc --rule 'file:ckpt.pt'": "runs/zc: ckpt.pt",
    "python examples/zero_code/train.py --ckpt-dir runs/zc --steps 200 --save-every 20 "
    "--resume": "resumed from runs/zc/ckpt.pt (step 40)",
}


def readme_commands(paths: list[Path] = READMES) -> list[str]:
    """The shell commands of the READMEs' ```bash blocks, in order (comments dropped)."""
    out = []
    for path in paths:
        for block in re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S):
            for line in block.splitlines():
                cmd = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
                if cmd:
                    out.append(cmd)
    return out


def test_every_readme_command_is_run_or_mirrored() -> None:
    cmds = set(readme_commands())
    assert cmds == set(MIRRORED) | set(RUN), (
        f"not covered: {sorted(cmds - set(MIRRORED) - set(RUN))}; "
        f"stale: {sorted((set(MIRRORED) | set(RUN)) - cmds)}")
    for where in MIRRORED.values():
        file, _, rest = where.partition("::")
        name = rest.split()[0]
        assert f"def {name}(" in (REPO / file).read_text(), f"{where}: no such test"


def test_make_targets_are_what_the_readme_says() -> None:
    demo = subprocess.run(["make", "-n", "demo"], cwd=REPO, capture_output=True, text=True)
    assert demo.returncode == 0 and ".venv/bin/ckptsync demo" in demo.stdout
    test = subprocess.run(["make", "-n", "test"], cwd=REPO, capture_output=True, text=True)
    assert test.returncode == 0 and "-m pytest" in test.stdout and "ruff check" in test.stdout
    ci = (REPO / ".ci" / "run").read_text()
    assert ci.index("make test") < ci.index("make demo")


def test_install_extras_exist() -> None:
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert any(d.startswith("torch") for d in extras["torch"])
    assert any(d.startswith("s3fs") for d in extras["s3"])
    import s3fs  # noqa: F401  (installed by `make venv`, as by the extra)
    import torch  # noqa: F401


class Sandbox:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.machine = 0
        self.cwd = self.new_machine()
        self.background: list[tuple[subprocess.Popen[str], Path]] = []
        self.env = dict(os.environ, CKPTSYNC_INTERVAL="1", OMP_NUM_THREADS="1")

    def new_machine(self) -> Path:
        self.machine += 1
        self.cwd = self.tmp / f"machine-{self.machine}"
        self.cwd.mkdir(parents=True)
        return self.cwd

    def argv(self, cmd: str) -> list[str]:
        cmd = cmd.replace("s3://my-bucket/", f"file://{self.tmp}/bucket/")
        cmd = cmd.replace("--steps 200", "--steps 40")
        args = shlex.split(cmd)
        if args[0] == "ckptsync":
            args = [sys.executable, "-m", "ckptsync", *args[1:]]
        elif args[0] == "python":
            args = [sys.executable, *args[1:]]
        return [str(REPO / a) if a.startswith("examples/") else a for a in args]

    def quiesce(self) -> None:
        """Let every background daemon finish its uploads, then SIGTERM it (exit 0)."""
        for proc, local in self.background:
            deadline = time.monotonic() + 60
            while True:
                st = daemon_status(local)
                local_names = {c.name for c in LocalStore(local).list()}
                done = set(st.get("synced", [])) | set(st.get("skipped_by_retention", []))
                if (st.get("synced") and not st.get("pending") and not st.get("uploading")
                        and local_names <= done
                        and not any(w.get("pending") for w in st.get("watch", []))):
                    break
                assert time.monotonic() < deadline, f"daemon on {local} did not sync: {st}"
                time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
        self.background.clear()

    def run(self, cmd: str) -> None:
        if cmd.endswith("&"):
            argv = self.argv(cmd[:-1])
            proc = subprocess.Popen(argv, cwd=self.cwd, env=self.env, text=True,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            local = self.cwd / argv[4]
            self.background.append((proc, local))
            deadline = time.monotonic() + 30
            while "state" not in daemon_status(local):
                assert proc.poll() is None, f"{cmd} exited with {proc.returncode}"
                assert time.monotonic() < deadline, f"{cmd} did not start"
                time.sleep(0.05)
            return
        if cmd.startswith("ckptsync pull"):
            self.quiesce()
            self.new_machine()
        r = subprocess.run(self.argv(cmd), cwd=self.cwd, env=self.env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, f"{cmd}\n{r.stdout}\n{r.stderr}"
        assert RUN[cmd] in r.stdout, f"{cmd}: {RUN[cmd]!r} not in\n{r.stdout}"

    def close(self) -> None:
        for proc, _ in self.background:
            proc.kill()
            proc.wait()


def test_readme_commands_run_in_order(tmp_path: Path) -> None:
    ran = 0
    # Each README is a recipe of its own, with its own bucket: the same prefix in both would
    # be two runs in one prefix, which ckptsync refuses (README, "One run per prefix").
    for path in READMES:
        box = Sandbox(tmp_path / path.parent.name)
        try:
            for cmd in readme_commands([path]):
                if cmd in RUN:
                    box.run(cmd)
                    ran += 1
            box.quiesce()
        finally:
            box.close()
    assert ran >= len(RUN)


@pytest.mark.parametrize("path", READMES, ids=lambda p: p.name)
def test_readme_links_point_to_files(path: Path) -> None:
    for target in re.findall(r"\]\(([^)#]+)\)", path.read_text()):
        if "://" not in target:
            assert (path.parent / target).exists(), f"{path.name} links to missing {target}"
