"""The two ways a :class:`~ckptsync.client.Checkpointer` saves and restores, behind one
interface: :class:`SaveStrategy`, and the :class:`Context` each one works with.

- :class:`~ckptsync.client.replicated.Replicated`: state every rank holds alike (a model,
  DDP's replicas): rank 0 snapshots and writes it, every rank learns the outcome.
- :class:`~ckptsync.client.sharded.Sharded`: sharded state (FSDP2, DTensors) through
  ``torch.distributed.checkpoint``: every rank writes its own files into the one checkpoint.

The Checkpointer holds both (the sharded one from its first use: it imports DCP) and picks
one per call, in one place. A strategy sees the Checkpointer's parts, never the Checkpointer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ckptsync.client.saves import Saves
from ckptsync.client.sync import RunSync
from ckptsync.local import LocalStore

if TYPE_CHECKING:
    from ckptsync.client.restore import RestoreInfo
    from ckptsync.client.snapshot import SaveHandle
    from ckptsync.crypto import KeyRing
    from ckptsync.manifest import Manifest
    from ckptsync.remote import RemoteStore

__all__ = ["Context", "SaveStrategy"]


@dataclass(frozen=True)
class Context:
    """What a save strategy works with, on this rank (``rank`` of ``world_size``).

    ``saves`` runs the background saves; ``sync`` takes every committed checkpoint (uploads,
    retention); ``capture_rng`` whether RNG states are saved and restored; ``git`` the
    working directory's git revision (for the manifest); ``keys``, ``encrypt_local`` and
    ``allow_plaintext`` as the Checkpointer's arguments.
    """

    rank: int
    world_size: int
    store: LocalStore
    remote: RemoteStore | None
    saves: Saves
    sync: RunSync
    capture_rng: bool
    git: str | None
    keys: KeyRing | None
    encrypt_local: bool
    allow_plaintext: bool = False


class SaveStrategy(Protocol):
    """One way to save and restore a checkpointer's objects (called on every rank)."""

    def save(self, step: int | None, objects: Mapping[str, Any],
             metrics: Mapping[str, Any] | None, extra: Any) -> SaveHandle[Manifest | None]:
        """Snapshot ``objects`` and commit them in the background (see
        :meth:`Checkpointer.save <ckptsync.client.Checkpointer.save>`)."""
        ...

    def restore(self, name: str | None, objects: Mapping[str, Any],
                map_location: Any) -> RestoreInfo | None:
        """Load checkpoint ``name`` (None: the newest usable one) into ``objects`` (see
        :meth:`Checkpointer.restore <ckptsync.client.Checkpointer.restore>`)."""
        ...
