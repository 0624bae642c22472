"""ckptsync for the training frameworks most people use, one module each.

- ``transformers``: a Hugging Face ``Trainer`` callback that syncs each ``checkpoint-N/``.
- ``lightning``: a Lightning ``CheckpointIO`` plugin.
- ``accelerate``: sync what ``Accelerator.save_state`` writes, pull before ``load_state``.

Each module imports its framework lazily (inside functions or on first use), so importing
``ckptsync`` never imports a framework, and a module whose framework is missing fails with a
:class:`~ckptsync.errors.ConfigError` naming the extra to install (``ckptsync[hf]``,
``ckptsync[lightning]``, ``ckptsync[accelerate]``).
"""
