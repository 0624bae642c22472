"""Reading checkpoints back: :class:`Fetcher` (``pull``, ``verify``, ``fetch_files``).

A pull downloads every file (in parallel; large files as parallel ranges) into the local
store's staging directory, hashing each while it is written with its manifest entry's
algorithm, and commits it there; a file whose digest does not match is downloaded again (a
body damaged in transit) before its checkpoint counts as corrupt, and ``name=None`` falls back
to the next newest valid checkpoint. ``verify`` streams and hashes the remote files in place.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any

from ckptsync.crypto import Decryptor, KeyRing, missing_key
from ckptsync.errors import (
    CorruptCheckpointError,
    LocalStorageError,
    ManifestError,
    NoCheckpointError,
    UnknownKeyError,
)
from ckptsync.hashing import WriteOps
from ckptsync.integrity import check_checkpoint
from ckptsync.local import STAGING_PREFIX, FileOps, LocalCheckpoint, LocalStore
from ckptsync.manifest import WRITE_ALGO, FileEntry, Manifest, check_relpath, name_sort_key
from ckptsync.ownership import RunFile
from ckptsync.redact import redact_url
from ckptsync.remote.claim import RunClaim
from ckptsync.remote.encrypted import plain_manifest, same_content
from ckptsync.remote.filedrop import FileDrop
from ckptsync.remote.listing import Listing
from ckptsync.remote.location import Location
from ckptsync.remote.manifests import ManifestReader
from ckptsync.transfer import (
    NullProgress,
    Progress,
    Slots,
    download_file,
    download_file_ranged,
    hash_remote_file,
    run_parallel,
)

__all__ = ["Fetcher"]

log = logging.getLogger("ckptsync.remote")


class Fetcher:
    """The pulls, downloads and verifications of one store.

    Args:
        at: the remote root; ``manifests``, ``listing``: its reads.
        claim: the root's marker (the encryption policy, the run a pull continues).
        keys: decrypt pulls by key id (:mod:`ckptsync.crypto`); None: encrypted checkpoints
            cannot be pulled.
        allow_plaintext: accept plaintext checkpoints (and manifests without a MAC) where the
            encryption policy (:mod:`ckptsync.integrity`) would refuse them.
    """

    def __init__(self, at: Location, manifests: ManifestReader, listing: Listing,
                 claim: RunClaim, keys: KeyRing | None, allow_plaintext: bool) -> None:
        self.at = at
        self.manifests = manifests
        self.listing = listing
        self.claim = claim
        self.keys = keys
        self.allow_plaintext = allow_plaintext

    def pull(
        self,
        name: str | None,
        local: LocalStore,
        *,
        newer_than: Manifest | None = None,
        progress: Progress | None = None,
        stop: threading.Event | None = None,
        skipped: list[tuple[str, str]] | None = None,
        keep_encrypted: bool = False,
    ) -> LocalCheckpoint:
        """Download a checkpoint into ``local`` (digests verified while streaming) and commit it.

        The local copy keeps the remote manifest as it is: each file is hashed while written
        with its entry's algorithm, so a ``ckptsync/1`` checkpoint stays a sha256-verified
        ``ckptsync/1`` checkpoint locally, and a ``ckptsync/2`` one keeps its BLAKE3 digests.

        A file whose bytes do not match its manifest is downloaded again, up to
        ``config.digest_attempts`` times in all, before its checkpoint counts as corrupt.

        Args:
            name: the checkpoint; None means the newest valid one, falling back to the next
                newest when a download turns out corrupt.
            local: the local store to commit into (through its staging directory: nothing
                partial is ever visible, nothing is written outside it).
            newer_than: with ``name=None``, only consider checkpoints newer than this one.
            skipped: with ``name=None``, given a list, ``(name, why)`` is appended to it for
                each committed checkpoint newer than the one pulled that was passed over
                (newest first): it is not empty exactly when pull fell back.

        An encrypted checkpoint is decrypted while it downloads (its stored digest checked in
        the same pass) with the store's key of the id its manifest names, and committed
        locally as plaintext; with ``keep_encrypted`` (a ``Checkpointer(encrypt_local=True)``)
        its stored bytes and remote manifest are kept as they are (the key is still checked
        first: such a copy is pulled to be loaded). Before any byte moves, the checkpoint
        must pass the encryption policy (:func:`~ckptsync.integrity.check_checkpoint`): with
        a key, or on an encrypted root, a plaintext checkpoint or one whose keyed MAC does not
        verify is invalid, and ``name=None`` falls back past it, loudly. Once pulled, the
        local directory continues the root's run (:class:`~ckptsync.ownership.RunFile`): a
        writer there afterwards (``ckptsync watch``, a ``Checkpointer``) is that run.

        Raises:
            NoCheckpointError: nothing (valid, newer) to pull.
            EncryptionKeyError: the checkpoint chosen is encrypted under a key id of this run
                that the store does not have: raised, never a reason to pull an older
                checkpoint instead (also when nothing else could be pulled, for a key id the
                run's marker does not vouch for).
            CorruptCheckpointError: ``name`` was given and does not verify (names the path).
            UnsupportedFormatError: the checkpoint needs a format feature this version does
                not read: raised, never passed over.
            RemoteError, LocalStorageError: transfer or local write failures.
        """
        self.claim.read_marker(fresh=True)  # the encryption policy and the run record read it
        if name is not None:
            m = self.manifests.read(name)
            if m is None:
                raise NoCheckpointError(f"no committed checkpoint {self.at.url_of(name)}")
            self.listing.check_sizes(m)
            try:
                return self._pull_one(m, local, progress, stop, keep_encrypted)
            except UnknownKeyError as err:  # this one was asked for: the key is missing
                raise missing_key(err.key_id, err.name, self.at.url_of(err.name),
                                  self.keys) from err
        passed: list[tuple[str, str]] = [] if skipped is None else skipped
        unknown_key: UnknownKeyError | None = None
        for e in self.listing.iter_committed():
            if newer_than is not None and (
                    e.manifest.sort_key() <= newer_than.sort_key() if e.manifest is not None
                    else name_sort_key(e.name) <= name_sort_key(newer_than.name)):
                break
            if e.status != "valid" or e.manifest is None:
                log.warning("remote checkpoint %s is not valid, skipping it: %s", e.name,
                            e.problem)
                passed.append((e.name, e.problem or e.status))
                continue
            try:
                return self._pull_one(e.manifest, local, progress, stop, keep_encrypted)
            except CorruptCheckpointError as err:
                log.warning("%s; falling back to the previous remote checkpoint", err)
                passed.append((e.name, str(err)))
                if isinstance(err, UnknownKeyError) and unknown_key is None:
                    unknown_key = err
        if unknown_key is not None:  # nothing could be pulled: the key is what is missing
            raise missing_key(unknown_key.key_id, unknown_key.name,
                              self.at.url_of(unknown_key.name), self.keys)
        raise NoCheckpointError(
            f"no valid checkpoint{' newer than ' + newer_than.name if newer_than else ''} "
            f"in {redact_url(self.at.url)}"
        )

    def _pull_one(
        self,
        m: Manifest,
        local: LocalStore,
        progress: Progress | None,
        stop: threading.Event | None,
        keep_encrypted: bool = False,
    ) -> LocalCheckpoint:
        for own in (local.directory / m.name, local.directory / f"{STAGING_PREFIX}{m.name}"):
            if own.is_symlink():  # planted: reading, deleting or committing would follow it
                raise LocalStorageError(
                    f"cannot pull {m.name}: {own} is a symlink, and ckptsync never writes "
                    "through one; remove it or pull into another directory")
        self.check_policy(m)  # before anything is downloaded
        m = m.local_view()  # the order fields of the remote (run, seq) stay there
        try:
            have = local.get(m.name)
        except NoCheckpointError:
            have = None
        except ManifestError as e:  # a local copy with a torn manifest: replace it too
            log.warning("local copy has a bad manifest, downloading it again: %s", e)
            local.delete(m.name)
            have = None
        if have is not None:
            try:
                local.verify(have, full=True)
                if same_content(m, have.manifest):
                    self._record_run(local)
                    return have
            except CorruptCheckpointError as e:
                log.warning("local copy is corrupt, downloading it again: %s", e)
            local.delete(m.name)
        leftover = local.directory / f"{STAGING_PREFIX}{m.name}"
        if leftover.exists():  # our own crashed pull of this unique name
            shutil.rmtree(leftover, ignore_errors=True)
        progress = progress or NullProgress()
        staging = local.staging(m.name)
        try:
            progress.start(m.total_size, f"pull {m.name}")
            # Range blocks held at once, and their buffers, reused from file to file.
            slots = Slots(self.at.backend.workers)
            tasks = [partial(self._download_task, staging, m, f.path, progress=progress,
                             slots=slots, keep=keep_encrypted)
                     for f in m.files]
            run_parallel(tasks, max_workers=self.at.backend.workers, stop=stop)
            if not keep_encrypted and any(f.encryption for f in m.files):  # plaintext locally
                m = plain_manifest(m, staging.entries, self.at.url_of(m.name))
            ckpt = staging.commit(m)
        except BaseException:
            staging.abort()
            raise
        finally:
            progress.close()
        log.info("pulled %s from %s into %s", m.name, redact_url(self.at.url), local.directory)
        self._record_run(local)
        return ckpt

    def _record_run(self, local: LocalStore) -> None:
        """``local``'s directory pulled from this root: it continues the root's run (a writer
        there afterwards, ``ckptsync watch`` or a ``Checkpointer``, is the same run)."""
        marker = self.claim.read_marker()
        if marker is not None and marker.run is not None:
            RunFile(local.directory).adopt(marker.run)

    def _download_task(
        self, staging: Any, m: Manifest, relpath: str, stop: threading.Event, *,
        progress: Progress, slots: threading.Semaphore, keep: bool = False,
    ) -> None:
        entry = next(f for f in m.files if f.path == relpath)
        url = self.at.url_of(m.name, relpath)
        path = self.at.path(m.name, relpath)
        attempts = self.at.config.digest_attempts
        enc = None if keep else entry.encryption  # keep: stored bytes in, stored bytes out
        for attempt in range(1, attempts + 1):
            writer = staging.open(relpath, WRITE_ALGO if enc else entry.algo)
            if enc is not None and self.keys is not None:
                # Stored bytes in (hashed for the manifest's digest), plaintext out to writer.
                writer = self.keys.decryptor(writer, kid=enc.key_id, name=m.name,
                                             relpath=relpath, where=url)
            try:
                if entry.size >= self.at.config.ranged_min_size and self.at.backend.workers > 1:
                    download_file_ranged(self.at.fs, path, writer, entry, url=url,
                                         config=self.at.config, retrier=self.at.retry,
                                         slots=slots, progress=progress, stop=stop,
                                         open_ranges=self.at.backend.open_ranges)
                else:
                    download_file(self.at.fs, path, writer, entry, url=url, config=self.at.config,
                                  retrier=self.at.retry, progress=progress, stop=stop)
                stored = writer.hexdigest() if isinstance(writer, Decryptor) else None
                if isinstance(writer, Decryptor) and stored == entry.digest:
                    writer.finish()  # the last chunk, authenticated with its flag
                got = staging.close_file(relpath)
                if (stored or got.digest) != entry.digest:
                    what = f"{url}: {entry.algo} digest does not match the manifest"
                    raise CorruptCheckpointError(
                        f"{what} (the remote file was altered: {attempts} downloads did not "
                        "match)" if attempt == attempts else what, path=url)
                return
            except CorruptCheckpointError as e:
                # A short body or a flipped byte in transit reads like a corrupt file: only
                # the same mismatch, download after download, is damage at rest.
                progress.update(-writer.size)
                staging.discard(relpath)
                if attempt == attempts:
                    raise
                log.warning("%s; downloading it again (attempt %d of %d)", e, attempt + 1,
                            attempts)

    def check_policy(self, m: Manifest) -> None:
        """Raise unless ``m`` may be restored under this store's keys: the encryption
        policy of :func:`ckptsync.integrity.check_checkpoint`, with the root marker read now
        (whether the run is encrypted, and the key ids it vouches for)."""
        marker = self.claim.read_marker()  # read afresh by each pull
        check_checkpoint(m, self.keys,
                         vouched=marker.vouched(self.keys) if marker is not None else None,
                         encrypted_root=marker is not None and marker.encrypted,
                         allow_plaintext=self.allow_plaintext, where=self.at.url_of(m.name))

    def fetch_files(
        self,
        m: Manifest,
        relpaths: Iterable[str],
        directory: Path,
        *,
        ops: WriteOps | None = None,
        progress: Progress | None = None,
        stop: threading.Event | None = None,
    ) -> list[FileEntry]:
        """Download some of checkpoint ``m``'s files into ``directory``: not a checkpoint (no
        manifest, nothing committed), a place to read them from (a rank's sharded restore).

        Each file streams through the same path as :meth:`pull` (digest checked while
        written, downloaded again on a mismatch, decrypted where encrypted) into a temporary
        name, and is renamed into place once it matches its manifest entry: a file already
        there was verified by whoever put it there (another rank on this host), and is not
        downloaded again.

        Returns:
            the entries of the files this call downloaded (those already there left out).

        Raises:
            CorruptCheckpointError: a file is missing remotely, not listed in ``m``, or does
                not match its digest (names the URL).
            EncryptionKeyError, RemoteError, LocalStorageError: as :meth:`pull`.
        """
        self.check_policy(m)
        entries = {f.path: f for f in m.files}
        wanted: list[FileEntry] = []
        for relpath in dict.fromkeys(relpaths):
            entry = entries.get(relpath)
            if entry is None:
                url = self.at.url_of(m.name, relpath)
                raise CorruptCheckpointError(
                    f"{url}: needed to load {m.name} but not listed in its manifest", path=url)
            check_relpath(relpath, where=str(directory))
            there = directory.joinpath(*relpath.split("/"))
            # Renamed into place only once verified (a decrypted file has another size).
            if not (there.is_file() and (entry.encryption is not None
                                         or there.stat().st_size == entry.size)):
                wanted.append(entry)
        if not wanted:
            return []
        self.listing.check_sizes(m)  # a missing or truncated remote file, before any byte moves
        drop = FileDrop(directory, ops or FileOps())
        progress = progress or NullProgress()
        slots = Slots(self.at.backend.workers)  # range blocks held at once, buffers reused

        def task(relpath: str, ev: threading.Event) -> None:
            self._download_task(drop, m, relpath, ev, progress=progress, slots=slots)
            drop.publish(relpath)

        progress.start(sum(f.size for f in wanted), f"fetch {m.name}")
        try:
            run_parallel([partial(task, f.path) for f in wanted],
                         max_workers=self.at.backend.workers, stop=stop)
        finally:
            drop.abort()  # the temporary files of downloads that did not finish
            progress.close()
        return wanted

    def verify(
        self,
        name: str,
        *,
        full: bool = True,
        progress: Progress | None = None,
        stop: threading.Event | None = None,
    ) -> Manifest:
        """Check that ``name`` is committed, every file has its size and, if ``full``, its digest
        (streamed, files in parallel; each with its entry's algorithm).

        Raises:
            NoCheckpointError: ``name`` is not committed.
            CorruptCheckpointError: naming the first remote file that does not match.
        """
        m = self.manifests.read(name)
        if m is None:
            raise NoCheckpointError(f"no committed checkpoint {self.at.url_of(name)}")
        self.listing.check_sizes(m)
        if not full:
            return m
        progress = progress or NullProgress()

        def task(entry: FileEntry, ev: threading.Event) -> None:
            url = self.at.url_of(name, entry.path)
            _, digest = hash_remote_file(self.at.fs, self.at.path(name, entry.path), url=url,
                                         config=self.at.config, retrier=self.at.retry,
                                         progress=progress, stop=ev, algo=entry.algo)
            if digest != entry.digest:
                raise CorruptCheckpointError(
                    f"{url}: {entry.algo} digest does not match the manifest (the remote file "
                    "was altered)",
                    path=url,
                )

        progress.start(m.total_size, f"verify {name}")
        try:
            run_parallel([partial(task, f) for f in m.files],
                         max_workers=self.at.backend.workers, stop=stop)
        finally:
            progress.close()
        return m
