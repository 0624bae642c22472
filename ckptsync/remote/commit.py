"""Pushing a checkpoint, and the commit protocol that makes it exist remotely.

:meth:`PushMixin.push` uploads every file (parallel, streamed, retried; multipart on S3; a
server-side copy of a file unchanged since the previous checkpoint), checks each remote size,
then writes the manifest with a create-only write (:meth:`PushMixin._create_only`): its
presence is the commit; the sizes are checked once more after it, so that a file removed in
between (``gc --grace 0`` during the push) un-commits it again instead of leaving a committed
checkpoint without that file. ``LATEST`` is updated last, as a hint. How each step is done
depends on the backend (``self.backend``): on a local directory every file is fsynced and
renamed into place, the directories are fsynced, and the manifest is hard-linked, so that a
power cut never leaves a manifest listing files that are not on disk.

The first push of a store claims the root (:mod:`ckptsync.remote.marker`): it writes the
marker with the create-only write, or joins the run the marker names, refusing a second run
(:meth:`PushMixin._join_run`); without a key it refuses to put plaintext into an encrypted
run. The remote manifest gets the run id, a ``seq`` where it has no step, its ``requires`` and,
under a key, its keyed MAC (:meth:`PushMixin._finalize`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
import time
from collections.abc import Mapping
from functools import partial
from typing import Any

from ckptsync.atomic import temp_name
from ckptsync.crypto import stored_size
from ckptsync.errors import (
    CkptSyncError,
    ConfigError,
    CorruptCheckpointError,
    RemoteError,
)
from ckptsync.integrity import sign_manifest
from ckptsync.local import LocalCheckpoint
from ckptsync.manifest import (
    LATEST_NAME,
    MANIFEST_NAME,
    RUN_FIELD,
    SEQ_FIELD,
    FileEntry,
    Manifest,
    name_sort_key,
    parse_name,
    with_requires,
)
from ckptsync.mounts import sync_dir
from ckptsync.parts import PART_MARKER, Part, marker_name, part_of
from ckptsync.redact import redact_url
from ckptsync.remote.boundary import not_found
from ckptsync.remote.encrypted import same_content, sealed_manifest
from ckptsync.remote.listing import PART_FILE, PART_QUIET_S, SAFE_NAME, mtime
from ckptsync.remote.nodeparts import PartsMixin
from ckptsync.remote.writes import ManifestExists
from ckptsync.transfer import (
    MultipartStream,
    NullProgress,
    Progress,
    Slots,
    run_parallel,
    stopping,
    upload_file,
    upload_file_multipart,
)
from ckptsync.transfer.s3 import S3ApiChanged, private_api_usable
from ckptsync.transfer.sealed import upload_sealed_multipart

__all__ = ["ManifestExists", "PushMixin"]

log = logging.getLogger("ckptsync.remote")


class PushMixin(PartsMixin):
    """:meth:`push` and the commit protocol of :class:`~ckptsync.remote.RemoteStore`."""

    def push(
        self,
        ckpt: LocalCheckpoint,
        *,
        progress: Progress | None = None,
        stop: threading.Event | None = None,
        streams: Mapping[str, MultipartStream] | None = None,
        fresh: bool = False,
    ) -> Manifest:
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
            restorable yet, and :meth:`waiting_for` says which nodes it waits for.

        Raises:
            RemoteError: the backend failed (after retries), or the remote holds a different
                checkpoint under the same name.
            LocalStorageError, CorruptCheckpointError: a local file is unreadable or changed
                since its commit.
        """
        streams = dict(streams or {})
        try:
            with stopping(stop):  # a stop also cuts short every retry's back-off
                return self._push(ckpt, progress, stop, streams, fresh)
        finally:
            for s in streams.values():  # idempotent: completed ones are already closed
                s.abort()

    def stream_file(self, name: str, relpath: str) -> MultipartStream | None:
        """A sink uploading ``<name>/<relpath>`` while it is being written locally (S3 only;
        None elsewhere). Pass it to :meth:`push` once the local checkpoint is committed; the
        file stays invisible (an incomplete multipart upload) until then.

        None under a key too: encrypted files are uploaded from the committed local files
        (the stream sends the plaintext as torch.save writes it)."""
        if not self.backend.parallel_parts or not SAFE_NAME.match(name) or self.keys:
            return None
        return MultipartStream(self.fs, self._path(name, relpath),
                               url=self.url_of(name, relpath), config=self.config,
                               retrier=self._retry, slots=self._stream_slots)

    def _push(self, ckpt: LocalCheckpoint, progress: Progress | None,
              stop: threading.Event | None, streams: dict[str, MultipartStream],
              fresh: bool = False) -> Manifest:
        m = local_m = ckpt.manifest
        name = m.name
        part = part_of(m)
        if part is not None and self.keys:
            # The whole manifest a part carries lists plaintext digests, and each node seals
            # its files with its own salts: nothing could write an honest whole manifest.
            raise ConfigError(
                f"{self.url_of(name)}: checkpoint {name} is one node's part of a multi-node "
                "checkpoint, and encrypted multi-node checkpoints are not supported yet; "
                "upload it without a key, or train on one node")
        existing = None if fresh and part is None else self.read_manifest(name)
        if existing is not None:
            if part is not None:  # committed by another node: with this node's very bytes?
                self._check_part_bytes(name, m, f"part {part.node} of")
            return self._same_or_conflict(existing, m if part is None else part.whole)
        self._ensure_marker(part=part is not None)
        self._check_push_policy(m)
        if part is not None and self._part_uploaded(name, m, part.node):
            return self._commit_part(name, m, part, own_checked=True)  # a daemon's next scan
        progress = progress or NullProgress()
        if not self.backend.overwrites:
            leftovers = [rel for rel in self._sizes(name) if rel != MANIFEST_NAME]
        else:
            # Elsewhere an upload overwrites; only the temporary files of an attempt that
            # died (file://, mounts) stay behind under their random names.
            leftovers = self._stale_parts(name)
        if part is not None:  # the other nodes' files are theirs
            own = {f.path for f in m.files} | {marker_name(part.node)}
            leftovers = [rel for rel in leftovers if rel in own]
        for rel in leftovers:  # a failed attempt's files (Drive would duplicate them)
            # A second writer of this very name may have committed since we looked: never
            # delete a file of a committed checkpoint. Looking again before each delete
            # narrows that race to one request; should it still be lost, this push goes on
            # to upload the same bytes again before it meets the other's manifest.
            existing = self.read_manifest(name)
            if existing is not None:
                return self._same_or_conflict(existing, local_m if part is None else part.whole)
            def rm(path: str = self._path(name, rel)) -> None:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(path)

            self._call(rm, self.url_of(name, rel), "delete")
        if self.backend.needs_dirs:
            dirs = {self._path(name)} | {
                self._path(name, *f.path.split("/")[:-1]) for f in m.files if "/" in f.path
            }
            for d in sorted(dirs):
                self._call(partial(self.fs.makedirs, d, exist_ok=True), self.url_of(name), "create")

        sources = self._unchanged_sources(m)
        slots = Slots(self.config.parts_in_flight)  # multipart parts held
        sealed: dict[str, Any] | None = {} if self.keys else None  # relpath -> its Encryptor
        progress.start(m.total_size, f"push {name}")
        try:
            tasks = [
                partial(self._upload_task, ckpt, f.path, progress=progress, slots=slots,
                        source=sources.get((f.algo, f.digest, f.size)),
                        stream=streams.get(f.path), sealed=sealed)
                for f in m.files
            ]
            run_parallel(tasks, max_workers=self.backend.workers, stop=stop)
        finally:
            progress.close()
        if self.keys and sealed is not None:
            # The remote manifest lists the stored bytes (so that verify, ls and gc need no
            # key) and, per file, the key id and plaintext size.
            m = sealed_manifest(m, sealed, self.keys)
        # Every file is there with its size before the manifest makes the checkpoint exist.
        sizes = self._sizes(name)
        try:
            self._check_sizes(m, sizes)
        except CorruptCheckpointError as e:
            raise RemoteError(f"upload of {name} did not land intact: {e}", url=self.url_of(name),
                              retryable=True) from e
        if stop is not None and stop.is_set():
            raise RemoteError(f"push of {name} was stopped before its commit",
                              url=self.url_of(name), retryable=False)
        if self.backend.local_paths:
            # Every file durable, under its final name, before the manifest.
            self._call(partial(self._fsync_dirs, m), self.url_of(name), "sync")
        if part is not None:
            return self._commit_part(name, m, part)
        return self._commit(name, m)

    def _finalize(self, m: Manifest) -> Manifest:
        """The remote manifest of ``m``: its run id, its ``seq`` where it has no step, its
        ``requires`` and, under a key, its keyed MAC (:mod:`ckptsync.integrity`)."""
        add: dict[str, Any] = {}
        if self._run is not None:
            add[RUN_FIELD] = self._run
        if m.step is None and m.seq is None:
            add[SEQ_FIELD] = self._next_seq(m.name)
        if add:
            m = dataclasses.replace(m, unknown={**m.unknown, **add})
        return sign_manifest(m, self.keys) if self.keys is not None else with_requires(m)

    def _next_seq(self, name: str) -> int:
        """One more than the highest ``seq`` of the step-less checkpoints committed here: the
        order of step-less checkpoints comes from the remote, not from a writer's clock. Two
        pushes taking one value at once are ordered by the remote's timestamps (``scan``)."""
        names = [n for n in self._names()
                 if n != name and (p := parse_name(n)) is not None and p[0] is None]
        read = self._read_manifests(names)
        seqs = [m.seq for m in read.values() if isinstance(m, Manifest) and m.seq is not None]
        return max(seqs, default=0) + 1

    def _commit(self, name: str, m: Manifest) -> Manifest:
        """Write ``m`` with the create-only write (the commit), check that every file is still
        there, then the ``LATEST`` hint."""
        m = self._finalize(m)
        try:
            self._create_manifest(name, m.to_json())
        except ManifestExists:
            # A concurrent writer won. Its manifest may not be readable yet (S3 refuses a
            # conditional write while another one to the key is in progress): look again.
            other = self.read_manifest(name)
            for delay in (0.05, 0.2, 0.5, 1.0, 2.0):
                if other is not None:
                    break
                time.sleep(delay)
                self.fs.invalidate_cache(self._path(name))
                other = self.read_manifest(name)
            if other is None:
                raise RemoteError(f"{self.url_of(name, MANIFEST_NAME)}: create-only write refused "
                                  "but no manifest is there", retryable=True) from None
            return self._same_or_conflict(other, m)
        self._recheck_commit(name, m)
        log.info("committed %s to %s", name, redact_url(self.url))
        self._update_latest(m, self._last_commit)
        self._last_commit = m
        if self.mount is not None:
            self._sync_mount(name)
        return m

    def _recheck_commit(self, name: str, m: Manifest) -> None:
        """After the manifest write: every file still there with its size, else the manifest
        is removed again (retryable). A ``gc`` that took the prefix for a leftover between the
        size check and the manifest write (``--grace 0`` during the push) must not leave a
        committed checkpoint that lacks a file."""
        self.fs.invalidate_cache(self._path(name))
        try:
            self._check_sizes(m, self._sizes(name))
        except CorruptCheckpointError as e:
            path = self._path(name, MANIFEST_NAME)

            def rm() -> None:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(path)

            self._call(rm, self.url_of(name, MANIFEST_NAME), "delete")
            log.warning("%s lost a file while it was committed (%s): its manifest was removed "
                        "again, nothing is committed; the push is retried", name, e)
            raise RemoteError(
                f"{self.url_of(name)}: a file was removed while the checkpoint was committed "
                f"({e}; a concurrent gc?): its manifest was removed again, so no committed "
                "checkpoint lacks a file; the push is retried", url=self.url_of(name),
                retryable=True) from e

    def _sync_mount(self, name: str) -> None:
        """On a FUSE mount (Colab's Drive), hand it what the kernel still holds of this
        commit (the names of the manifest and ``LATEST`` too): committed there means handed
        to the mount. A failure is reported, never the commit's end: it happened."""
        try:
            sync_dir(self.root)
        except OSError as e:
            log.warning("committed %s to %s, but syncing %s failed: %s", name,
                        redact_url(self.url), self.mount.what if self.mount else self.root, e)

    # ------------------------------------------------------------------ multi-node parts

    def _commit_part(self, name: str, m: Manifest, part: Part,
                     own_checked: bool = False) -> Manifest:
        """After node ``part.node``'s files are all there: write its marker, then commit the
        whole checkpoint if every node's marker and file is there, with its digest
        (:mod:`ckptsync.parts`).

        Returns the whole manifest once committed (here or by another node), else ``m``.
        """
        # Marker before looking at the others': whichever node writes its marker last sees
        # every marker, so some node always commits.
        self._replace(self._path(name, marker_name(part.node)),
                      self.url_of(name, marker_name(part.node)), m.to_json())
        self.fs.invalidate_cache(self._path(name))
        sizes = self._sizes(name)
        done = {int(x.group(1)) for rel in sizes if (x := PART_MARKER.match(rel))}
        if not done >= set(range(part.nodes)):
            log.info("part %d of %d of %s uploaded to %s, waiting for nodes %s: not restorable "
                     "until then (the node that uploads last commits it)", part.node,
                     part.nodes, name, redact_url(self.url),
                     sorted(set(range(part.nodes)) - done))
            return m
        try:
            self._check_sizes(part.whole, sizes)
        except CorruptCheckpointError as e:
            raise RemoteError(f"every node's part of {name} says it is uploaded, but: {e}",
                              url=self.url_of(name), retryable=True) from e
        # This node's files were just uploaded (or, own_checked, just hashed): the others'
        # are hashed, so that the whole manifest never commits bytes nobody wrote for it.
        self._check_parts(name, part, frozenset(f.path for f in m.files))
        return self._commit(name, part.whole)

    def _stale_parts(self, name: str) -> list[str]:
        """Temporary files under ``name`` that nobody has written to for
        :data:`PART_QUIET_S`: left by an attempt that died, not one under way (a second
        pusher of the same checkpoint)."""
        if not self.backend.upload_via_temp:
            return []
        cutoff = time.time() - PART_QUIET_S
        return sorted(rel for rel, info in self._find(name).items()
                      if PART_FILE.match(rel.rsplit("/", 1)[-1])
                      and (t := mtime(info)) is not None and t < cutoff)

    def _same_or_conflict(self, remote: Manifest, local: Manifest) -> Manifest:
        if not same_content(remote, local):
            raise RemoteError(
                f"{self.url_of(local.name)} already holds a different checkpoint of the same "
                "name; names are never reused, so the remote was written by another tool: "
                "inspect it and delete it if it is not wanted",
                url=self.url_of(local.name),
                retryable=False,
            )
        return remote

    def _unchanged_sources(self, m: Manifest) -> dict[tuple[str, str, int], str]:
        """(algo, digest, size) -> remote path of that content in the previous committed checkpoint.

        Only on backends with a server-side copy. The previous checkpoint is the last one this
        store committed, or else the one ``LATEST`` names, read through its manifest
        (committed, so its files had their listed sizes): two small reads. Any trouble just
        means uploading everything; a copy from a checkpoint deleted since (retention, gc)
        fails, and that file is uploaded instead.
        """
        if not self.backend.server_copy or self.keys:  # each encrypted file is bound to its name
            return {}
        prev = self._last_commit
        if prev is None or prev.name == m.name:
            try:
                hint = self.read_latest()
                prev = self.read_manifest(hint) if hint is not None and hint != m.name else None
            except CkptSyncError as e:
                log.debug("no previous checkpoint to copy unchanged files from: %s", e)
                return {}
        if prev is None:
            return {}
        return {(f.algo, f.digest, f.size): self._path(prev.name, f.path)
                for f in prev.files if f.size}

    def _copy_unchanged(self, source: str, final: str, entry: FileEntry, url: str) -> bool:
        """Server-side copy ``source`` to ``final``; False (upload instead) if it fails."""
        def copy() -> None:
            self.fs.copy(source, final)
            self.fs.invalidate_cache(final)
            size = int(self.fs.info(final).get("size") or 0)
            if size != entry.size:
                raise CorruptCheckpointError(f"{url}: copy has {size} bytes, not {entry.size}",
                                             path=url)

        try:
            self._call(copy, url, "copy to")
        except CkptSyncError as e:
            log.info("server-side copy of %s failed, uploading it instead: %s", url, e)
            return False
        with self._stats_lock:
            self.stats["bytes_copied"] += entry.size
        return True

    def _upload_task(
        self, ckpt: LocalCheckpoint, relpath: str, stop: threading.Event, *, progress: Progress,
        slots: Slots | None = None, source: str | None = None,
        stream: MultipartStream | None = None, sealed: dict[str, Any] | None = None,
    ) -> None:
        entry = next(f for f in ckpt.manifest.files if f.path == relpath)
        wrap = None
        # A file stored encrypted (encrypt_local=True) goes up as it is: never sealed twice.
        if self.keys is not None and sealed is not None and entry.encryption is None:
            keys, name = self.keys, ckpt.name

            def wrap(dst: Any) -> Any:  # each attempt encrypts afresh; the last one counts
                sealed[relpath] = keys.encryptor(dst, name=name, relpath=relpath)
                return sealed[relpath]
        final = self._path(ckpt.name, relpath)
        url = self.url_of(ckpt.name, relpath)
        # Sent while it was serialized (the bytes hashed into entry), and where the link fell
        # behind, the rest from the committed file, verified against entry.
        if stream is not None and stream.finish(entry, ckpt.file(relpath), progress, stop=stop):
            with self._stats_lock:
                self.stats["bytes_uploaded"] += entry.size
            return
        # The previous checkpoint holds these very bytes (same digest): copy, do not send.
        # The copy's size is checked, and every download verifies its digest as usual.
        if source is not None and self._copy_unchanged(source, final, entry, url):
            progress.update(entry.size)
            return
        with self._stats_lock:
            self.stats["bytes_uploaded"] += entry.size
        if (self.backend.parallel_parts and slots is not None and wrap is not None
                and entry.size > self.config.part_size and private_api_usable(self.fs)):
            with contextlib.suppress(S3ApiChanged):  # warned about: the plain way below
                upload_sealed_multipart(self.fs, ckpt.file(relpath), final, entry, url=url,
                                        config=self.config, retrier=self._retry, slots=slots,
                                        seal=wrap, stored=stored_size(entry.size),
                                        progress=progress, stop=stop)
                return
        if (self.backend.parallel_parts and slots is not None and wrap is None
                and entry.size > self.config.part_size):
            upload_file_multipart(self.fs, ckpt.file(relpath), final, entry, url=url,
                                  config=self.config, retrier=self._retry, slots=slots,
                                  progress=progress, stop=stop)
            return
        target, finish = final, None
        if self.backend.upload_via_temp:
            head, _, base = final.rpartition("/")
            target = f"{head}/{temp_name(base, 'part')}"
            rename = self._durable_rename if self.backend.local_paths else self.fs.mv
            finish = partial(rename, target, final)
        try:
            upload_file(
                self.fs,
                ckpt.file(relpath),
                target,
                entry,
                url=self.url_of(ckpt.name, relpath),
                config=self.config,
                retrier=self._retry,
                progress=progress,
                stop=stop,
                finish=finish,
                wrap=wrap,
            )
        except BaseException as e:
            if target != final:  # a failed attempt removes its own temporary file
                with contextlib.suppress(Exception):
                    self.fs.rm_file(target)
            if isinstance(e, RemoteError) and not e.retryable and not_found(e):
                # This push already read the root's marker, so the bucket is there: a "not
                # found" here is an upload session that finished while its reply was lost
                # (gcsfs sends the last request of a resumable upload again). Ambiguous: a new
                # upload resolves it.
                raise RemoteError(f"cannot upload to {url}: the server no longer knew the upload "
                                  "when its last request was sent again (the reply to it was "
                                  "lost); retry the push", url=url, retryable=True) from e
            raise

    # ------------------------------------------------------------------ the commit

    def _create_manifest(self, name: str, data: bytes) -> None:
        """Write ``<name>/ckptsync.json`` only if it does not exist: the commit point.

        Raises :class:`ManifestExists` if a manifest is already there.
        """
        self._create_only(self._path(name, MANIFEST_NAME), self.url_of(name, MANIFEST_NAME), data,
                          "commit manifest to")

    def _update_latest(self, m: Manifest, prev: Manifest | None = None) -> None:
        """Point ``LATEST`` at ``m`` unless it names a newer checkpoint. Where this store
        committed ``prev`` (older than ``m``) last, it wrote ``LATEST`` last too (one run
        writes a prefix), so ``LATEST`` is written without being read: a hint only, never
        trusted without its manifest, so a rare step back costs nothing."""
        if prev is not None and prev.sort_key() < m.sort_key():
            current = None
        else:
            current = self.read_latest()
        # A step-less checkpoint just took the highest seq: it is the newest step-less one,
        # whatever its name's timestamp says.
        stepless = m.step is None and current is not None and parse_name(current) is not None \
            and parse_name(current)[0] is None  # type: ignore[index]
        if current is not None and not stepless \
                and name_sort_key(current) >= name_sort_key(m.name):
            return
        data = (json.dumps({"name": m.name, "step": m.step, "created": m.created}) + "\n").encode()
        try:
            self._replace(self._path(LATEST_NAME), self.url_of(LATEST_NAME), data)
        except CkptSyncError as e:
            # LATEST is only a hint: the commit already happened.
            log.warning("checkpoint %s is committed, but the LATEST hint was not updated: %s",
                        m.name, e)
