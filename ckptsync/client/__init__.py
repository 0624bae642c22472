"""The torch side of ckptsync: what a training script imports to save and resume.

- ``checkpointer``: :class:`Checkpointer`, the one entry point; it composes the parts below
  and picks a save strategy per call.
- ``strategy``: :class:`SaveStrategy`, the interface of the two ways to save and restore, and
  the :class:`Context` they work with; ``replicated`` (rank 0 writes) and ``sharded`` (every
  rank writes through torch.distributed.checkpoint, every rank's files in the one manifest)
  are the two; ``sharded_restore``, ``dcp_state`` and ``nodes`` (which ranks share a
  directory) serve the sharded one.
- ``saves``: the background saves and, under torch.distributed, the commit outcome to share.
- ``sync``: what becomes of a committed checkpoint: the upload (``uploader``: the in-process,
  bounded upload to a remote) and retention.
- ``restore``: choosing, verifying and loading the checkpoint to resume from (RestoreInfo).
- ``state``: capturing and restoring training state: state dicts, safety checks, buffers, RNG.
- ``snapshot``: the background worker behind asynchronous saves and their SaveHandle.
- ``writer``: one checkpoint's files written, hashed and (optionally) encrypted, then committed.
- ``ranks``: the exchanges between ranks: a failure on any rank raises on every rank.
- ``runinfo``: what a checkpoint records about its run (meta, metrics as floats).

Importing this package imports torch; ``import ckptsync`` alone does not.
"""

from __future__ import annotations

from ckptsync.client.checkpointer import Checkpointer
from ckptsync.client.restore import RestoreInfo
from ckptsync.client.snapshot import SaveHandle
from ckptsync.client.syncstatus import SyncStatus

__all__ = ["Checkpointer", "RestoreInfo", "SaveHandle", "SyncStatus"]
