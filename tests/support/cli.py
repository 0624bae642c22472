"""Running the ``ckptsync`` command line in a subprocess, as a user would (torch-free)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.support.paths import REPO


def cli_env(**extra: str) -> dict[str, str]:
    """This process's environment with its ``sys.path`` and quick retries, then ``extra``."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "CKPTSYNC_RETRIES": "2",
            "CKPTSYNC_BACKOFF_INITIAL": "0", **extra}


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m ckptsync.cli ARGS`` from the repository root; its output captured."""
    return subprocess.run([sys.executable, "-m", "ckptsync.cli", *args], capture_output=True,
                          text=True, timeout=120, cwd=REPO, env=cli_env(**env))
