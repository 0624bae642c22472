"""Zero-code presets: the watch rule for a framework's own checkpoint layout.

``ckptsync watch DIR URL --preset NAME`` is ``--rule PRESETS[NAME]``. The integrations in
:mod:`ckptsync.integrations` upload through the same rules, so a checkpoint that an
integration uploaded and one that ``watch --preset`` uploaded have the same remote layout, and
``ckptsync pull`` restores either at the paths the framework resumes from.
"""

from __future__ import annotations

from ckptsync.errors import ConfigError

__all__ = ["PRESETS", "preset_rule"]

#: preset name -> watch rule (see :mod:`ckptsync.zerocode.rules` for the syntax).
PRESETS: dict[str, str] = {
    # Checked against transformers 5.23 (Trainer._save_checkpoint): config, weights (safetensors
    # renamed in from a .tmp file), training_args, optimizer, scheduler, rng_state, and
    # trainer_state.json last; old checkpoint-N/ are deleted by save_total_limit.
    "hf-trainer": "dir:checkpoint-*:trainer_state.json",
    # Checked against accelerate 1.15 (Accelerator.save_state with ProjectConfiguration(
    # automatic_checkpoint_naming=True)): model, optimizer, scheduler, sampler, then
    # random_states_<process>.pkl; the register_for_checkpointing objects
    # (custom_checkpoint_<i>.pkl) follow in the same call, so no file is always last: the
    # marker is process 0's RNG file and the quiet time (--settle) takes the rest. A kill in
    # the instant between the two can leave a version without custom_checkpoint_<i>.pkl.
    "accelerate": "dir:checkpoints/checkpoint_*:random_states_0.pkl",
    # Checked against lightning 2.6.6: ModelCheckpoint saves through fsspec in a transaction:
    # a temp file in the system temp dir moved into place (a rename on the same file system,
    # a copy, i.e. written in place, across file systems), epoch=E-step=S.ckpt then
    # last.ckpt, the older one deleted. The rule takes every .ckpt under the root dir
    # (lightning_logs/version_N/checkpoints/ or dirpath) as one version.
    "lightning": "file:**/*.ckpt",
    # Checked against torch 2.13: dcp.save writes __<rank>_<n>.distcp, then .metadata.tmp
    # renamed to .metadata last (after every rank's files). One directory per checkpoint_id.
    "dcp": "dir:*:.metadata",
}


def preset_rule(name: str) -> str:
    """The watch rule of preset ``name``; :class:`ConfigError` naming the presets if unknown."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown preset {name!r}: use one of {', '.join(sorted(PRESETS))}") from None
