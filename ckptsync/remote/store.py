"""The public :class:`RemoteStore`: one object composed of parts that each own their state,
wired here and nowhere else.

- :class:`~ckptsync.remote.location.Location` (``at``): the filesystem, the root, the backend,
  the one retried call;
- :class:`~ckptsync.remote.manifests.ManifestReader` and
  :class:`~ckptsync.remote.listing.Listing`: reading manifests, ``LATEST`` and what is there;
- :class:`~ckptsync.remote.visibility.Visibility`: how a checkpoint becomes visible on this
  storage, chosen once from the backend;
- :class:`~ckptsync.remote.claim.RunClaim`: the root marker and the run this store pushes as;
- :class:`~ckptsync.remote.commit.Committer` and :class:`~ckptsync.remote.nodeparts.NodeParts`:
  the commit of one writer's checkpoint, and of a multi-node one;
- :class:`~ckptsync.remote.push.Pusher`: pushes (uploads through the routes of
  :mod:`ckptsync.remote.routes`);
- :class:`~ckptsync.remote.fetch.Fetcher`: pulls, downloads, verification;
- :class:`~ckptsync.remote.collect.Collector`: deletion, retention, ``gc``.

Each public method of the store is one of theirs, documented there in full.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ckptsync.atomic import FileOps
from ckptsync.config import TransferConfig
from ckptsync.crypto import KeyRing
from ckptsync.local import LocalCheckpoint, LocalStore
from ckptsync.manifest import FileEntry, Manifest
from ckptsync.mounts import MountedRemote
from ckptsync.ownership import RunFile
from ckptsync.progress import Progress
from ckptsync.redact import redact_url
from ckptsync.remote.backends import Backend
from ckptsync.remote.claim import RunClaim
from ckptsync.remote.collect import Collector
from ckptsync.remote.commit import Committer
from ckptsync.remote.fetch import Fetcher
from ckptsync.remote.listing import Listing, RemoteEntry
from ckptsync.remote.location import Location
from ckptsync.remote.manifests import ManifestReader
from ckptsync.remote.marker import RootMarker
from ckptsync.remote.nodeparts import NodeParts
from ckptsync.remote.push import Pusher
from ckptsync.remote.visibility import visibility_for
from ckptsync.retention import RetentionPolicy
from ckptsync.transfer import MultipartStream

__all__ = ["RemoteStore"]

log = logging.getLogger("ckptsync.remote")


class RemoteStore:
    """Committed checkpoints under one fsspec URL.

    Args:
        url: ``s3://bucket/prefix``, ``gs://...``, ``gdrive://...``, ``file:///path``,
            ``memory://...`` or a plain local path.
        storage_options: passed to fsspec unchanged (credentials, endpoint, ...).
        fs: an fsspec filesystem to use instead of the one the URL names (a fault seam for
            tests, or a pre-built client); ``url`` still names the root.
        config: transfer settings (default: :meth:`TransferConfig.resolve`).
        ops: the file system calls made where the remote is a local path (``file://``, a
            mounted drive): its fsyncs make every file durable before the manifest (a fault
            seam for tests).
        keys: encrypt pushes with the first key, decrypt pulls by key id
            (:mod:`ckptsync.crypto`); None: files are stored as they are, and encrypted
            checkpoints cannot be pulled.
        run_file: the local directory's record of its run: this store's pushes are that
            run's (:mod:`ckptsync.remote.marker`); None: the run of the root it pushes to.
        allow_plaintext: accept plaintext checkpoints (and manifests without a MAC) where the
            encryption policy (:mod:`ckptsync.integrity`) would refuse them: for migrating a
            run.

    Raises:
        ConfigError: unknown scheme, or the backend's optional package is missing.
        RemoteError: the backend cannot be set up.

    Example::

        store = RemoteStore("s3://bucket/runs/exp1")
        store.push(LocalStore("ckpts").list()[-1])
        store.pull(None, LocalStore("/tmp/restore"))   # newest valid, every digest verified
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None, *,
                 fs: Any = None, config: TransferConfig | None = None,
                 ops: FileOps | None = None, keys: KeyRing | None = None,
                 run_file: RunFile | None = None, allow_plaintext: bool = False) -> None:
        at = self.at = Location(url, storage_options, fs=fs, config=config, ops=ops)
        if allow_plaintext:
            log.warning("allow_plaintext: plaintext checkpoints and manifests without a MAC "
                        "are accepted from %s (a bucket writer could plant one)", at.url)
        self.manifests = ManifestReader(at)
        self.listing = Listing(at, self.manifests)
        visibility = visibility_for(at)
        self.claim = RunClaim(at, visibility, keys, run_file)
        committer = Committer(at, self.manifests, self.listing, visibility, self.claim, keys)
        self.parts = NodeParts(at, self.manifests, self.listing, visibility, committer)
        self.pusher = Pusher(at, self.manifests, self.listing, self.claim, visibility,
                             committer, self.parts, keys)
        self.fetcher = Fetcher(at, self.manifests, self.listing, self.claim, keys,
                               allow_plaintext)
        self.collector = Collector(at, self.manifests, self.listing, self.claim)

    def __repr__(self) -> str:
        return f"RemoteStore({redact_url(self.url)!r})"

    # ------------------------------------------------------------------ what it is

    @property
    def url(self) -> str:
        """The remote URL as it may be shown: without user info or query string."""
        return self.at.url

    @property
    def fs(self) -> Any:
        """The fsspec filesystem."""
        return self.at.fs

    @property
    def root(self) -> str:
        """The root's path in :attr:`fs`."""
        return self.at.root

    @property
    def scheme(self) -> str:
        """The URL's scheme (``file`` for a plain path)."""
        return self.at.scheme

    @property
    def config(self) -> TransferConfig:
        """The transfer settings."""
        return self.at.config

    @property
    def backend(self) -> Backend:
        """What the storage can do, and its specifics (:mod:`ckptsync.remote.backends`)."""
        return self.at.backend

    @property
    def mount(self) -> MountedRemote | None:
        """The FUSE mount (Colab's Drive) a local-directory remote is on, where "committed"
        means handed to the mount (:mod:`ckptsync.mounts`); None elsewhere."""
        return self.at.mount

    @property
    def keys(self) -> KeyRing | None:
        """The keys pushes encrypt with and pulls decrypt with (None: no encryption)."""
        return self.fetcher.keys

    @property
    def allow_plaintext(self) -> bool:
        """Whether plaintext checkpoints are accepted where the policy would refuse them."""
        return self.fetcher.allow_plaintext

    @property
    def run_file(self) -> RunFile | None:
        """The local directory's record of the run this store pushes as, if bound."""
        return self.claim.run_file

    @property
    def stats(self) -> dict[str, int]:
        """Totals over this store's pushes: ``bytes_uploaded``, and ``bytes_copied``
        server-side instead."""
        return self.pusher.stats

    def url_of(self, *parts: str) -> str:
        """The user-facing URL of ``parts`` under the root (for messages)."""
        return self.at.url_of(*parts)

    # ------------------------------------------------------------------ reading

    def read_manifest(self, name: str) -> Manifest | None:
        """The manifest of ``name``, or None when it is not committed
        (:meth:`ManifestReader.read <ckptsync.remote.manifests.ManifestReader.read>`)."""
        return self.manifests.read(name)

    def read_latest(self) -> str | None:
        """The checkpoint name ``LATEST`` points to, or None (missing, unreadable, unsafe)."""
        return self.manifests.read_latest()

    def scan(self) -> list[RemoteEntry]:
        """Every top-level prefix with its status, oldest first
        (:meth:`Listing.scan <ckptsync.remote.listing.Listing.scan>`)."""
        return self.listing.scan()

    def iter_committed(self) -> Iterator[RemoteEntry]:
        """Committed checkpoints, newest first, with their status, manifests read lazily
        (:meth:`Listing.iter_committed <ckptsync.remote.listing.Listing.iter_committed>`)."""
        return self.listing.iter_committed()

    def iter_valid(self) -> Iterator[Manifest]:
        """Valid checkpoints, newest first, reading manifests lazily."""
        return self.listing.iter_valid()

    def newest_valid(self) -> Manifest | None:
        """The newest valid checkpoint, or None. Cheap: O(1) manifest reads in the usual case."""
        return self.listing.newest_valid()

    # ------------------------------------------------------------------ the run

    def read_marker(self, *, fresh: bool = False) -> RootMarker | None:
        """The root marker (:mod:`ckptsync.remote.marker`), or None where there is none;
        read once per store unless ``fresh``."""
        return self.claim.read_marker(fresh=fresh)

    def has_marker(self) -> bool:
        """Whether the root carries ckptsync's marker."""
        return self.claim.has_marker()

    @property
    def run_id(self) -> str | None:
        """The run this store writes as: the one it pushed as, else its local directory's,
        else the root marker's; None when none is known."""
        return self.claim.run_id

    def bind_run(self, directory: Path | str) -> None:
        """Push as the run of local ``directory`` (unless a run file is bound already)."""
        self.claim.bind_run(directory)

    def adopt_run(self) -> str | None:
        """The local directory continues the root's run (after or before a restore or pull
        from it); returns the run id."""
        return self.claim.adopt_run()

    # ------------------------------------------------------------------ writing

    def push(self, ckpt: LocalCheckpoint, *, progress: Progress | None = None,
             stop: threading.Event | None = None,
             streams: Mapping[str, MultipartStream] | None = None,
             fresh: bool = False) -> Manifest:
        """Upload a committed local checkpoint and commit it remotely; returns the remote
        manifest (:meth:`Pusher.push <ckptsync.remote.push.Pusher.push>`: arguments, errors)."""
        return self.pusher.push(ckpt, progress=progress, stop=stop, streams=streams,
                                fresh=fresh)

    def stream_file(self, name: str, relpath: str) -> MultipartStream | None:
        """A sink uploading ``<name>/<relpath>`` while it is being written locally (S3 only;
        None elsewhere: :meth:`Pusher.stream_file <ckptsync.remote.push.Pusher.stream_file>`)."""
        return self.pusher.stream_file(name, relpath)

    def waiting_for(self, m: Manifest) -> tuple[int, ...] | None:
        """The nodes a pushed part ``m`` waits for; None once its checkpoint is committed
        (:meth:`NodeParts.waiting_for <ckptsync.remote.nodeparts.NodeParts.waiting_for>`)."""
        return self.parts.waiting_for(m)

    # ------------------------------------------------------------------ reading back

    def pull(self, name: str | None, local: LocalStore, *, newer_than: Manifest | None = None,
             progress: Progress | None = None, stop: threading.Event | None = None,
             skipped: list[tuple[str, str]] | None = None,
             keep_encrypted: bool = False) -> LocalCheckpoint:
        """Download a checkpoint (``name``; None: the newest valid one) into ``local``, every
        digest verified while streaming, and commit it there
        (:meth:`Fetcher.pull <ckptsync.remote.fetch.Fetcher.pull>`: arguments, errors)."""
        return self.fetcher.pull(name, local, newer_than=newer_than, progress=progress,
                                 stop=stop, skipped=skipped, keep_encrypted=keep_encrypted)

    def fetch_files(self, m: Manifest, relpaths: Iterable[str], directory: Path, *,
                    ops: Any = None, progress: Progress | None = None,
                    stop: threading.Event | None = None) -> list[FileEntry]:
        """Download some of ``m``'s files into ``directory``, each verified
        (:meth:`Fetcher.fetch_files <ckptsync.remote.fetch.Fetcher.fetch_files>`)."""
        return self.fetcher.fetch_files(m, relpaths, directory, ops=ops, progress=progress,
                                        stop=stop)

    def check_policy(self, m: Manifest) -> None:
        """Raise unless ``m`` may be restored under this store's keys (the encryption policy)."""
        self.fetcher.check_policy(m)

    def verify(self, name: str, *, full: bool = True, progress: Progress | None = None,
               stop: threading.Event | None = None) -> Manifest:
        """Check that ``name`` is committed, every file has its size and, if ``full``, its
        digest (:meth:`Fetcher.verify <ckptsync.remote.fetch.Fetcher.verify>`)."""
        return self.fetcher.verify(name, full=full, progress=progress, stop=stop)

    # ------------------------------------------------------------------ deleting

    def check_owned(self, entries: Iterable[RemoteEntry] | None = None) -> bool:
        """Whether ckptsync may delete under this root
        (:meth:`Collector.check_owned <ckptsync.remote.collect.Collector.check_owned>`)."""
        return self.collector.check_owned(entries)

    def delete(self, name: str) -> None:
        """Delete a checkpoint: the manifest first, then its files."""
        self.collector.delete(name)

    def abandon(self, name: str) -> list[str]:
        """Remove what an abandoned push of ``name`` left, while it is uncommitted
        (:meth:`Collector.abandon <ckptsync.remote.collect.Collector.abandon>`)."""
        return self.collector.abandon(name)

    def apply_retention(self, policy: RetentionPolicy, protect: Iterable[str] = (), *,
                        dry_run: bool = False) -> list[str]:
        """Delete the valid checkpoints of this run that ``policy`` does not keep
        (:meth:`Collector.apply_retention
        <ckptsync.remote.collect.Collector.apply_retention>`)."""
        return self.collector.apply_retention(policy, protect, dry_run=dry_run)

    def gc(self, grace_s: float | None = None, *, dry_run: bool = False,
           now: float | None = None) -> list[str]:
        """Remove what crashed writers left, older than ``grace_s``
        (:meth:`Collector.gc <ckptsync.remote.collect.Collector.gc>`)."""
        return self.collector.gc(grace_s, dry_run=dry_run, now=now)

    # Defined last: inside the class body the name "list" would shadow the builtin.
    def list(self, *, strict: bool = False) -> list[Manifest]:
        """Committed checkpoints (manifest present and parseable), oldest first
        (:meth:`Listing.list <ckptsync.remote.listing.Listing.list>`)."""
        return self.listing.list(strict=strict)
