"""Where the repository and the test support live, and the environment of the subprocesses
the tests start (the repository first on ``PYTHONPATH``: ``ckptsync`` and ``tests.support``
import from this checkout). Torch-free."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

SUPPORT = Path(__file__).resolve().parent
SCRIPTS = SUPPORT / "scripts"
TESTS = SUPPORT.parent
REPO = TESTS.parent
EXAMPLE = REPO / "examples" / "train_tiny_lm.py"
PY = sys.executable


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child: the repository on ``PYTHONPATH``, unbuffered
    output, one OpenMP thread, then ``extra``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def package_source(dest: Path) -> Path:
    """Copy what a pip build of ckptsync reads (pyproject.toml, README.md, LICENSE, ckptsync/)
    into ``dest/src``, so that a build writes nothing into the checkout; returns ``dest/src``."""
    src = dest / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "ckptsync", src / "ckptsync",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return src
