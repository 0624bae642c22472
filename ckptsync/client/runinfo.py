"""What a checkpoint records about the run that wrote it: rank and world size, the versions,
host and git revision (``meta``), and metrics as plain floats."""

from __future__ import annotations

import platform
import socket
import subprocess
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from ckptsync.version import __version__

__all__ = ["dist_info", "git_revision", "run_meta", "scalars"]


def git_revision() -> str | None:
    """The working directory's git commit, or None (not a repository, no git, too slow)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=2, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    rev = out.stdout.strip()
    return rev if out.returncode == 0 and rev else None


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)``: ``(0, 1)`` outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def run_meta(world_size: int, git: str | None, objects: Mapping[str, Any],
             stall: float) -> dict[str, Any]:
    """The manifest's ``meta`` of one save that stalled training ``stall`` seconds."""
    meta: dict[str, Any] = {
        "world_size": world_size,
        "torch": torch.__version__,
        "ckptsync": __version__,
        "python": platform.python_version(),
        "host": socket.gethostname(),
        "objects": {k: type(v).__name__ for k, v in objects.items()},
        "stall_s": round(stall, 6),
    }
    if git:
        meta["git_revision"] = git
    return meta


def scalars(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """``metrics`` as plain floats (a 0-d tensor becomes its value)."""
    return {k: float(v.item() if isinstance(v, torch.Tensor) else v)
            for k, v in (metrics or {}).items()}
