"""Every shell command in README.md, docs/*.md and examples/zero_code/README.md is exercised,
and every link in them resolves.

Commands are extracted from the ```bash blocks. Each is either run here, in a sandbox
(``RUN``), or mirrored exactly by another test (``MIRRORED``). The test fails when a command is
in neither table, so a new command cannot go untested. They run in the order of ``DOCS``: the
README, then the guides in docs/ by file name, then the zero-code recipe (the order matters: a
``ckptsync pull`` moves to a new machine, see below).

How a command is run here (the substitutions, nothing else changes):
- ``s3://my-bucket/`` -> ``file://<tmp>/bucket/`` (a local remote; every backend is covered by
  the conformance suite in tests/conformance/);
- ``ckptsync`` -> ``<this python> -m ckptsync``; ``python`` -> this python; ``examples/`` ->
  the repository's; ``--steps 200`` -> ``--steps 40`` (speed);
- ``CMD &`` starts a background daemon (``CKPTSYNC_INTERVAL=1`` in its environment);
- a ``ckptsync pull`` is the "new machine": first every background daemon is left to finish
  its uploads and is stopped with SIGTERM (exit 0), then commands run in a fresh empty
  directory; ``ls``, ``verify`` and ``gc`` also wait for the daemons to finish (and stop them),
  so that they see what was uploaded.
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
import tomllib

from ckptsync.local import LocalStore
from ckptsync.watch import daemon_status
from tests.support.paths import REPO

pytestmark = pytest.mark.core

#: The documents whose commands run, in this order; every docs/*.md is one of them.
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")),
        REPO / "examples" / "zero_code" / "README.md"]
#: What ``python -m build`` names the wheel (the docs name it exactly).
WHEEL = f"ckptsync-{tomllib.loads((REPO / 'pyproject.toml').read_text())['project']['version']}" \
        "-py3-none-any.whl"
INSTALLED = ("tests/e2e/test_demo_installed.py::"
             "test_pip_install_beside_torch_keeps_it_and_runs_the_demo")

#: README command -> the test that mirrors it exactly (file::test).
MIRRORED = {
    "make demo": "tests/e2e/test_readme.py::test_make_targets_are_what_the_readme_says "
                 "(and .ci/run runs it; tests/e2e/test_demo.py runs the demo itself)",
    "ckptsync demo": f"{INSTALLED} (from an installed wheel, in an empty directory; "
                     "shorter, as tests/e2e/test_demo.py; .ci/run's make demo runs the default)",
    'pip install "ckptsync[torch,s3]"': f"{INSTALLED} (with every extra it names)",
    'pip install "ckptsync[torch,s3,gcs,gdrive]"': f"{INSTALLED} (with every extra it names)",
    f'pip install "dist/{WHEEL}[torch,s3]"': f"{INSTALLED} (installs the built wheel's path)",
    "python -m build": "tests/e2e/test_demo_installed.py::"
                       "test_build_makes_a_wheel_and_an_sdist_that_twine_accepts",
    **{cmd: "tests/integration/test_s3_endpoint_env.py::"
            "test_aws_endpoint_url_in_the_environment_is_the_s3_endpoint"
       for cmd in ("export AWS_ENDPOINT_URL=https://minio.internal:9000",
                   "export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...")},
    "make test": "tests/e2e/test_readme.py::test_make_targets_are_what_the_readme_says "
                 "(.ci/run runs it, as the first half of make test-full)",
    "make test-full": "tests/e2e/test_readme.py::test_make_targets_are_what_the_readme_says "
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
}

#: README command -> a substring its output must contain when run here ("" = exit 0 only).
RUN = {
    "ckptsync watch checkpoints s3://my-bucket/run-17 --keep-last 3 --create &": "",
    "python -m ckptsync.examples.train_tiny_lm --ckpt-dir checkpoints --steps 200 "
    "--save-every 20": "done: 40 steps",
    "ckptsync status checkpoints": "daemon:    running",
    "ckptsync watch runs/zc s3://my-bucket/zc-run --rule 'file:ckpt.pt' --create &": "",
    "python examples/zero_code/train.py --ckpt-dir runs/zc --steps 200 --save-every 20":
        "done at step 40",
    "ckptsync pull s3://my-bucket/run-17 checkpoints": "(step 40)",
    "python -m ckptsync.examples.train_tiny_lm --ckpt-dir checkpoints --steps 200 "
    "--save-every 20 --resume": "(step 40)",
    "ckptsync ls s3://my-bucket/run-17": "valid",
    "ckptsync verify s3://my-bucket/run-17": "ok ",
    "ckptsync gc s3://my-bucket/run-17 --keep-last 3 --dry-run": "0 checkpoint(s)",
    "ckptsync pull s3://my-bucket/zc-run runs/zc --rule 'file:ckpt.pt'": "runs/zc: ckpt.pt",
    "python examples/zero_code/train.py --ckpt-dir runs/zc --steps 200 --save-every 20 "
    "--resume": "resumed from runs/zc/ckpt.pt (step 40)",
}


def readme_commands(paths: list[Path] = DOCS) -> list[str]:
    """The shell commands of the documents' ```bash blocks, in order (comments dropped)."""
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
    assert "--tier core" in test.stdout and "--tier full" not in test.stdout
    # The full tier runs `make test` first (the core tier), then the rest: CI runs both.
    full = subprocess.run(["make", "-n", "test-full"], cwd=REPO, capture_output=True, text=True)
    assert full.returncode == 0
    assert full.stdout.index("--tier core") < full.stdout.index("--tier full")
    ci = (REPO / ".ci" / "run").read_text()
    assert ci.index("make test-full") < ci.index("make demo")


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
        if cmd.startswith(("ckptsync ls", "ckptsync verify", "ckptsync gc")):
            self.quiesce()  # what the remote holds once the daemons caught up
        if cmd.startswith("ckptsync pull"):
            self.quiesce()
            self.new_machine()
        r = subprocess.run(self.argv(cmd), cwd=self.cwd, env=self.env, capture_output=True,
                           text=True, timeout=300)
        # `status` right after training: 0 in sync, or 1 while the daemon still uploads.
        ok = (0, 1) if cmd.startswith("ckptsync status") else (0,)
        assert r.returncode in ok, f"{cmd}\n{r.stdout}\n{r.stderr}"
        assert RUN[cmd] in r.stdout, f"{cmd}: {RUN[cmd]!r} not in\n{r.stdout}"

    def close(self) -> None:
        for proc, _ in self.background:
            proc.kill()
            proc.wait()


