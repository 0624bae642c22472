"""Which ranks share a local directory (a "node"), for sharded saves over several nodes.

A node is a (host, local directory) pair: the ranks of one machine that pass one directory
share it; another machine, or another directory on this one (two simulated nodes in the
tests), is another node. The lowest rank of each node leads it: it creates and commits that
node's part of a checkpoint (:mod:`ckptsync.parts`), applies local retention there, and
uploads it through its own uploader. Rank 0 leads node 0.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import torch.distributed as dist

from ckptsync.local import LocalStore

__all__ = ["NodeDirectory", "Nodes", "nodes_of"]


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


def nodes_of(store: LocalStore, rank: int, world_size: int) -> Nodes:
    """Collective (under ``torch.distributed``): every rank's node, for this rank's
    ``store``."""
    key = (socket.gethostname(), str(store.directory.resolve()))
    keys: list[tuple[str, str]] = [key]
    if world_size > 1:
        keys = [key] * world_size
        dist.all_gather_object(keys, key)
    index: dict[tuple[str, str], int] = {}
    return Nodes(tuple(index.setdefault(k, len(index)) for k in keys), rank)


class NodeDirectory:
    """This rank's hold on its node's directory ``store``: rank 0 takes it when its
    Checkpointer is built; the leader of another node takes it with :meth:`adopt`."""

    def __init__(self, store: LocalStore, rank: int) -> None:
        self.store = store
        self.rank = rank
        self._adopted = False

    def adopt(self, nodes: Nodes) -> None:
        """The first time this rank leads a node other than rank 0's: hold the node
        directory's writer lock and remove the leftovers of crashed saves there, as rank 0
        does for its own directory when the Checkpointer is built (the lock goes when it
        closes).

        Raises:
            ConfigError: another Checkpointer writes in this node's directory.
        """
        if not nodes.leader or self.rank == 0 or self._adopted:
            return
        self.store.claim(f" (node {nodes.mine}'s directory)", "give each run its own directory")
        self._adopted = True
