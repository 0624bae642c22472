"""Lightning: a ``CheckpointIO`` plugin that saves atomically and uploads in the background.

Example::

    from ckptsync.integrations.lightning import CkptSyncCheckpointIO

    io = CkptSyncCheckpointIO("s3://bucket/run1")
    io.pull_latest("ckpts")              # a fresh machine: what "last" resumes from
    trainer = pl.Trainer(plugins=[io],
                         callbacks=[ModelCheckpoint(dirpath="ckpts", save_last=True)])
    trainer.fit(model, ckpt_path="last")

Remote layout: the ``lightning`` preset's (:func:`ckptsync.zerocode.presets.preset_rule`), one
zero-code checkpoint per saved ``.ckpt`` file: its manifest's step is the checkpoint's
``global_step`` and its one file sits at its path relative to the checkpoint directory, so
``ckptsync pull REMOTE ckpts`` restores it where Lightning resumes from, exactly as for a
remote that ``ckptsync watch ckpts REMOTE --preset lightning`` filled.

Each save writes the dict Lightning hands with ``torch.save`` (plain Lightning loads it) into
a private spool checkpoint inside the checkpoint directory, hashing while writing, fsyncs it,
commits it, and hard-links it into place with a rename: the file appears whole or not at all,
its bytes are written once. The uploads go through one
:class:`~ckptsync.transfer.queue.TransferQueue` keyed by the file's path: the newest version
of a file (``last.ckpt`` saved again) replaces its queued older version and keeps that one's
place in line, so while saves come faster than the link, ``last.ckpt`` still goes up at
least every other upload instead of waiting behind each new top-k file. After each upload
the remote versions a newer one replaced, and those of files Lightning deleted
(``save_top_k``), are retired. Only ckptsync checkpoints of this rule are ever deleted, never
the newest one, nor the one this process resumed from.

On a fresh machine, :func:`pull_latest` restores what ``fit(ckpt_path="last")`` reads: the
newest remote ``last.ckpt`` and the newest top-k file beside it; where that top-k file holds a
newer step (the run was killed between its upload and the one of ``last.ckpt``), it is also
linked as ``last.ckpt``, as ``ModelCheckpoint(save_last="link")`` does, so the resume starts
from the newest step that reached the remote (:mod:`.resume`).

The plugin is :mod:`.plugin`, the fresh machine's pull :mod:`.resume`. Lightning itself is
imported lazily (``lightning``, else ``pytorch_lightning``): importing this package does not
import it, and a missing framework is a :class:`ConfigError` naming the
``ckptsync[lightning]`` extra.
"""

from ckptsync.integrations.lightning.plugin import CkptSyncCheckpointIO
from ckptsync.integrations.lightning.resume import RULE, pull_latest

__all__ = ["RULE", "CkptSyncCheckpointIO", "pull_latest"]
