"""Under ``torch.distributed``: telling every rank how one rank's part of a save or restore went.

Rank 0 alone snapshots, writes and chooses what to restore, so a failure there must reach the
other ranks, or they are left in a collective rank 0 never joins and the job hangs. Every
exchange here is one collective that every rank joins whether or not it failed, carrying
either a small payload or a description of the failure; each rank then raises (its own
exception where it failed, else an error naming the rank that did) or goes on. The process
group stays usable either way: training code that catches the error on every rank can go on.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, NoReturn

import torch.distributed as dist

from ckptsync import errors
from ckptsync.errors import CkptSyncError
from ckptsync.manifest import Manifest

__all__ = ["Failure", "agree", "describe", "from_rank0", "share_commit", "share_from_rank0"]


@dataclass(frozen=True)
class Failure:
    """What failed on a rank, as sent to the others (an exception itself may not pickle)."""

    rank: int
    kind: str  # the exception's class name
    message: str

    @classmethod
    def of(cls, rank: int, err: BaseException | None) -> Failure | None:
        return None if err is None else cls(rank, type(err).__name__, str(err))

    def raise_here(self, what: str) -> NoReturn:
        """Raise on a rank that did not fail: the same class where it is one of ckptsync's
        errors (``except UnsafeStateError`` works on every rank), else a
        :class:`CkptSyncError`; the message names the rank and its error either way."""
        cls = getattr(errors, self.kind, None)
        if not (isinstance(cls, type) and issubclass(cls, CkptSyncError)):
            cls = CkptSyncError
        raise cls(f"rank {self.rank} failed to {what}: {self.kind}: {self.message}")


def share_from_rank0(rank: int, err: BaseException | None, payload: Any, what: str) -> Any:
    """Collective: rank 0's ``payload`` on every rank, or rank 0's error raised on every rank.

    Rank 0 passes its error (None when it succeeded) and payload; the other ranks pass None
    for both. Rank 0 re-raises ``err``; the others raise :meth:`Failure.raise_here`.
    """
    box: list[Any] = [(Failure.of(0, err), payload) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    if err is not None:
        raise err
    failure, shared = box[0]
    if failure is not None:
        failure.raise_here(what)
    return shared


def agree(rank: int, world_size: int, err: BaseException | None, payload: Any,
          what: str, group: Any = None) -> list[Any]:
    """Collective (over ``group``, default: every rank): every rank's ``payload``, by rank;
    raises on every rank if any failed (its own ``err`` where it failed, else the lowest
    failed rank's, named). Outside torch.distributed (``world_size`` 1): ``[payload]``, or
    ``err`` raised."""
    if world_size == 1:
        if err is not None:
            raise err
        return [payload]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, (Failure.of(rank, err), payload), group=group)
    if err is not None:
        raise err
    for failure, _ in gathered:
        if failure is not None:
            failure.raise_here(what)
    return [p for _, p in gathered]


def from_rank0(world_size: int, value: Any, group: Any = None) -> Any:
    """Collective (over ``group``): rank 0's ``value`` on every rank (the others pass any)."""
    box = [value]
    if world_size > 1:
        dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def describe(e: BaseException) -> str:
    """``e`` as one rank tells another about it: its class and message."""
    return f"{type(e).__name__}: {e}"


def share_commit(rank: int, err: BaseException | None, pending: Future[Any]) -> None:
    """Collective: the outcome of rank 0's background commit ``pending`` on every rank.

    On rank 0, ``pending`` is the commit's future (done) and ``err`` what draining it raised;
    on the other ranks, ``pending`` is their handle's future, completed here with rank 0's
    manifest or failed with the error this raises.
    """
    payload = None
    if rank == 0 and err is None:
        if pending.exception() is not None:  # raised before by its handle: still shared
            err = pending.exception()
        elif pending.result() is not None:
            payload = pending.result().to_json()
    try:
        shared = share_from_rank0(rank, err, payload, "commit the checkpoint")
    except Exception as e:
        if rank != 0:
            pending.set_exception(e)
        raise
    if rank != 0:
        pending.set_result(None if shared is None
                           else Manifest.from_json(shared, where="rank 0's manifest"))
