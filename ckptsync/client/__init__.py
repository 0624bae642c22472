"""The torch side of ckptsync: what a training script imports to save and resume.

- ``checkpointer``: :class:`Checkpointer`, the one entry point (save, wait, close, retention).
- ``restore``: choosing, verifying and loading the checkpoint to resume from (RestoreInfo).
- ``state``: capturing and restoring training state: state dicts, safety checks, buffers, RNG.
- ``snapshot``: the background worker behind asynchronous saves and their SaveHandle.
- ``sharded``: sharded state (FSDP2, DTensor) saved and restored through
  torch.distributed.checkpoint, every rank's files in the one manifest.
- ``ranks``: the exchanges between ranks: a failure on any rank raises on every rank.
- ``runinfo``: what a checkpoint records about its run (meta, metrics as floats).
- ``uploader``: the in-process, bounded upload of committed checkpoints to a remote.

Importing this package imports torch; ``import ckptsync`` alone does not.
"""

from __future__ import annotations

from ckptsync.client.checkpointer import Checkpointer
from ckptsync.client.restore import RestoreInfo
from ckptsync.client.snapshot import SaveHandle
from ckptsync.client.uploader import SyncStatus

__all__ = ["Checkpointer", "RestoreInfo", "SaveHandle", "SyncStatus"]
