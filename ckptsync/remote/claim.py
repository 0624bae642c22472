"""Claiming the root for a run: the root marker (:mod:`ckptsync.remote.marker`) written at a
run's first push, the run a store pushes as, and what a key changes there.

:meth:`ClaimMixin._ensure_marker` runs once per store, before its first push writes
anything: it writes the marker with the create-only write, or joins the run the marker names
(:meth:`ClaimMixin._join_run`: a second run is refused where the backend has a create-only
write, warned about elsewhere), and records in the marker a key it does not list yet.
:meth:`ClaimMixin._check_push_policy` refuses plaintext into an encrypted run.
"""

from __future__ import annotations

import logging
from functools import partial

from ckptsync.errors import ConfigError, RemoteError
from ckptsync.manifest import Manifest
from ckptsync.ownership import ROOT_MARKER
from ckptsync.remote.marker import RootMarker, new_run_id
from ckptsync.remote.writes import ManifestExists, WriteBase

__all__ = ["ClaimMixin"]

log = logging.getLogger("ckptsync.remote")


class ClaimMixin(WriteBase):
    """The root marker and the run of :class:`~ckptsync.remote.RemoteStore`'s pushes."""

    def _ensure_marker(self, part: bool = False) -> None:
        """Mark the root as ckptsync's before the first file of the first push lands there, so
        that ``gc`` may later collect that push's leftovers (and nothing else); or join the
        run its marker names (:meth:`_join_run`); record a key the marker does not list yet.

        ``part``: the push is one node's part of a multi-node checkpoint, whose nodes are
        one run: a node directory that has no run yet takes the marker's.

        Raises:
            ConfigError: another run writes this root (where the backend has a create-only
                write; elsewhere a warning).
        """
        if self._marked:
            return
        marker = self.read_marker(fresh=True)
        if marker is None:
            run = self._run or (self.run_file.read() if self.run_file else None) or new_run_id()
            new = RootMarker.new(run, self.keys)
            if self.backend.needs_dirs:
                self._call(partial(self.fs.makedirs, self.root, exist_ok=True), self.url,
                           "create")
            try:
                self._create_only(self._path(ROOT_MARKER), self.url_of(ROOT_MARKER),
                                  new.to_json(self.keys), "mark")
                marker = self._marker = RootMarker.parse(new.to_json(self.keys), self.url)
                if self.run_file is not None:
                    self.run_file.adopt(run)
            except ManifestExists:  # another writer marked it first: join it, or not
                marker = self.read_marker(fresh=True)
                if marker is None:
                    raise RemoteError(f"{self.url_of(ROOT_MARKER)}: create-only write refused "
                                      "but no marker is there", retryable=True) from None
        self._join_run(marker, part)
        if self._run is not None and self._run == marker.run and marker.needs_update(self.keys):
            assert self.keys is not None
            self._write_marker(marker.updated(self.keys))
        self._marked = True

    def _join_run(self, marker: RootMarker, part: bool) -> None:
        """Push as the run ``marker`` names, or refuse: one prefix holds one run."""
        if marker.run is None:  # written by a ckptsync before run ids: nothing to enforce
            log.info("%s was marked by an older ckptsync, without a run id: a second run "
                     "writing into it cannot be detected", self.url)
            return
        own = self.run_file.read() if self.run_file is not None else None
        if self.run_file is None or own == marker.run:
            self._run = marker.run
            return
        if own is None and part:  # the nodes of a multi-node checkpoint are one run
            self._run = self.run_file.adopt(marker.run)
            return
        where = self.run_file.directory
        if own is None:
            why = (f"{where} has not restored or pulled from it, so its pushes would be a "
                   "second run's in the same prefix (and each run's retention would delete the "
                   "other's checkpoints). To continue that run, restore from it first "
                   f"(Checkpointer.restore(), or ckptsync pull {self.url} {where}); for a new "
                   "run, use a new prefix")
        else:
            why = (f"{where} belongs to run {own} ({self.run_file.path}): one prefix holds one "
                   "run, so a second run's writer is refused. Use a new prefix for this run (if "
                   f"{where} really continues run {marker.run}, delete {self.run_file.path} "
                   "and restore from the remote first)")
        msg = f"{self.url} holds run {marker.run} (its {ROOT_MARKER}); {why}"
        if self.backend.native_create_only or self.backend.local_paths:
            raise ConfigError(msg)
        log.warning("SECOND RUN IN ONE PREFIX, NOT REFUSED (%s has no create-only write, so "
                    "two runs cannot be kept apart reliably): %s", self.backend.name, msg)
        self._run = own or self.run_file.adopt(new_run_id())

    def _write_marker(self, marker: RootMarker) -> None:
        """Rewrite the root marker (its run unchanged): a key this run now pushes under."""
        data = marker.to_json(self.keys)
        self._replace(self._path(ROOT_MARKER), self.url_of(ROOT_MARKER), data)
        self._marker = RootMarker.parse(data, self.url_of(ROOT_MARKER))
        log.info("%s: this run is encrypted, under key ids %s", self.url,
                 ", ".join(self._marker.key_ids))

    def _check_push_policy(self, m: Manifest) -> None:
        """Refuse to put plaintext into a run that is encrypted when no key is given (a
        checkpoint already stored encrypted, ``encrypt_local=True``, goes up as it is).

        Raises:
            ConfigError: naming the file and the key ids the run uses.
        """
        marker = self._marker
        if self.keys is not None or marker is None or not marker.encrypted:
            return
        plain = [f.path for f in m.files if f.encryption is None]
        if plain:
            raise ConfigError(
                f"{self.url} holds an encrypted run (its {ROOT_MARKER} says so; key ids "
                f"{', '.join(marker.key_ids) or '?'}), and no key was given: pushing {m.name} "
                f"would put plaintext ({plain[0]}) into it. Give the run's key (--key-file FILE, "
                "CKPTSYNC_KEY or CKPTSYNC_KEY_FILE, Checkpointer(encryption_key=...))")
