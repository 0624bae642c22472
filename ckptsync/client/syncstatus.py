"""Where a checkpointer's upload to its remote stands: :class:`SyncStatus`, the value
``Checkpointer.status()`` returns and the uploader (:mod:`ckptsync.client.uploader`) fills, and
the one wording of a checkpoint that waits for other nodes' parts."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["SyncStatus", "waiting_line", "waiting_reason"]


@dataclass(frozen=True, repr=False)
class SyncStatus:
    """Where a checkpointer's upload to its remote stands (``Checkpointer.status()``).

    ``newest_remote`` is the newest checkpoint this checkpointer committed remotely (None before
    its first). ``behind`` is True while the newest checkpoint saved is not yet remote.
    ``superseded`` counts checkpoints never uploaded because a newer one replaced them.
    ``not_remote`` names what ``close()`` left off the remote (it stays on the local disk),
    ``not_remote_why`` says why for each.
    ``waiting_for_nodes`` maps each checkpoint of which this node's part is uploaded but
    which is not committed (not restorable) to the nodes whose part is missing (empty while
    the last node's commit is under way); it becomes ``newest_remote`` once committed.
    ``remote_mount`` names the FUSE mount the remote directory is on (Colab's Drive:
    "the Google Drive mount at /content/drive"), where committed means handed to the mount,
    not yet uploaded by it (:mod:`ckptsync.mounts`); None elsewhere.
    ``upload_pid`` is the running upload process's id (to watch or renice it,
    :mod:`ckptsync.remote.process`); None where uploads run in a thread or none started yet.
    """

    remote: str | None = None
    newest_local: str | None = None
    newest_local_step: int | None = None
    newest_remote: str | None = None
    newest_remote_step: int | None = None
    in_flight: str | None = None
    pending: str | None = None
    behind: bool = False
    superseded: int = 0
    consecutive_failures: int = 0
    last_error: str | None = None
    last_error_time: float | None = None
    """``time.time()`` of ``last_error``."""
    not_remote: tuple[str, ...] = ()
    not_remote_why: Mapping[str, str] = field(default_factory=dict)
    waiting_for_nodes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    remote_mount: str | None = None
    upload_pid: int | None = None

    def __repr__(self) -> str:
        """One short line (a notebook shows it): the remote, the newest checkpoint each side
        holds, whether they agree, and only what else is set."""
        if self.remote is None:
            return "SyncStatus(no remote)"

        def at(name: str | None, step: int | None) -> str:
            return "none" if name is None else (f"step {step}" if step is not None else name)

        parts = [f"remote={self.remote!r}",
                 f"local={at(self.newest_local, self.newest_local_step)}",
                 f"remote_has={at(self.newest_remote, self.newest_remote_step)}",
                 "behind" if self.behind else "in sync"]
        parts += [f"{k}={v}" for k, v in (("in_flight", self.in_flight),
                                           ("pending", self.pending)) if v is not None]
        if self.superseded:
            parts.append(f"superseded={self.superseded}")
        if self.consecutive_failures:
            parts.append(f"failures={self.consecutive_failures} "
                         f"({(self.last_error or '')[:80]})")
        if self.waiting_for_nodes:
            parts.append(f"waiting_for_nodes={len(self.waiting_for_nodes)}")
        if self.not_remote:
            parts.append(f"not_remote={len(self.not_remote)}")
        if self.remote_mount:
            parts.append(f"committed=handed to {self.remote_mount}")
        return f"SyncStatus({', '.join(parts)})"

    def lag(self) -> str:
        """One line saying how far behind the remote is, for logs."""
        def at(name: str | None, step: int | None) -> str:
            if name is None:
                return "nothing"
            return f"step {step} ({name})" if step is not None else name

        line = (f"remote {self.remote} is behind: it holds "
                f"{at(self.newest_remote, self.newest_remote_step)}, the newest local checkpoint "
                f"is {at(self.newest_local, self.newest_local_step)}")
        if self.newest_local_step is not None and self.newest_remote_step is not None:
            line += f" ({self.newest_local_step - self.newest_remote_step} steps behind)"
        for name, nodes in self.waiting_for_nodes.items():
            line += f"; {waiting_line(name, nodes)}"
        if self.superseded:
            line += f"; {self.superseded} checkpoints superseded before upload"
        if self.consecutive_failures:
            ago = time.time() - (self.last_error_time or time.time())
            line += (f"; failed uploads in a row: {self.consecutive_failures}, the last "
                     f"{ago:.0f}s ago: {self.last_error}")
        return line + "; saves go on locally"


def waiting_reason(nodes: tuple[int, ...]) -> str:
    """Why a checkpoint of which this node's part is uploaded is not remote yet."""
    if not nodes:
        return "part uploaded, every node's part is up, its commit is under way"
    return (f"part uploaded, waiting for nodes {list(nodes)} to upload theirs (not "
            "restorable until then)")


def waiting_line(name: str, nodes: tuple[int, ...]) -> str:
    """:func:`waiting_reason`, naming the checkpoint."""
    return f"{name}: {waiting_reason(nodes)}"
