"""The package as a user gets it: ``python -m build`` makes a wheel and an sdist that
``twine check`` accepts, ``pip install "ckptsync[torch,...]"`` next to an installed torch leaves
that torch alone, and ``ckptsync demo`` runs from the installed wheel in an empty directory,
outside any source checkout.

The build reads a copy of what the package is made of (pyproject.toml, README.md, LICENSE,
ckptsync/; nothing from examples/ or tests/), offline (``--no-isolation``: the setuptools of this
venv). Installs are offline too (``--no-index``): every dependency must be met by what is
already installed, so a requirement that the installed torch did not meet fails here instead of
downloading a CUDA build. "Already installed" is this venv's packages (torch 2.13.0 among
them) without ckptsync's own editable install: a folder of links to them, on the fresh venv's
path through a ``.pth`` line, which is what ``--system-site-packages`` gives over a Python that
has torch.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from email.parser import HeaderParser
from pathlib import Path

import pytest

from tests.support.paths import REPO, package_source

pytestmark = pytest.mark.full

SHORT = ["--steps", "80", "--save-every", "10", "--kill-at", "55", "--no-progress"]
EXTRAS = "torch,s3,gcs,gdrive,demo"  # every extra the README and the notebook install with


def _offline_env() -> dict[str, str]:
    # Nothing from this checkout on the path; no proxy (the Drive double may have set one).
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PIP_"))
            and k.upper() not in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY")}


def _run(cmd: list[str], *, cwd: Path | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, env=_offline_env(), cwd=cwd,
                       timeout=timeout)
    assert r.returncode == 0, f"{cmd}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``python -m build`` of the package: ``dist/`` with one wheel and one sdist."""
    root = tmp_path_factory.mktemp("build")
    src = package_source(root)
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(root / "dist"),
          str(src)], timeout=300)
    return root / "dist"


@pytest.fixture(scope="module")
def wheel(dist: Path) -> Path:
    (whl,) = dist.glob("ckptsync-*.whl")
    return whl


def _installed_site(root: Path, replace: dict[str, str] | None = None) -> Path:
    """A folder of links to this venv's installed packages, ckptsync's own install left out:
    what a machine with torch and ckptsync's dependencies, but no ckptsync, has installed.
    ``replace`` maps a distribution name to the version its metadata claims instead."""
    farm = root / "installed"
    farm.mkdir()
    for site in sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}):
        for entry in Path(site).iterdir():
            if re.match(r"(?i)(ckptsync|__editable__)", entry.name) or (farm / entry.name).exists():
                continue
            name = entry.name.split("-")[0].lower()
            if replace and entry.name.endswith(".dist-info") and name in replace:
                info = farm / f"{name}-{replace[name]}.dist-info"
                info.mkdir()
                meta = (entry / "METADATA").read_text()
                (info / "METADATA").write_text(
                    re.sub(r"^Version: .*$", f"Version: {replace[name]}", meta, count=1,
                           flags=re.M))
                continue
            (farm / entry.name).symlink_to(entry)
    return farm


def _venv_over(root: Path, installed: Path) -> Path:
    """A fresh venv that sees ``installed`` as its system site packages; its python."""
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
                .stdout.strip())
    (site / "zz_installed.pth").write_text(f"{installed}\n")
    return py


