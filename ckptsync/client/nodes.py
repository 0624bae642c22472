"""Which ranks share a local directory (a "node"), for sharded saves over several nodes.

A node is a (host, local directory) pair: the ranks of one machine that pass one directory
share it; another machine, or another directory on this one (two simulated nodes in the
tests), is another node. The lowest rank of each node leads it: it creates and commits that
node's part of a checkpoint (:mod:`ckptsync.parts`), applies local retention there, and
uploads it through its own uploader. Rank 0 leads node 0.
"""

from __future__ import annotations

import socket
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.distributed as dist

from ckptsync.client.uploader import Uploader
from ckptsync.errors import ConfigError

if TYPE_CHECKING:
    from ckptsync.client.checkpointer import Checkpointer

__all__ = ["Nodes", "adopt", "ensure_uploader", "nodes_of"]



@dataclass(frozen=True)
class Nodes:
    """``of[r]``: the node index of rank ``r`` (in order of each node's lowest rank)."""

    of: tuple[int, ...]
    rank: int

    @property
    def count(self) -> int:
        return max(self.of) + 1

    @property
    def mine(self) -> int:
        return self.of[self.rank]

    @property
    def leader(self) -> bool:
        """This rank is the lowest rank of its node."""
        return self.of.index(self.mine) == self.rank


def nodes_of(ckpt: Checkpointer) -> Nodes:
    """Collective (under ``torch.distributed``): every rank's node."""
    key = (socket.gethostname(), str(ckpt.store.directory.resolve()))
    keys: list[tuple[str, str]] = [key]
    if ckpt.world_size > 1:
        keys = [key] * ckpt.world_size
        dist.all_gather_object(keys, key)
    index: dict[tuple[str, str], int] = {}
    return Nodes(tuple(index.setdefault(k, len(index)) for k in keys), ckpt.rank)


_adopted: weakref.WeakSet[Checkpointer] = weakref.WeakSet()


def adopt(ckpt: Checkpointer, nodes: Nodes) -> None:
    """The first time this rank leads a node other than rank 0's: hold the node directory's
    writer lock and remove the leftovers of crashed saves there, as rank 0 does for its own
    directory when the Checkpointer is built (the lock goes when it closes).

    Raises:
        ConfigError: another Checkpointer writes in this node's directory.
    """
    if not nodes.leader or ckpt.rank == 0 or ckpt in _adopted:
        return
    if not ckpt.store.acquire_writer_lock():
        raise ConfigError(
            f"another Checkpointer ({ckpt.store.writer_lock_holder()}) is writing checkpoints "
            f"in {ckpt.store.directory} (node {nodes.mine}'s directory); one directory holds "
            "one run: give each run its own directory")
    ckpt.store.cleanup()
    _adopted.add(ckpt)


def ensure_uploader(ckpt: Checkpointer) -> None:
    """A node leader other than rank 0 uploads its node's part: give it an uploader (rank 0
    has had one since construction)."""
    if ckpt.remote is not None and ckpt._uploader is None:
        ckpt._uploader = Uploader(ckpt.remote, on_error=ckpt.on_remote_error,
                                  after_push=ckpt._after_push)
