"""Zero-code presets: the watch rule for a framework's own checkpoint layout.

``ckptsync watch DIR URL --preset NAME`` is ``--rule PRESETS[NAME]``. The integrations in
:mod:`ckptsync.integrations` upload through the same rules, so a checkpoint that an
integration uploaded and one that ``watch --preset`` uploaded have the same remote layout, and
``ckptsync pull`` restores either at the paths the framework resumes from.
"""

from __future__ import annotations

from ckptsync.errors import ConfigError

__all__ = ["PRESETS", "preset_rule"]

#: preset name -> watch rule (see :mod:`ckptsync.daemon.rules` for the syntax).
PRESETS: dict[str, str] = {
    # Trainer._save_checkpoint writes trainer_state.json after the weights and optimizer.
    "hf-trainer": "dir:checkpoint-*:trainer_state.json",
    # Accelerator.save_state with ProjectConfiguration(automatic_checkpoint_naming=True).
    "accelerate": "dir:checkpoints/checkpoint_*:random_states_0.pkl",
    # ModelCheckpoint's files, written in place by torch.save through fsspec.
    "lightning": "file:**/*.ckpt",
    # torch.distributed.checkpoint writes .metadata last (after every rank's files).
    "dcp": "dir:*:.metadata",
}


def preset_rule(name: str) -> str:
    """The watch rule of preset ``name``; :class:`ConfigError` naming the presets if unknown."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown preset {name!r}: use one of {', '.join(sorted(PRESETS))}") from None
