"""Pushing a checkpoint, and the commit protocol that makes it exist remotely.

:meth:`PushMixin.push` uploads every file (parallel, streamed, retried; multipart on S3; a
server-side copy of a file unchanged since the previous checkpoint), checks each remote size,
then writes the manifest with a create-only write (:meth:`PushMixin._create_only`): its
presence is the commit. ``LATEST`` is updated last, as a hint. How each step is done depends
on the backend (``self.backend``): on a local directory every file is fsynced and renamed into
place, the directories are fsynced, and the manifest is hard-linked, so that a power cut never
leaves a manifest listing files that are not on disk.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

from ckptsync.atomic import temp_name
from ckptsync.crypto import stored_size
from ckptsync.errors import CkptSyncError, ConfigError, CorruptCheckpointError, RemoteError
from ckptsync.local import LocalCheckpoint
from ckptsync.manifest import FORMAT, LATEST_NAME, MANIFEST_NAME, FileEntry, Manifest, name_sort_key
from ckptsync.mounts import sync_dir
from ckptsync.ownership import ROOT_MARKER
from ckptsync.parts import PART_MARKER, Part, marker_name, part_of
from ckptsync.redact import redact_url
from ckptsync.remote.boundary import not_found
from ckptsync.remote.encrypted import same_content, sealed_manifest
from ckptsync.remote.listing import PART_FILE, PART_QUIET_S, SAFE_NAME, StoreBase, mtime
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
from ckptsync.version import __version__

__all__ = ["ManifestExists", "PushMixin"]

log = logging.getLogger("ckptsync.remote")


class ManifestExists(CkptSyncError):
    """The create-only write of a manifest (or of the root marker) found one already there."""


class PushMixin(StoreBase):
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
            return self._same_or_conflict(existing, m if part is None else part.whole)
        if part is not None and self._part_uploaded(name, m, part.node):
            return self._commit_part(name, m, part)  # e.g. a daemon's next scan
        progress = progress or NullProgress()
        self._ensure_marker()
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

    def _commit(self, name: str, m: Manifest) -> Manifest:
        """Write ``m`` with the create-only write (the commit), then the ``LATEST`` hint."""
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
        log.info("committed %s to %s", name, redact_url(self.url))
        self._last_commit = m
        self._update_latest(m)
        if self.mount is not None:
            self._sync_mount(name)
        return m

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

    def _part_uploaded(self, name: str, m: Manifest, node: int) -> bool:
        """This node's marker and every file of its part ``m`` are there, with their sizes."""
        sizes = self._sizes(name)
        try:
            self._check_sizes(m, sizes)
        except CorruptCheckpointError:
            return False
        return marker_name(node) in sizes

    def _commit_part(self, name: str, m: Manifest, part: Part) -> Manifest:
        """After node ``part.node``'s files are all there: write its marker, then commit the
        whole checkpoint if every node's marker and file is there (:mod:`ckptsync.parts`).

        Returns the whole manifest once committed (here or by another node), else ``m``.
        """
        marker = self._path(name, marker_name(part.node))
        data = m.to_json()

        def write() -> None:
            if self.backend.local_paths:
                self._local_replace(marker, data)
                return
            if not self.backend.overwrites and self.fs.exists(marker):
                self.fs.rm_file(marker)
            self.fs.pipe_file(marker, data)

        # Marker before looking at the others': whichever node writes its marker last sees
        # every marker, so some node always commits.
        self._call(write, self.url_of(name, marker_name(part.node)), "write")
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
        return self._commit(name, part.whole)

    def waiting_for(self, m: Manifest) -> tuple[int, ...] | None:
        """Where the checkpoint of the part ``m`` stands remotely, after :meth:`push` returned
        ``m`` (a node's part, not committed): None once the whole checkpoint is committed
        (its manifest is there), else the nodes whose part marker is missing (empty: every
        part is up and the last node's commit is under way). One read and one listing.

        Raises:
            RemoteError: the backend failed.
        """
        part = part_of(m)
        if part is None:
            return None
        self.fs.invalidate_cache(self._path(m.name))
        if self.read_manifest(m.name) is not None:
            return None
        done = {int(x.group(1)) for rel in self._sizes(m.name) if (x := PART_MARKER.match(rel))}
        return tuple(sorted(set(range(part.nodes)) - done))

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

    def _ensure_marker(self) -> None:
        """Mark the root as ckptsync's before the first file of the first push lands there, so
        that ``gc`` may later collect that push's leftovers (and nothing else)."""
        if self.has_marker():
            return
        if self.backend.needs_dirs:
            self._call(partial(self.fs.makedirs, self.root, exist_ok=True), self.url, "create")
        data = (json.dumps({"format": FORMAT, "writer": f"ckptsync {__version__}",
                            "created": datetime.now(timezone.utc).isoformat()}) + "\n").encode()
        with contextlib.suppress(ManifestExists):  # another writer marked it first
            self._create_only(self._path(ROOT_MARKER), self.url_of(ROOT_MARKER), data, "mark")
        self._marked = True

    # Local directories (backend.local_paths): real paths, so plain os calls. Every fsync
    # goes through self._ops (FileOps, the store's fault seam), so a test can count or fail
    # each step: the fsync of a file right before its os.replace or os.link (uploads, the
    # manifest, the marker, LATEST), the fsync of each directory before the manifest, and of
    # the manifest's directory right after its link.

    def _fsync_file(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            self._ops.fsync(fd)  # the data of every descriptor of the file, this one included
        finally:
            os.close(fd)

    def _durable_rename(self, tmp: str, final: str) -> None:
        """A local upload into place: its bytes on disk first, then the rename (the names
        are made durable by :meth:`_fsync_dirs` before the manifest)."""
        self._fsync_file(tmp)
        os.replace(tmp, final)

    def _fsync_dirs(self, m: Manifest) -> None:
        """Make the names of ``m``'s files (and of its directory) durable: before the
        manifest, or a power cut could leave a manifest listing files that are not there."""
        dirs = {self._path(m.name)} | {
            self._path(m.name, *f.path.split("/")[:-1]) for f in m.files if "/" in f.path}
        for d in sorted(dirs, reverse=True):
            self._ops.fsync_dir(Path(d))
        self._ops.fsync_dir(Path(self.root))

    def _write_synced(self, path: str, data: bytes) -> None:
        """``data`` into the file ``path``, on disk (fsync) before this returns."""
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            self._ops.fsync(f.fileno())

    def _local_replace(self, path: str, data: bytes) -> None:
        tmp = os.path.join(os.path.dirname(path), temp_name(os.path.basename(path)))
        self._write_synced(tmp, data)
        os.replace(tmp, path)

    def _local_create_only(self, path: str, data: bytes) -> None:
        # Write a temporary file, then hard-link it into place: link() fails if the target
        # exists, so this is a true create-only write and readers never see a partial file.
        tmp = os.path.join(os.path.dirname(path), temp_name(os.path.basename(path)))
        self._write_synced(tmp, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise
        except OSError:
            # Some mounts (FUSE, e.g. a mounted Google Drive) have no hard links: fall back to
            # check-then-rename, which is not atomic against a second writer of the same name.
            if os.path.exists(path):
                raise FileExistsError(path) from None
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self._ops.fsync_dir(Path(os.path.dirname(path)))  # the commit itself is durable

    def _create_only(self, path: str, url: str, data: bytes, action: str) -> None:
        """Write ``path`` only if it does not exist yet.

        Raises :class:`ManifestExists` if something is already there.
        """

        def write() -> None:
            try:
                if self.backend.local_paths:
                    self._local_create_only(path, data)
                else:
                    # S3: If-None-Match: * ; GCS: ifGenerationMatch=0 (native create-only).
                    # Other backends (memory, Drive, ...) have no create-only write: fsspec's
                    # pipe_file(mode="create") checks, then writes. Unique names make a second
                    # writer of the same name a rare, benign race (both write the same bytes).
                    self.fs.pipe_file(path, data, mode="create")
            except FileExistsError:  # S3 on moto/AWS, GCS, local, memory
                raise ManifestExists(path) from None
            except OSError as e:
                # SeaweedFS answers 412 without the If-None-Match condition, which s3fs maps
                # to OSError(EINVAL); tell it from a real EINVAL by looking.
                if e.errno == errno.EINVAL and self.backend.native_create_only:
                    self.fs.invalidate_cache(path)
                    if self.fs.exists(path):
                        raise ManifestExists(path) from e
                raise

        self._call(write, url, action)

    def _create_manifest(self, name: str, data: bytes) -> None:
        """Write ``<name>/ckptsync.json`` only if it does not exist: the commit point.

        Raises :class:`ManifestExists` if a manifest is already there.
        """
        self._create_only(self._path(name, MANIFEST_NAME), self.url_of(name, MANIFEST_NAME), data,
                          "commit manifest to")

    def _update_latest(self, m: Manifest) -> None:
        current = self.read_latest()
        if current is not None and name_sort_key(current) >= name_sort_key(m.name):
            return
        data = (json.dumps({"name": m.name, "step": m.step, "created": m.created}) + "\n").encode()
        path = self._path(LATEST_NAME)

        def write() -> None:
            if self.backend.local_paths:
                self._local_replace(path, data)
                return
            if not self.backend.overwrites and self.fs.exists(path):
                self.fs.rm_file(path)
            self.fs.pipe_file(path, data)

        try:
            self._call(write, self.url_of(LATEST_NAME), "write")
        except CkptSyncError as e:
            # LATEST is only a hint: the commit already happened.
            log.warning("checkpoint %s is committed, but the LATEST hint was not updated: %s",
                        m.name, e)

