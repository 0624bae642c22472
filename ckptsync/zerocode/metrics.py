"""The metrics a framework recorded with a zero-code checkpoint, read from what it wrote, so
that ``ckptsync ls`` shows them and remote retention (``--keep-best``) can rank zero-code
versions as it ranks native checkpoints.

Two places say them, without running anything in the checkpoint:

- a Hugging Face ``trainer_state.json``: the newest value of each number in its
  ``log_history`` (``loss``, ``eval_loss``, ``eval_accuracy``, ``learning_rate``, ...), and its
  ``best_metric`` (the value of ``metric_for_best_model`` at the best checkpoint);
- a file name of the form Lightning's ``ModelCheckpoint`` writes (``filename=
  "{epoch}-{val_loss:.3f}"`` gives ``epoch=3-val_loss=0.123.ckpt``): each ``NAME=NUMBER``.

``step`` and ``global_step`` are the checkpoint's step, not a metric; non-finite values are
dropped. Nothing here imports torch.

Example::

    content_metrics(Path("out"), ["checkpoint-500/trainer_state.json", ...])
    # {"loss": 0.41, "eval_loss": 0.52, "best_metric": 0.52, "epoch": 1.0, ...}
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

__all__ = ["content_metrics", "name_metrics", "trainer_state_metrics"]

TRAINER_STATE = "trainer_state.json"
MAX_JSON = 64 << 20
_NOT_METRICS = {"step", "global_step", "total_flos", "train_runtime"}
_NAME_PAIR = re.compile(r"(?:^|[-_ ])([A-Za-z][\w.]*?)=([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
                        r"(?=$|[-_ ]|\.[A-Za-z])")


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def trainer_state_metrics(path: Path) -> dict[str, float]:
    """The metrics of a Hugging Face ``trainer_state.json`` (see the module doc), or {}."""
    try:
        if path.stat().st_size > MAX_JSON:
            return {}
        state = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    if not isinstance(state, dict):
        return {}
    out: dict[str, float] = {}
    for entry in state.get("log_history") or []:
        if isinstance(entry, dict):
            for k, v in entry.items():
                if isinstance(k, str) and k not in _NOT_METRICS and (f := _number(v)) is not None:
                    out[k] = f  # newer entries come later: the newest value wins
    if (best := _number(state.get("best_metric"))) is not None:
        out["best_metric"] = best
    return out


def name_metrics(filename: str) -> dict[str, float]:
    """``NAME=NUMBER`` pairs of a file name (Lightning's ``epoch=3-val_loss=0.123.ckpt``)."""
    out: dict[str, float] = {}
    for k, v in _NAME_PAIR.findall(filename):
        if k not in _NOT_METRICS and (f := _number(float(v))) is not None:
            out[k] = f
    return out


def content_metrics(root: Path, rels: list[str]) -> dict[str, float]:
    """The metrics of one zero-code version (files ``rels`` under ``root``): its
    ``trainer_state.json`` where it has one, else the ``NAME=NUMBER`` pairs of its file names
    (the first file that has any); {} when nothing says."""
    for rel in rels:
        if rel.rsplit("/", 1)[-1] == TRAINER_STATE:
            found = trainer_state_metrics(root / rel)
            if found:
                return found
    for rel in rels:
        found = name_metrics(rel.rsplit("/", 1)[-1])
        if found:
            return found
    return {}
