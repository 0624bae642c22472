"""``ckptsync demo`` from a wheel, outside any source checkout: what a user gets after
``pip install "ckptsync[torch,demo]"`` and no clone.

The wheel is built from a copy of what the package is made of (pyproject.toml, README.md,
ckptsync/; nothing from examples/ or tests/), offline (``--no-build-isolation``: the
setuptools of this venv). It is installed with ``--no-deps`` into a fresh venv whose only other
packages are this venv's, seen through a path line in a ``.pth`` file (what
``--system-site-packages`` would give, had torch been installed system-wide). A plain path
line does not run this venv's own ``.pth`` files, so the editable install of the checkout is
not seen: the ckptsync that runs is the wheel's, and the test checks it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.support.paths import package_source

pytestmark = pytest.mark.full

SHORT = ["--steps", "80", "--save-every", "10", "--kill-at", "55", "--no-progress"]


def _offline_env() -> dict[str, str]:
    # Nothing from this checkout on the path; no proxy (the Drive double may have set one).
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("PYTHON", "VIRTUAL_ENV"))
            and k.upper() not in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY")}


def _run(cmd: list[str], *, cwd: Path | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, env=_offline_env(), cwd=cwd,
                       timeout=timeout)
    assert r.returncode == 0, f"{cmd}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    src = package_source(root)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
          "--no-deps", "--no-build-isolation", "--no-index", "-w", str(root / "dist"),
          str(src)], timeout=300)
    (whl,) = (root / "dist").glob("ckptsync-*.whl")
    return whl


def test_the_wheel_ships_the_demo_trainer_and_its_corpus(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"ckptsync/examples/__init__.py", "ckptsync/examples/train_tiny_lm.py",
            "ckptsync/examples/data/tiny_corpus.txt"} <= names, sorted(names)


def test_demo_runs_from_an_installed_wheel_outside_the_checkout(
        wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q",
          "--disable-pip-version-check", "--no-deps", "--no-index", str(wheel)], timeout=300)
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
                .stdout.strip())
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "zz_test_deps.pth").write_text("".join(f"{d}\n" for d in sorted(deps)))

    elsewhere = tmp_path / "elsewhere"  # no ckptsync/, no examples/ anywhere above it
    elsewhere.mkdir()
    where = _run([str(py), "-c", "import ckptsync; print(ckptsync.__file__)"],
                 cwd=elsewhere).stdout.strip()
    assert Path(where).is_relative_to(site), f"ckptsync imported from {where}, not the wheel"

    r = subprocess.run([str(venv / "bin" / "ckptsync"), "demo", "--out", str(tmp_path / "out"),
                        *SHORT], capture_output=True, text=True, timeout=270, cwd=elsewhere,
                       env=_offline_env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.rstrip().splitlines()[-1] == "exact resume: yes", r.stdout
