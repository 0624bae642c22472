"""Checkpoint names, and the names of ckptsync's files in a checkpoint and at a root.

A name made by :func:`make_name` carries the step (zero-padded, so that names sort), the UTC
creation time to the microsecond and a random suffix: names are unique per commit and never
reused, so two writers can never interleave files under one name::

    step-<12 digits>-<UTC stamp>-<6 hex>      nostep-<UTC stamp>-<6 hex>
"""

from __future__ import annotations

import re
import secrets
from datetime import datetime, timezone

from ckptsync.errors import ManifestError

__all__ = ["LATEST_NAME", "MANIFEST_NAME", "make_name", "name_sort_key", "parse_name",
           "utcnow"]

#: The manifest of a checkpoint: its presence is the commit.
MANIFEST_NAME = "ckptsync.json"
#: The hint at a remote root naming the newest committed checkpoint.
LATEST_NAME = "LATEST"
# step-<12 digits>-<UTC stamp>-<6 hex>  or  nostep-<UTC stamp>-<6 hex>
_NAME_RE = re.compile(
    r"^(?:step-(?P<step>\d{12})|nostep)-(?P<stamp>\d{8}T\d{6}\d{6}Z)-(?P<suffix>[0-9a-f]{6})$"
)


def utcnow() -> datetime:
    """The current time, in UTC."""
    return datetime.now(timezone.utc)


def make_name(step: int | None, created: datetime | None = None) -> str:
    """A unique checkpoint name that sorts by (step, creation time).

    The step is zero-padded, then comes the UTC creation time to the microsecond and a random
    suffix, so two writers never share a name and names are never reused.

    >>> make_name(42)  # doctest: +SKIP
    'step-000000000042-20261128T101500123456Z-3f9a1c'
    """
    if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
        raise ManifestError(f"step must be a non-negative int or None, got {step!r}")
    if step is not None and step >= 10**12:
        raise ManifestError(f"step {step} is too large (at most 12 digits)")
    created = created or utcnow()
    stamp = created.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    suffix = secrets.token_hex(3)
    head = "nostep" if step is None else f"step-{step:012d}"
    return f"{head}-{stamp}-{suffix}"


def parse_name(name: str) -> tuple[int | None, str] | None:
    """``(step, stamp)`` of a name made by :func:`make_name`, or None for any other name."""
    m = _NAME_RE.match(name)
    if m is None:
        return None
    step = m.group("step")
    return (int(step) if step is not None else None, m.group("stamp"))


def name_sort_key(name: str) -> tuple[int, int, str, str]:
    """Newest-last ordering from the name alone (no manifest read).

    Steps order before creation time; names without a step order by time among themselves
    and before any stepped name. Foreign names sort first (oldest).
    """
    parsed = parse_name(name)
    if parsed is None:
        return (-1, -1, "", name)
    step, stamp = parsed
    return (0 if step is None else 1, -1 if step is None else step, stamp, name)
