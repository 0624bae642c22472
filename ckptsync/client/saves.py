"""The background saves of one :class:`~ckptsync.client.Checkpointer`, and under
``torch.distributed`` the commit outcome every rank has yet to learn.

One save runs at a time on a :class:`~ckptsync.client.snapshot.BackgroundWorker`. A
replicated save is written by rank 0 alone, so the other ranks hold a handle whose outcome
is rank 0's: :meth:`Saves.settle` is the collective that shares it (at the first, on each
rank, of the handle's ``wait()``, the next ``save``, ``wait``, ``close`` or ``restore``). A
sharded save runs on every rank, whose collectives already tell each rank how it went.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from ckptsync.client import ranks
from ckptsync.client.snapshot import BackgroundWorker, SaveHandle
from ckptsync.errors import CkptSyncError

__all__ = ["Saves"]

T = TypeVar("T")


class Saves:
    """The one background worker of a checkpointer on this rank (``rank`` of
    ``world_size``), plus the outcome of rank 0's commit still to share."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size
        self._worker = BackgroundWorker()
        # The save whose outcome every rank has yet to learn (see settle); None when none.
        self._pending: Future[Any] | None = None

    def submit(self, job: Callable[[], T], name: str, *, shared: bool) -> SaveHandle[T]:
        """Run ``job`` in the background; its handle. ``shared``: a replicated save on rank 0,
        whose outcome :meth:`settle` shares with every rank (under torch.distributed)."""
        collective = shared and self.world_size > 1
        handle = self._worker.submit(job, name, settle=self.settle if collective else None)
        if collective:
            self._pending = handle.future
        return handle

    def awaiting_rank0(self, name: str) -> SaveHandle[Any]:
        """On a rank other than 0: the handle of rank 0's replicated save ``name``, completed
        by :meth:`settle` with rank 0's manifest or its error."""
        future: Future[Any] = Future()
        self._pending = future
        return SaveHandle(future, name, settle=self.settle)

    def settle(self) -> None:
        """Drain the in-flight save. Under torch.distributed, when a save is pending (on every
        rank alike: ``save`` set it on each), this is the collective that shares its outcome:
        rank 0's manifest completes every rank's handle, or its error raises on every rank.
        It runs at the first of the next ``save``, ``wait``, ``close`` or the handle's
        ``wait`` on each rank, so every rank joins it exactly once per save."""
        err: BaseException | None = None
        try:  # rank 0's replicated save; every rank's own sharded one (agreed on every rank)
            self._worker.drain()
        except BaseException as e:
            err = e
        pending, self._pending = self._pending, None
        if pending is None or self.world_size == 1:
            if err is not None:
                raise err
            return
        ranks.share_commit(self.rank, err, pending)

    def drain_alone(self) -> None:
        """:meth:`settle` without its collective (leaving after an error): this rank's own
        background save only; a handle still waiting for rank 0's outcome fails."""
        pending, self._pending = self._pending, None
        if pending is not None and self.rank != 0:  # no rank will share rank 0's outcome now
            pending.set_exception(CkptSyncError(
                "closed after an error before rank 0's commit outcome reached this rank"))
        self._worker.drain()

    def at_close(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` once :meth:`close` has stopped the worker (releases what saves used)."""
        self._worker.at_close(fn)

    def close(self) -> None:
        self._worker.close()
