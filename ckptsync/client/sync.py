"""What becomes of a run's committed checkpoints: the upload to the remote and retention.

:class:`RunSync` owns, for one :class:`~ckptsync.client.Checkpointer` on this rank, the
in-process :class:`~ckptsync.client.uploader.Uploader` (rank 0 has one from the start; the
leader of another node gets one with its first part of a multi-node checkpoint), local and
remote retention, and the checkpoint this run resumed from (which retention keeps). Both save
strategies, replicated and sharded, hand it what they committed; nothing else touches the
uploader.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ckptsync.client.syncstatus import SyncStatus
from ckptsync.client.uploader import Uploader
from ckptsync.errors import CorruptCheckpointError
from ckptsync.local import LocalCheckpoint, LocalStore
from ckptsync.manifest import Manifest, parse_name
from ckptsync.mounts import flush_tree
from ckptsync.redact import redact_url
from ckptsync.retention import CheckpointInfo, RetentionPolicy, select_for_deletion

if TYPE_CHECKING:
    from ckptsync.client.restore import RestoreInfo
    from ckptsync.remote import RemoteStore
    from ckptsync.remote.process import RemoteSpec

__all__ = ["RunSync"]

log = logging.getLogger("ckptsync")


class RunSync:
    """Uploads and retention of the checkpoints committed in ``store``.

    Args:
        store: the local checkpoints.
        remote: where they go (None: no uploads, local retention only).
        policy: the retention policy, applied locally and remotely.
        on_remote_error: the uploader's ``on_error`` (``"warn"`` or ``"raise"``).
        process_spec: push in an upload process that opens its store from this
            (:mod:`ckptsync.remote.process`); None: in the uploader's thread.
    """

    def __init__(self, store: LocalStore, remote: RemoteStore | None, policy: RetentionPolicy,
                 on_remote_error: str, process_spec: RemoteSpec | None = None) -> None:
        self.store = store
        self.remote = remote
        self.policy = policy
        self.on_remote_error = on_remote_error
        self.process_spec = process_spec
        self._uploader: Uploader | None = None
        self._retention_lock = threading.Lock()  # the save and the upload thread both apply it
        self._resumed_from: str | None = None
        self._restored: RestoreInfo | None = None
        self._flushed: str | None = None  # the newest remote checkpoint a wait flushed
        mount = remote.mount if remote is not None else None
        if mount is not None:  # once, at start-up: not with every save
            log.warning("remote %s: %s; %s", redact_url(mount.path), mount.note, mount.advice)

    # ------------------------------------------------------------------ the save side
    def start_uploads(self) -> None:
        """Upload what is committed from now on (with a remote; once: later calls do
        nothing). Rank 0 from the start; another node's leader with its first part."""
        if self.remote is not None and self._uploader is None:
            process = None
            if self.process_spec is not None:
                from ckptsync.remote.process import UploadProcess, upload_nice

                process = UploadProcess(self.process_spec, upload_nice())
            self._uploader = Uploader(self.remote, on_error=self.on_remote_error,
                                      after_push=self._after_push, process=process)

    def before_save(self) -> None:
        """Raise an upload's error (``on_remote_error="raise"``), and warn while the remote
        cannot keep up.

        Raises:
            RemoteError: a failed upload, with ``on_remote_error="raise"``.
        """
        if self._uploader is not None:
            self._uploader.raise_error()
            if self._uploader.lagging():
                log.warning("%s", self._uploader.status().lag())

    def ready_to_stream(self) -> bool:
        """Whether a checkpoint written now is worth streaming to the remote while written."""
        return self._uploader is not None and self._uploader.ready_to_stream()

    def committed(self, ckpt: LocalCheckpoint, streams: Mapping[str, Any] | None = None) -> None:
        """``ckpt`` was committed locally: queue its upload, then apply local retention."""
        if self._uploader is not None:
            self._uploader.offer(ckpt, streams or {})
        self.apply_local_retention()

    def resumed(self, info: RestoreInfo) -> None:
        """This run resumed from ``info``'s checkpoint: retention keeps it, locally and
        remotely, and :meth:`status` knows what a pull brought back."""
        self._resumed_from = info.name
        self._restored = info

    # ------------------------------------------------------------------ retention
    def _after_push(self, manifest: Manifest) -> None:
        """In the upload thread, after ``manifest`` was committed remotely: retention."""
        assert self.remote is not None
        if self.policy.active:
            protect = [n for n in (self._resumed_from,) if n]
            self.remote.apply_retention(self.policy, protect=protect)
            self.apply_local_retention()  # the previous upload no longer needs its files

    def apply_local_retention(self) -> None:
        """Local retention; it spares the checkpoint being uploaded and the one waiting (so
        the disk holds at most what the policy keeps plus those two, whatever the remote
        does) and the one this run resumed from."""
        if not self.policy.active:
            return
        with self._retention_lock:
            # Only usable checkpoints this tool wrote count: a broken one must neither protect
            # itself nor push a good one out (it is left for a human, as remote retention
            # leaves it), and anything else beside them is the user's.
            infos = [CheckpointInfo(c.name, c.step, c.manifest.sort_key(), c.manifest.metrics)
                     for c in self.store.list()
                     if parse_name(c.name) is not None and _usable(self.store, c)]
            # Listed first: a checkpoint committed after the listing is not deleted here.
            protect = self._uploader.protected() if self._uploader is not None else set()
            if self._resumed_from:
                protect.add(self._resumed_from)
            for doomed in select_for_deletion(infos, self.policy, protect=protect):
                self.store.delete(doomed)
                log.info("retention: deleted local checkpoint %s", doomed)

    # ------------------------------------------------------------------ waiting, closing
    def wait(self, timeout: float) -> bool:
        """Wait for the uploads (see :meth:`Uploader.wait_idle`); True once the newest
        checkpoint is remote (or nothing uploads here).

        Raises:
            RemoteError: a failed upload, with ``on_remote_error="raise"``.
        """
        if self._uploader is None:
            return True
        caught_up = self._uploader.wait_idle(timeout)
        self._uploader.raise_error()
        if not caught_up:
            log.warning("stopped waiting for the remote: %s", self._uploader.status().lag())
        self._flush_mount()
        return caught_up

    def _flush_mount(self) -> None:
        """On a FUSE mount (Colab's Drive), after a wait that found a newer checkpoint
        committed: flush the remote directory and say what to run before the session ends."""
        mount = self.remote.mount if self.remote is not None else None
        newest = self._uploader.status().newest_remote if self._uploader is not None else None
        if mount is None or newest is None or newest == self._flushed:
            return
        try:
            flush_tree(mount.path)
        except OSError as e:  # reported, and flushed again at the next wait
            log.warning("could not flush %s: %s", mount.what, e)
            return
        self._flushed = newest
        log.warning("%s", mount.guidance)

    def wait_quietly(self, timeout: float) -> None:
        """:meth:`wait` without raising or warning (leaving after an error)."""
        if self._uploader is not None:
            self._uploader.wait_idle(timeout)

    def close(self) -> None:
        """Stop uploading (an unfinished upload is abandoned, never committed)."""
        if self._uploader is not None:
            self._uploader.close()

    def status(self) -> SyncStatus:
        """Where the upload to the remote stands (see :class:`SyncStatus`). After a restore
        that pulled from the remote, and until this run's first save, the checkpoint pulled
        is the newest both locally and remotely as far as this run knows."""
        if self._uploader is not None:
            st = self._uploader.status()
        else:
            st = SyncStatus(remote=None if self.remote is None else redact_url(self.remote.url))
        if self.remote is not None and self.remote.mount is not None:
            st = replace(st, remote_mount=self.remote.mount.what)
        got = self._restored
        if got is None or got.pulled_from is None:
            return st
        if st.newest_local is None:
            st = replace(st, newest_local=got.name, newest_local_step=got.step)
        if st.newest_remote is None:
            st = replace(st, newest_remote=got.name, newest_remote_step=got.step)
        return replace(st, behind=st.newest_local != st.newest_remote)


def _usable(store: LocalStore, ckpt: LocalCheckpoint) -> bool:
    """Counts for retention: usable and every file there with its size (no hashing)."""
    try:
        store.verify(ckpt, full=False)
    except CorruptCheckpointError as e:
        log.debug("retention leaves %s alone: %s", ckpt.name, e)
        return False
    return True
