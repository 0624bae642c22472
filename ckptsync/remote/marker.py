"""The root marker, ``<root>/ckptsync-root.json``: this root is ckptsync's, which run writes
it, and whether (and under which key ids) that run is encrypted.

Written with the create-only write at a run's first push (:mod:`ckptsync.remote.commit`)::

    {"format": "ckptsync/2", "writer": "ckptsync 0.1.0", "created": "...",
     "run": "<32 hex>", "encrypted": true, "key_ids": ["<16 hex>", ...],
     "mac": {"<key id>": "<hex>", ...}}

- ``run``: one prefix holds one run (DESIGN.md). A writer whose run id differs is refused
  where the backend has a create-only write and warned about elsewhere; retention deletes
  only checkpoints of its own run. A writer learns its run id from its local directory
  (:class:`~ckptsync.ownership.RunFile`), which takes it from the marker when it restores or
  pulls from the root, and never changes a marker's run.
- ``encrypted`` and ``key_ids``: set by a writer with a key (and widened when a writer of the
  same run pushes under a key the marker does not list yet: the only rewrite a marker ever
  gets). ``mac`` holds one keyed MAC per key of that writer's ring
  (:func:`ckptsync.integrity.mac_of`), so that a reader holding any of them can trust the key
  ids listed (:meth:`RootMarker.vouched`): a key id of this run that the reader lacks is then
  a missing key, never mistaken for a forged one.

Markers written before run ids existed carry none: no run is enforced on such a root.
"""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from ckptsync.crypto import KeyRing
from ckptsync.integrity import MARKER_INFO, mac_of
from ckptsync.manifest import FORMAT
from ckptsync.version import __version__

__all__ = ["RootMarker", "new_run_id"]

log = logging.getLogger("ckptsync.remote")

_MAC = "mac"


def new_run_id() -> str:
    """A fresh run id: 32 random hex chars."""
    return secrets.token_hex(16)


@dataclass(frozen=True)
class RootMarker:
    """A parsed root marker (see the module docstring); ``raw`` keeps every field read."""

    run: str | None
    encrypted: bool = False
    key_ids: tuple[str, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def parse(cls, data: bytes, where: str) -> RootMarker:
        """The marker in ``data``; one that does not parse is logged and read as a marker
        of an older ckptsync (no run, not encrypted): it still marks the root as ckptsync's."""
        try:
            obj = json.loads(data)
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            log.warning("%s: unreadable root marker (%s): read as one without a run id", where, e)
            return cls(None)
        run = obj.get("run")
        ids = obj.get("key_ids")
        return cls(run if isinstance(run, str) and run else None,
                   obj.get("encrypted") is True,
                   tuple(i for i in ids if isinstance(i, str)) if isinstance(ids, list) else (),
                   obj)

    @classmethod
    def new(cls, run: str | None, keys: KeyRing | None) -> RootMarker:
        """The marker a run's first push writes."""
        raw = {"format": FORMAT, "writer": f"ckptsync {__version__}",
               "created": datetime.now(timezone.utc).isoformat()}
        if run is not None:
            raw["run"] = run
        return cls(run, keys is not None, tuple(keys.ids) if keys is not None else (), raw)

    def needs_update(self, keys: KeyRing | None) -> bool:
        """Whether a writer of this run pushing under ``keys`` must record them here."""
        if keys is None:
            return False
        macs = self.raw.get(_MAC)
        return (not self.encrypted or not set(keys.ids) <= set(self.key_ids)
                or not isinstance(macs, dict) or keys.current_id not in macs)

    def updated(self, keys: KeyRing) -> RootMarker:
        """This marker, encrypted under ``keys`` too (its run and other fields unchanged)."""
        ids = tuple(sorted(set(self.key_ids) | set(keys.ids)))
        return RootMarker(self.run, True, ids, dict(self.raw))

    def to_json(self, keys: KeyRing | None) -> bytes:
        """The marker's bytes, with a MAC under each of ``keys`` (none without keys)."""
        obj = {k: v for k, v in self.raw.items() if k != _MAC}
        if self.run is not None:
            obj["run"] = self.run
        if self.encrypted:
            obj["encrypted"] = True
            obj["key_ids"] = list(self.key_ids)
        if keys is not None:
            obj[_MAC] = {key_id: mac_of(key, MARKER_INFO, obj, (_MAC,))
                         for key_id, key in zip(keys.ids, keys.keys, strict=True)}
        return (json.dumps(obj) + "\n").encode()

    def vouched(self, keys: KeyRing | None) -> frozenset[str] | None:
        """The key ids this marker lists, if its MAC under one of ``keys`` verifies; else
        None (no key, no MAC for these keys, or an altered marker)."""
        macs = self.raw.get(_MAC)
        if keys is None or not isinstance(macs, dict):
            return None
        for key_id, key in zip(keys.ids, keys.keys, strict=True):
            if isinstance(macs.get(key_id), str) and macs[key_id] == mac_of(
                    key, MARKER_INFO, self.raw, (_MAC,)):
                return frozenset(self.key_ids) | {key_id}
        return None
