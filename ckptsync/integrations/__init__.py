"""ckptsync for the training frameworks most people use, one module (or package) each.

- ``transformers``: a Hugging Face ``Trainer`` callback that syncs each ``checkpoint-N/``.
- ``lightning``: a Lightning ``CheckpointIO`` plugin, and what a fresh machine pulls so that
  ``fit(ckpt_path="last")`` resumes at the newest uploaded step.
- ``accelerate``: sync what ``Accelerator.save_state`` writes, pull before ``load_state``.

Importing ``ckptsync`` never imports a framework or this package. ``lightning`` and
``accelerate`` import their framework on first use; ``transformers`` imports it with the
module (its callback subclasses ``transformers.TrainerCallback``). A module whose framework is
missing fails with a :class:`~ckptsync.errors.ConfigError` naming the extra to install
(``ckptsync[hf]``, ``ckptsync[lightning]``, ``ckptsync[accelerate]``).
"""
