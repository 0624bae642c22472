"""The zero-code model: which files a trainer writes form one checkpoint, and how a version of
them goes back where the trainer resumes from.

Used by the watch daemon (:mod:`ckptsync.daemon`: it takes and pushes versions), by the
command line (``ckptsync pull`` of a zero-code checkpoint) and by the integrations (each
uploads through a preset's rule and resumes through :func:`restore_watched`). It sits below
all three and above the core modules (manifest, local store); nothing here imports torch.
Modules, lowest layer first:

- ``contentstep``: the training step a zero-code file's content says it holds.
- ``rules``: :class:`WatchRule` (which files form one checkpoint), glob matching, completeness.
- ``presets``: the rule of each framework's own checkpoint layout (``--preset NAME``).
- ``restore``: :func:`restore_watched`, zero-code checkpoints back at their original paths.
"""

from __future__ import annotations

from ckptsync.zerocode.contentstep import content_step
from ckptsync.zerocode.presets import PRESETS, preset_rule
from ckptsync.zerocode.restore import check_watched, restore_watched
from ckptsync.zerocode.rules import (
    WATCHED,
    WatchRule,
    check_complete,
    is_watched,
    structure_complete,
)

__all__ = [
    "PRESETS",
    "WATCHED",
    "WatchRule",
    "check_complete",
    "check_watched",
    "content_step",
    "is_watched",
    "preset_rule",
    "restore_watched",
    "structure_complete",
]