@pytest.mark.full
def test_readme_commands_run_in_order(tmp_path: Path) -> None:
    ran = 0
    # The README and the guides are one story on one machine (then a new one); the zero-code
    # example is a recipe of its own, with its own bucket: the same prefix as the guides' would
    # be two runs in one prefix, which ckptsync refuses (docs/security.md, "One run per prefix").
    zero_code = REPO / "examples" / "zero_code" / "README.md"
    for i, paths in enumerate([[p for p in DOCS if p != zero_code], [zero_code]]):
        box = Sandbox(tmp_path / f"recipe{i}")
        try:
            for cmd in readme_commands(paths):
                if cmd in RUN:
                    box.run(cmd)
                    ran += 1
            box.quiesce()
        finally:
            box.close()
    assert ran >= len(RUN)


def _prose(text: str) -> str:
    """``text`` without its fenced code blocks (a ``# comment`` there is not a heading)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def anchors(path: Path) -> set[str]:
    """The anchors GitHub makes for ``path``'s headings: lower case, punctuation dropped,
    spaces as hyphens, ``-1``, ``-2``... for a repeated heading."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", _prose(path.read_text()), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_links_point_to_files_and_headings(path: Path) -> None:
    """Every relative link names a file that exists, and a ``#anchor`` one of its headings."""
    for target in re.findall(r"\]\(([^)\s]+)\)", _prose(path.read_text())):
        if "://" in target or target.startswith("mailto:"):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        assert dest.exists(), f"{path.name} links to missing {target}"
        if anchor:
            assert dest.suffix == ".md", f"{path.name}: an anchor into a non-Markdown {target}"
            assert anchor in anchors(dest), (
                f"{path.name} links to {target}: no such heading in {dest.name} "
                f"(it has {sorted(anchors(dest))})")


def test_every_guide_is_linked_from_the_readme_or_the_docs_index() -> None:
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)", (REPO / "README.md").read_text()))
    linked |= set(re.findall(r"\]\(([\w-]+\.md)", (REPO / "docs" / "README.md").read_text()))
    guides = {p.name for p in (REPO / "docs").glob("*.md")} - {"README.md"}
    assert guides <= linked, f"guides nobody links to: {sorted(guides - linked)}"
