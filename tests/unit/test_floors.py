"""The declared dependency floors are true. ``make test-floors`` runs the suite with
the versions in requirements/floors.txt and floors-torch.txt; this checks that those are
exactly the ``>=`` floors of pyproject.toml, so the two cannot drift apart.

torch is the one exception: its floor is the oldest torch with every API ckptsync
uses, each named beside it in pyproject.toml, so that installing ckptsync never replaces a torch
that works; the floors job runs the lowest torch it can install here instead, and the Makefile
says which and why."""

from __future__ import annotations

import re
import subprocess

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

from tests.support.paths import REPO

pytestmark = pytest.mark.core

#: The extras the floors job installs at their floors, besides the core dependencies.
FLOOR_EXTRAS = ("torch", "s3", "gcs")
FLOOR_FILES = ("requirements/floors.txt", "requirements/floors-torch.txt")


def declared_floors() -> dict[str, Version]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [*project["dependencies"],
            *(r for extra in FLOOR_EXTRAS for r in project["optional-dependencies"][extra])]
    floors = {}
    for text in reqs:
        req = Requirement(text)
        lower = [s.version for s in req.specifier if s.operator == ">="]
        assert len(lower) == 1, f"pyproject.toml: {text!r} needs exactly one >= floor"
        floors[req.name.lower()] = Version(lower[0])
    return floors


def pinned() -> dict[str, Version]:
    pins = {}
    for name in FLOOR_FILES:
        for line in (REPO / name).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line:
                m = re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+)==(\S+)", line)
                assert m, f"{name}: {line!r} is not an exact pin (NAME==VERSION)"
                pins[Requirement(m[1]).name.lower()] = Version(m[2])
    return pins


#: Floors the floors job cannot install exactly (see the Makefile's test-floors comment).
UNINSTALLABLE_FLOORS = ("torch",)


def test_floor_files_pin_exactly_the_declared_floors() -> None:
    floors, pins = declared_floors(), pinned()
    assert {"fsspec", "s3fs", "gcsfs", "watchdog", "tqdm", "tenacity", "blake3",
            "torch", "numpy"} <= set(floors)
    wrong = {n: (str(v), str(pins.get(n))) for n, v in floors.items()
             if pins.get(n) != v and n not in UNINSTALLABLE_FLOORS}
    assert not wrong, (f"pyproject.toml floor vs requirements/floors*.txt pin: {wrong}; "
                       "raise both together (make test-floors proves the new floor)")


def torch_api_versions() -> list[Version]:
    """The release of each torch API listed beside the torch extra in pyproject.toml."""
    text = (REPO / "pyproject.toml").read_text()
    block = text[text.index("# Each API, with the release"):text.index('torch = ["torch>=')]
    return [Version(v) for v in re.findall(r"^#   (?!\().*?\s(\d+\.\d+)$", block, flags=re.M)]


def test_torch_floor_is_the_newest_torch_api_ckptsync_uses() -> None:
    """Not the newest torch that is convenient to test: a floor above what the code needs makes
    ``pip install ckptsync[torch]`` replace a working torch (a multi-GB CUDA build on PyPI)."""
    apis = torch_api_versions()
    assert len(apis) >= 5, apis
    assert declared_floors()["torch"] == max(apis), (
        f"torch floor {declared_floors()['torch']} is not the newest API listed ({max(apis)})")


def test_floors_job_runs_the_lowest_installable_torch_and_says_why() -> None:
    floor, pin = declared_floors()["torch"], pinned()["torch"]
    assert pin >= floor
    if pin != floor:
        makefile = (REPO / "Makefile").read_text()
        comment = makefile[:makefile.index("test-floors:")]
        assert f"torch {pin}" in comment and f"({floor})" in comment, (
            "the Makefile's test-floors comment must name the torch it runs and the floor")


def test_fsspec_floor_has_create_only_writes() -> None:
    """Every commit writes its manifest with ``pipe_file(mode="create")``: fsspec 2024.12."""
    assert declared_floors()["fsspec"] >= Version("2024.12")


def test_make_test_floors_runs_the_conformance_suite_with_the_floors() -> None:
    p = subprocess.run(["make", "-n", "-B", "test-floors"], cwd=REPO, capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr
    assert "-r requirements/floors.txt" in p.stdout and "--no-deps -e ." in p.stdout
    assert "pip check" in p.stdout
    assert "-p tests.support.no_torch tests/conformance" in p.stdout
    assert "CKPTSYNC_STORE_BACKENDS=file,seaweedfs" in p.stdout
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert ci.index("make test-full") < ci.index("make test-floors")
