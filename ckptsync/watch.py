"""The old path of the watch daemon's status API, kept because the README imports it.

The daemon lives in :mod:`ckptsync.daemon` now; this shim only re-exports
:func:`~ckptsync.daemon.daemon_status` (and :func:`~ckptsync.daemon.read_status`) so that
``from ckptsync.watch import daemon_status`` keeps working. New code imports from
:mod:`ckptsync.daemon`.
"""

from __future__ import annotations

from ckptsync.daemon.runtime import daemon_status, read_status

__all__ = ["daemon_status", "read_status"]
