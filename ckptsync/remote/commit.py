"""The commit of one checkpoint by one writer: :class:`Committer`.

Once every file is uploaded and has its size, the manifest is finalized (the run id, a
``seq`` where it has no step, its ``requires`` and, under a key, its keyed MAC) and written
with the storage's create-only write (:mod:`ckptsync.remote.visibility`): its presence is the
commit. The sizes are checked once more after it, so that a file removed in between (``gc
--grace 0`` during the push) un-commits it again instead of leaving a committed checkpoint
without that file. ``LATEST`` is updated last, as a hint.

A create-only write that meets a manifest already there lost to a concurrent writer of the
same name: the winner's manifest is read back (through the one retry policy: S3 refuses a
conditional write while another one to the key is in progress, so it may not be readable at
once) and must describe the same checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

from ckptsync.crypto import KeyRing
from ckptsync.errors import CkptSyncError, CorruptCheckpointError, RemoteError
from ckptsync.integrity import sign_manifest
from ckptsync.manifest import (
    LATEST_NAME,
    MANIFEST_NAME,
    RUN_FIELD,
    SEQ_FIELD,
    Manifest,
    name_sort_key,
    parse_name,
    with_requires,
)
from ckptsync.mounts import sync_dir
from ckptsync.redact import redact_url
from ckptsync.remote.claim import RunClaim
from ckptsync.remote.encrypted import same_content
from ckptsync.remote.listing import Listing
from ckptsync.remote.location import Location
from ckptsync.remote.manifests import ManifestReader
from ckptsync.remote.visibility import ManifestExists, Visibility
from ckptsync.transfer import Retrier, RetryPolicy

__all__ = ["SETTLE", "Committer"]

log = logging.getLogger("ckptsync.remote")

#: Reading back the manifest a concurrent writer's create-only write won with: at most 7
#: reads over about 2.5 to 5 seconds.
SETTLE = RetryPolicy(0.1, 2.0, attempts=7)


class Committer:
    """Commits checkpoints under ``at``, one writer each (see the module docstring)."""

    def __init__(self, at: Location, manifests: ManifestReader, listing: Listing,
                 visibility: Visibility, claim: RunClaim, keys: KeyRing | None) -> None:
        self.at = at
        self.manifests = manifests
        self.listing = listing
        self.visibility = visibility
        self.claim = claim
        self.keys = keys
        self.last: Manifest | None = None
        """The newest checkpoint this store committed itself: the next push copies unchanged
        files from it without reading ``LATEST`` and its manifest first (two round trips)."""
        self._settle = Retrier(at.config, at.translate, policy=SETTLE)

    def commit(self, name: str, m: Manifest) -> Manifest:
        """Write ``m`` with the create-only write (the commit), check that every file is still
        there, then the ``LATEST`` hint. Returns the remote manifest (the other writer's,
        where one committed this very checkpoint first).

        Raises:
            RemoteError: the backend failed, a file went missing meanwhile (retryable), or
                another writer committed a different checkpoint of this name.
        """
        m = self.finalize(m)
        try:
            self.visibility.create_only(self.at.path(name, MANIFEST_NAME),
                                        self.at.url_of(name, MANIFEST_NAME), m.to_json(),
                                        "commit manifest to")
        except ManifestExists:
            return self.same_or_conflict(self._winner(name), m)
        self._recheck(name, m)
        log.info("committed %s to %s", name, redact_url(self.at.url))
        self._update_latest(m, self.last)
        self.last = m
        if self.at.mount is not None:
            self._sync_mount(name)
        return m

    def _sync_mount(self, name: str) -> None:
        """On a FUSE mount (Colab's Drive), hand it what the kernel still holds of this
        commit (the names of the manifest and ``LATEST`` too): committed there means handed
        to the mount. A failure is reported, never the commit's end: it happened."""
        mount = self.at.mount
        try:
            sync_dir(self.at.root)
        except OSError as e:
            log.warning("committed %s to %s, but syncing %s failed: %s", name,
                        redact_url(self.at.url), mount.what if mount else self.at.root, e)

    def _winner(self, name: str) -> Manifest:
        url = self.at.url_of(name, MANIFEST_NAME)

        def read() -> Manifest:
            self.at.forget(name)
            other = self.manifests.read(name)
            if other is None:
                raise RemoteError(f"{url}: create-only write refused but no manifest is there",
                                  url=url, retryable=True)
            return other

        winner: Manifest = self._settle.call(read, url=url, action="read back")
        return winner

    def finalize(self, m: Manifest) -> Manifest:
        """The remote manifest of ``m``: its run id, its ``seq`` where it has no step, its
        ``requires`` and, under a key, its keyed MAC (:mod:`ckptsync.integrity`)."""
        add: dict[str, Any] = {}
        if self.claim.run is not None:
            add[RUN_FIELD] = self.claim.run
        if m.step is None and m.seq is None:
            add[SEQ_FIELD] = self._next_seq(m.name)
        if add:
            m = dataclasses.replace(m, unknown={**m.unknown, **add})
        return sign_manifest(m, self.keys) if self.keys is not None else with_requires(m)

    def _next_seq(self, name: str) -> int:
        """One more than the highest ``seq`` of the step-less checkpoints committed here: the
        order of step-less checkpoints comes from the remote, not from a writer's clock. Two
        pushes taking one value at once are ordered by the remote's timestamps (``scan``)."""
        names = [n for n in self.at.names()
                 if n != name and (p := parse_name(n)) is not None and p[0] is None]
        read = self.manifests.read_many(names)
        seqs = [m.seq for m in read.values() if isinstance(m, Manifest) and m.seq is not None]
        return max(seqs, default=0) + 1

    def _recheck(self, name: str, m: Manifest) -> None:
        """After the manifest write: every file still there with its size, else the manifest
        is removed again (retryable). A ``gc`` that took the prefix for a leftover between the
        size check and the manifest write (``--grace 0`` during the push) must not leave a
        committed checkpoint that lacks a file."""
        self.at.forget(name)
        try:
            self.listing.check_sizes(m, self.at.sizes(name))
        except CorruptCheckpointError as e:
            self.at.remove(name, MANIFEST_NAME)
            log.warning("%s lost a file while it was committed (%s): its manifest was removed "
                        "again, nothing is committed; the push is retried", name, e)
            raise RemoteError(
                f"{self.at.url_of(name)}: a file was removed while the checkpoint was committed "
                f"({e}; a concurrent gc?): its manifest was removed again, so no committed "
                "checkpoint lacks a file; the push is retried", url=self.at.url_of(name),
                retryable=True) from e

    def same_or_conflict(self, remote: Manifest, local: Manifest) -> Manifest:
        """``remote`` where it is ``local``'s checkpoint (names are never reused).

        Raises:
            RemoteError: the remote holds a different checkpoint of the same name.
        """
        if not same_content(remote, local):
            raise RemoteError(
                f"{self.at.url_of(local.name)} already holds a different checkpoint of the same "
                "name; names are never reused, so the remote was written by another tool: "
                "inspect it and delete it if it is not wanted",
                url=self.at.url_of(local.name),
                retryable=False,
            )
        return remote

    def _update_latest(self, m: Manifest, prev: Manifest | None = None) -> None:
        """Point ``LATEST`` at ``m`` unless it names a newer checkpoint. Where this store
        committed ``prev`` (older than ``m``) last, it wrote ``LATEST`` last too (one run
        writes a prefix), so ``LATEST`` is written without being read: a hint only, never
        trusted without its manifest, so a rare step back costs nothing."""
        if prev is not None and prev.sort_key() < m.sort_key():
            current = None
        else:
            current = self.manifests.read_latest()
        # A step-less checkpoint just took the highest seq: it is the newest step-less one,
        # whatever its name's timestamp says.
        parsed = parse_name(current) if current is not None else None
        stepless = m.step is None and parsed is not None and parsed[0] is None
        if current is not None and not stepless \
                and name_sort_key(current) >= name_sort_key(m.name):
            return
        data = (json.dumps({"name": m.name, "step": m.step, "created": m.created}) + "\n").encode()
        try:
            self.visibility.replace(self.at.path(LATEST_NAME), self.at.url_of(LATEST_NAME), data)
        except CkptSyncError as e:
            # LATEST is only a hint: the commit already happened.
            log.warning("checkpoint %s is committed, but the LATEST hint was not updated: %s",
                        m.name, e)