def _pip(py: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``pip install --no-index`` into ``py``'s venv, with no pip configuration (this machine's
    adds a folder of wheels, torch's among them, which would hide a torch pip wants)."""
    cmd = [sys.executable, "-m", "pip", "--python", str(py), "install", "--no-index",
           "--disable-pip-version-check", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env={**_offline_env(), "PIP_CONFIG_FILE": os.devnull})
    assert r.returncode == 0, f"{cmd}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _torch(py: Path) -> str:
    return _run([str(py), "-c", "import torch; print(torch.__version__, torch.__file__)"],
                timeout=120).stdout.strip()


def test_build_makes_a_wheel_and_an_sdist_that_twine_accepts(dist: Path) -> None:
    files = sorted(p.name for p in dist.iterdir())
    assert len(files) == 2 and {f.rsplit(".", 1)[1] for f in files} == {"whl", "gz"}, files
    r = _run([sys.executable, "-m", "twine", "check", "--strict", *map(str, dist.iterdir())])
    assert r.stdout.count("PASSED") == 2, r.stdout

    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    # Every module of the package, subpackages included (a package missing from the sdist
    # installs without it).
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "ckptsync").rglob("*.py")
               if "__pycache__" not in p.parts}
    assert "ckptsync/integrations/lightning/plugin.py" in modules
    missing = ({"LICENSE", "README.md", "pyproject.toml", "ckptsync/examples/data/tiny_corpus.txt"}
               | modules) - names
    assert not missing, f"not in the sdist: {sorted(missing)}"

    (whl,) = dist.glob("*.whl")
    with zipfile.ZipFile(whl) as z:
        info = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = HeaderParser().parsestr(z.read(info).decode())
        assert any(n.endswith(".dist-info/licenses/LICENSE") for n in z.namelist())
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta["Description-Content-Type"] == "text/markdown"
    # The README as PyPI renders it (twine check passes a Markdown README it cannot render).
    from readme_renderer.markdown import render

    html = render(meta.get_payload())
    assert html and 'id="user-content-install"' in html, "the README did not render"
    assert "Crash-safe PyTorch checkpoints" in html and "runnable:" not in html
    assert meta.get_all("Author") or meta.get_all("Author-email")
    assert "Development Status :: 3 - Alpha" in meta.get_all("Classifier")
    torch_req = [r for r in meta.get_all("Requires-Dist") if r.startswith("torch")]
    assert torch_req == ['torch>=2.9; extra == "torch"'], torch_req


def test_the_wheel_ships_the_demo_trainer_and_its_corpus(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"ckptsync/examples/__init__.py", "ckptsync/examples/train_tiny_lm.py",
            "ckptsync/examples/data/tiny_corpus.txt"} <= names, sorted(names)


def test_pip_install_beside_torch_keeps_it_and_runs_the_demo(wheel: Path, tmp_path: Path) -> None:
    """The built wheel, installed by its path with every extra (docs/install.md's line): the
    torch already there is kept, version and files, and the installed ``ckptsync demo`` runs
    in an empty directory."""
    py = _venv_over(tmp_path, _installed_site(tmp_path))
    before = _torch(py)
    r = _pip(py, f"{wheel}[{EXTRAS}]")
    assert "Requirement already satisfied: torch" in r.stdout, r.stdout
    installed = re.findall(r"^Successfully installed (.*)$", r.stdout, flags=re.M)
    assert [line.split() for line in installed] == [[wheel.name.split("-py3")[0]]], r.stdout
    assert _torch(py) == before

    empty = tmp_path / "empty"  # no ckptsync/, no examples/ anywhere above it
    empty.mkdir()
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
                .stdout.strip())
    where = _run([str(py), "-c", "import ckptsync; print(ckptsync.__file__)"],
                 cwd=empty).stdout.strip()
    assert Path(where).is_relative_to(site), f"ckptsync imported from {where}, not the wheel"

    r = subprocess.run([str(py.parent / "ckptsync"), "demo", *SHORT], capture_output=True,
                       text=True, timeout=270, cwd=empty, env=_offline_env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.rstrip().splitlines()[-1] == "exact resume: yes", r.stdout
    assert (empty / "demo-out" / "report.json").is_file()


def test_pip_keeps_a_torch_as_old_as_the_newest_api_ckptsync_uses(dist: Path,
                                                                   tmp_path: Path) -> None:
    """On a machine whose torch is 2.9 (DCP's DefaultStager, the newest torch API ckptsync
    uses: pyproject.toml), ``pip install "ckptsync[torch,...]"``, by name, has nothing to
    install but ckptsync: it never replaces that torch (from PyPI, a multi-GB CUDA build)."""
    py = _venv_over(tmp_path, _installed_site(tmp_path, replace={"torch": "2.9.0"}))
    assert _torch(py).startswith("2.13.0")  # the code is 2.13's; pip sees the metadata's 2.9.0
    r = _pip(py, "--dry-run", "--find-links", str(dist), f"ckptsync[{EXTRAS}]")
    assert re.search(r"^Requirement already satisfied: torch>=2\.9 .*\(2\.9\.0\)$", r.stdout,
                     flags=re.M), r.stdout
    (whl,) = dist.glob("*.whl")
    assert re.findall(r"^Would install (.*)$", r.stdout, flags=re.M) == [
        whl.name.split("-py3")[0]], r.stdout
