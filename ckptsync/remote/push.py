"""Pushing a checkpoint: :class:`Pusher`.

A push claims the root at the store's first push (:class:`~ckptsync.remote.claim.RunClaim`),
removes what a failed attempt of the same checkpoint left, uploads every file (in parallel,
retried, each by the first upload route that fits it: :mod:`ckptsync.remote.routes`), checks
each remote size, makes every file durable where the storage needs it, then commits: one
writer's checkpoint through :class:`~ckptsync.remote.commit.Committer`, one node's part of a
multi-node checkpoint through :class:`~ckptsync.remote.nodeparts.NodeParts`. Under a key every
file is encrypted on the way, and the remote manifest lists the stored bytes
(:mod:`ckptsync.remote.encrypted`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from functools import partial
from typing import Any

from ckptsync.atomic import TEMP_NAME
from ckptsync.crypto import KeyRing
from ckptsync.errors import CkptSyncError, ConfigError, CorruptCheckpointError, RemoteError
from ckptsync.local import LocalCheckpoint
from ckptsync.manifest import MANIFEST_NAME, FileEntry, Manifest
from ckptsync.parts import marker_name, part_of
from ckptsync.remote.claim import RunClaim
from ckptsync.remote.commit import Committer
from ckptsync.remote.encrypted import sealed_manifest
from ckptsync.remote.listing import Listing
from ckptsync.remote.location import SAFE_NAME, Location, mtime
from ckptsync.remote.manifests import ManifestReader
from ckptsync.remote.nodeparts import NodeParts
from ckptsync.remote.routes import Upload, routes_for
from ckptsync.remote.visibility import Visibility
from ckptsync.transfer import (
    MultipartStream,
    NullProgress,
    Progress,
    Slots,
    run_parallel,
    stopping,
)

__all__ = ["PART_QUIET_S", "Pusher"]

log = logging.getLogger("ckptsync.remote")

#: A temporary upload file untouched this long belongs to an upload that died (an upload under
#: way writes to it at least once per read timeout), so the next push of its checkpoint
#: removes it.
PART_QUIET_S = 600.0


class Pusher:
    """The pushes of one store (see the module docstring)."""

    def __init__(self, at: Location, manifests: ManifestReader, listing: Listing,
                 claim: RunClaim, visibility: Visibility, committer: Committer,
                 parts: NodeParts, keys: KeyRing | None) -> None:
        self.at = at
        self.manifests = manifests
        self.listing = listing
        self.claim = claim
        self.visibility = visibility
        self.committer = committer
        self.parts = parts
        self.keys = keys
        self.routes = routes_for(at, visibility)
        """The upload routes this store takes, chosen once from its backend."""
        self.stats: dict[str, int] = {"bytes_uploaded": 0, "bytes_copied": 0}
        """Totals over this store's pushes: bytes sent, and bytes copied server-side instead."""
        self._stats_lock = threading.Lock()
        self.stream_slots = Slots(at.config.parts_in_flight)
        """The parts every stream of this store holds at once (:meth:`stream_file`)."""

    def push(self, ckpt: LocalCheckpoint, *, progress: Progress | None = None,
             stop: threading.Event | None = None,
             streams: Mapping[str, MultipartStream] | None = None,
             fresh: bool = False) -> Manifest:
        """Upload a committed local checkpoint and commit it remotely.

        ``streams`` (relative path -> :meth:`stream_file` sink fed while the file was written)
        are completed instead of uploading those files again; any that cannot be completed
        is dropped and its file uploaded normally.

        Files are uploaded (in parallel, retried), their remote sizes checked, then the
        manifest is written with a create-only write, then ``LATEST`` is updated. Pushing a
        name that is already committed is a no-op. Setting ``stop`` abandons the upload
        (never committed).

        ``fresh``: the caller named this checkpoint itself and never pushed it before (a save's
        first upload), so the look for an already committed copy is skipped: one round trip
        less per save. Nothing else changes: should a copy be there after all, the create-only
        commit meets it and compares, as it does with a concurrent writer.

        Returns:
            The remote manifest; for one node's part of a multi-node checkpoint
            (:mod:`ckptsync.parts`) that is not committed yet (another node's part is not
            uploaded), the part's own manifest (``part_of(result)`` is not None): it is not
            restorable yet, and :meth:`RemoteStore.waiting_for` says which nodes it waits
            for.

        Raises:
            RemoteError: the backend failed (after retries), or the remote holds a different
                checkpoint under the same name.
            LocalStorageError, CorruptCheckpointError: a local file is unreadable or changed
                since its commit.
        """
        own_streams = dict(streams or {})
        try:
            with stopping(stop):  # a stop also cuts short every retry's back-off
                return self._push(ckpt, progress, stop, own_streams, fresh)
        finally:
            for s in own_streams.values():  # idempotent: completed ones are already closed
                s.abort()

    def stream_file(self, name: str, relpath: str) -> MultipartStream | None:
        """A sink uploading ``<name>/<relpath>`` while it is being written locally (S3 only;
        None elsewhere). Pass it to :meth:`push` once the local checkpoint is committed; the
        file stays invisible (an incomplete multipart upload) until then.

        None under a key too: encrypted files are uploaded from the committed local files
        (the stream sends the plaintext as torch.save writes it)."""
        at = self.at
        if not at.backend.parallel_parts or not SAFE_NAME.match(name) or self.keys:
            return None
        return MultipartStream(at.backend.object_calls, at.path(name, relpath),
                               url=at.url_of(name, relpath), config=at.config, retrier=at.retry,
                               slots=self.stream_slots, forget=at.backend.forget,
                               unusable=at.backend.private_api_failure())

    def _push(self, ckpt: LocalCheckpoint, progress: Progress | None,
              stop: threading.Event | None, streams: dict[str, MultipartStream],
              fresh: bool) -> Manifest:
        at, committer = self.at, self.committer
        m = ckpt.manifest
        name = m.name
        part = part_of(m)
        whole = m if part is None else part.whole
        if part is not None and self.keys:
            # The whole manifest a part carries lists plaintext digests, and each node seals
            # its files with its own salts: nothing could write an honest whole manifest.
            raise ConfigError(
                f"{at.url_of(name)}: checkpoint {name} is one node's part of a multi-node "
                "checkpoint, and encrypted multi-node checkpoints are not supported yet; "
                "upload it without a key, or train on one node")
        existing = None if fresh and part is None else self.manifests.read(name)
        if existing is not None:
            if part is not None:  # committed by another node: with this node's very bytes?
                self.parts.check_bytes(name, m, f"part {part.node} of")
            return committer.same_or_conflict(existing, whole)
        self.claim.ensure_marker(part=part is not None)
        self.claim.check_push_policy(m)
        if part is not None and self.parts.uploaded(name, m, part.node):
            return self.parts.commit(name, m, part, own_checked=True)  # a daemon's next scan
        leftovers = self._leftovers(name)
        if part is not None:  # the other nodes' files are theirs
            own = {f.path for f in m.files} | {marker_name(part.node)}
            leftovers = [rel for rel in leftovers if rel in own]
        for rel in leftovers:  # a failed attempt's files (Drive would duplicate them)
            # A second writer of this very name may have committed since we looked: never
            # delete a file of a committed checkpoint. Looking again before each delete
            # narrows that race to one request; should it still be lost, this push goes on
            # to upload the same bytes again before it meets the other's manifest.
            existing = self.manifests.read(name)
            if existing is not None:
                return committer.same_or_conflict(existing, whole)
            at.remove(name, rel)
        dirs = {at.path(name)} | {at.path(name, *f.path.split("/")[:-1])
                                  for f in m.files if "/" in f.path}
        for d in sorted(dirs):
            at.call(partial(at.backend.makedirs, d), at.url_of(name), "create")

        m = self._upload_all(ckpt, progress or NullProgress(), stop, streams)
        # Every file is there with its size before the manifest makes the checkpoint exist.
        try:
            self.listing.check_sizes(m, at.sizes(name))
        except CorruptCheckpointError as e:
            raise RemoteError(f"upload of {name} did not land intact: {e}", url=at.url_of(name),
                              retryable=True) from e
        if stop is not None and stop.is_set():
            raise RemoteError(f"push of {name} was stopped before its commit",
                              url=at.url_of(name), retryable=False)
        self.visibility.before_manifest(m)
        if part is not None:
            return self.parts.commit(name, m, part)
        return committer.commit(name, m)

    def _upload_all(self, ckpt: LocalCheckpoint, progress: Progress,
                    stop: threading.Event | None,
                    streams: dict[str, MultipartStream]) -> Manifest:
        """Every file of ``ckpt`` uploaded; the remote manifest of what was uploaded."""
        m = ckpt.manifest
        sources = self._unchanged_sources(m)
        slots = Slots(self.at.config.parts_in_flight)  # multipart parts held
        sealed: dict[str, Any] = {}  # relpath -> the Encryptor of its upload
        progress.start(m.total_size, f"push {m.name}")
        try:
            tasks = [partial(self._upload, ckpt, f, progress=progress, slots=slots,
                             source=sources.get((f.algo, f.digest, f.size)),
                             stream=streams.get(f.path), sealed=sealed) for f in m.files]
            run_parallel(tasks, max_workers=self.at.backend.workers, stop=stop)
        finally:
            progress.close()
        if self.keys is None:
            return m
        # The remote manifest lists the stored bytes (so that verify, ls and gc need no key)
        # and, per file, the key id and plaintext size.
        return sealed_manifest(m, sealed, self.keys)

    def _upload(self, ckpt: LocalCheckpoint, entry: FileEntry, stop: threading.Event, *,
                progress: Progress, slots: Slots, source: str | None,
                stream: MultipartStream | None, sealed: dict[str, Any]) -> None:
        seal = None
        # A file stored encrypted (encrypt_local=True) goes up as it is: never sealed twice.
        if self.keys is not None and entry.encryption is None:
            keys, name, relpath = self.keys, ckpt.name, entry.path

            def seal(dst: Any) -> Any:  # each attempt encrypts afresh; the last one counts
                sealed[relpath] = keys.encryptor(dst, name=name, relpath=relpath)
                return sealed[relpath]

        up = Upload(ckpt, entry, self.at.path(ckpt.name, entry.path),
                    self.at.url_of(ckpt.name, entry.path), progress, stop, slots,
                    source=source, stream=stream, seal=seal)
        for route in self.routes:
            if route.is_compatible(up) and route.send(up):
                with self._stats_lock:
                    self.stats["bytes_copied" if route.copies else "bytes_uploaded"] += entry.size
                return
        raise RemoteError(f"no upload route took {up.url}", url=up.url)  # Plain always does

    def _leftovers(self, name: str) -> list[str]:
        """What a failed attempt of ``name`` left that this push must remove first: on
        storage that does not overwrite (Drive), every file; elsewhere an upload overwrites,
        and only the temporary files of an attempt that died stay behind under their random
        names: those nobody wrote to for :data:`PART_QUIET_S` (not a second pusher's)."""
        at = self.at
        if not at.backend.overwrites:
            return [rel for rel in at.sizes(name) if rel != MANIFEST_NAME]
        if not at.backend.upload_via_temp:
            return []
        cutoff = time.time() - PART_QUIET_S
        return sorted(rel for rel, info in at.find(name).items()
                      if (t := TEMP_NAME.match(rel.rsplit("/", 1)[-1])) is not None
                      and t["kind"] == "part" and (w := mtime(info)) is not None and w < cutoff)

    def _unchanged_sources(self, m: Manifest) -> dict[tuple[str, str, int], str]:
        """(algo, digest, size) -> remote path of that content in the previous committed
        checkpoint.

        Only on backends with a server-side copy. The previous checkpoint is the last one this
        store committed, or else the one ``LATEST`` names, read through its manifest
        (committed, so its files had their listed sizes): two small reads. Any trouble just
        means uploading everything; a copy from a checkpoint deleted since (retention, gc)
        fails, and that file is uploaded instead.
        """
        if not self.at.backend.server_copy or self.keys:  # an encrypted file is bound to its name
            return {}
        prev = self.committer.last
        if prev is None or prev.name == m.name:
            try:
                hint = self.manifests.read_latest()
                prev = self.manifests.read(hint) if hint is not None and hint != m.name else None
            except CkptSyncError as e:
                log.debug("no previous checkpoint to copy unchanged files from: %s", e)
                return {}
        if prev is None:
            return {}
        return {(f.algo, f.digest, f.size): self.at.path(prev.name, f.path)
                for f in prev.files if f.size}
