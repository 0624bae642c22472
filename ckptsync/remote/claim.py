"""Claiming the root for a run: :class:`RunClaim`, the root marker
(:mod:`ckptsync.remote.marker`) read, written at a run's first push, and the run a store pushes
as, and what a key changes there.

:meth:`RunClaim.ensure_marker` runs once per store, before its first push writes anything: it
writes the marker with the create-only write, or joins the run the marker names
(:meth:`RunClaim.join_run`: a second run is refused where the storage refuses a second writer
of a name, warned about elsewhere), and records in the marker a key it does not list yet.
:meth:`RunClaim.check_push_policy` refuses plaintext into an encrypted run.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ckptsync.crypto import KeyRing
from ckptsync.errors import ConfigError, RemoteError
from ckptsync.manifest import Manifest
from ckptsync.ownership import ROOT_MARKER, RunFile
from ckptsync.remote.location import Location
from ckptsync.remote.marker import RootMarker, new_run_id
from ckptsync.remote.visibility import ManifestExists, Visibility

__all__ = ["RunClaim"]

log = logging.getLogger("ckptsync.remote")


class RunClaim:
    """The root marker of ``at`` and the run this store's pushes belong to.

    Args:
        at: the remote root.
        visibility: how the marker is written create-only, or replaced.
        keys: the store's keys (recorded in the marker, with a MAC under each).
        run_file: the local directory's record of its run (:class:`~ckptsync.ownership.RunFile`):
            this store's pushes are that run's; None: the store takes the run of the root it
            pushes to.
    """

    def __init__(self, at: Location, visibility: Visibility, keys: KeyRing | None,
                 run_file: RunFile | None) -> None:
        self.at = at
        self.visibility = visibility
        self.keys = keys
        self.run_file = run_file
        self.run: str | None = None
        """The run this store pushes as, once it pushed (or checked the marker to push)."""
        self._marked = False  # this store has checked (or written) the root marker to push
        self._marker: RootMarker | None = None

    def read_marker(self, *, fresh: bool = False) -> RootMarker | None:
        """The root marker (:mod:`ckptsync.remote.marker`), or None where there is none;
        read once per store unless ``fresh``."""
        if self._marker is None or fresh:
            data = self.at.read_small(ROOT_MARKER)
            if data is not None:
                self._marker = RootMarker.parse(data, self.at.url_of(ROOT_MARKER))
        return self._marker

    def has_marker(self) -> bool:
        """Whether the root carries ckptsync's marker (:data:`~ckptsync.ownership.ROOT_MARKER`)."""
        return self.read_marker() is not None

    @property
    def run_id(self) -> str | None:
        """The run this store writes as: the one it pushed as, else its local directory's,
        else the root marker's (``gc``, retention); None when none is known."""
        if self.run is not None:
            return self.run
        own = self.run_file.read() if self.run_file is not None else None
        if own is not None:
            return own
        marker = self.read_marker()
        return marker.run if marker is not None else None

    def bind_run(self, directory: Path | str) -> None:
        """Push as the run of local ``directory`` (unless a run file is bound already)."""
        if self.run_file is None:
            self.run_file = RunFile(directory)

    def adopt_run(self) -> str | None:
        """After (or before) a restore or pull from this root: the local directory continues
        the root's run (recorded in its run file, unless it has one). Returns the run id."""
        marker = self.read_marker(fresh=True)
        if marker is None or marker.run is None:
            return None
        if self.run_file is None:
            return marker.run
        return self.run_file.adopt(marker.run)

    def ensure_marker(self, part: bool = False) -> None:
        """Mark the root as ckptsync's before the first file of the first push lands there, so
        that ``gc`` may later collect that push's leftovers (and nothing else); or join the
        run its marker names (:meth:`join_run`); record a key the marker does not list yet.

        ``part``: the push is one node's part of a multi-node checkpoint, whose nodes are
        one run: a node directory that has no run yet takes the marker's.

        Raises:
            ConfigError: another run writes this root (where the storage refuses a second
                writer of a name; elsewhere a warning).
        """
        if self._marked:
            return
        at = self.at
        marker = self.read_marker(fresh=True)
        if marker is None:
            run = self.run or (self.run_file.read() if self.run_file else None) or new_run_id()
            new = RootMarker.new(run, self.keys)
            at.call(lambda: at.backend.makedirs(at.root), at.url, "create")
            try:
                self.visibility.create_only(at.path(ROOT_MARKER), at.url_of(ROOT_MARKER),
                                            new.to_json(self.keys), "mark")
                marker = self._marker = RootMarker.parse(new.to_json(self.keys), at.url)
                if self.run_file is not None:
                    self.run_file.adopt(run)
            except ManifestExists:  # another writer marked it first, or this write did
                marker = self.read_marker(fresh=True)
                if marker is None:
                    raise RemoteError(f"{at.url_of(ROOT_MARKER)}: create-only write refused "
                                      "but no marker is there", retryable=True) from None
                if marker.run == run and self.run_file is not None:
                    # The marker names the run id this push chose (fresh and random): this
                    # write took effect and its reply was lost. Ambiguous, resolved by
                    # reading the remote: it is this run's.
                    self.run_file.adopt(run)
        self.join_run(marker, part)
        if self.run is not None and self.run == marker.run and marker.needs_update(self.keys):
            assert self.keys is not None
            self._write_marker(marker.updated(self.keys))
        self._marked = True

    def join_run(self, marker: RootMarker, part: bool) -> None:
        """Push as the run ``marker`` names, or refuse: one prefix holds one run."""
        if marker.run is None:  # written by a ckptsync before run ids: nothing to enforce
            log.info("%s was marked by an older ckptsync, without a run id: a second run "
                     "writing into it cannot be detected", self.at.url)
            return
        own = self.run_file.read() if self.run_file is not None else None
        if self.run_file is None or own == marker.run:
            self.run = marker.run
            return
        if own is None and part:  # the nodes of a multi-node checkpoint are one run
            self.run = self.run_file.adopt(marker.run)
            return
        url, where = self.at.url, self.run_file.directory
        if own is None:
            why = (f"{where} has not restored or pulled from it, so its pushes would be a "
                   "second run's in the same prefix (and each run's retention would delete the "
                   "other's checkpoints). To continue that run, restore from it first "
                   f"(Checkpointer.restore(), or ckptsync pull {url} {where}); for a new "
                   "run, use a new prefix")
        else:
            why = (f"{where} belongs to run {own} ({self.run_file.path}): one prefix holds one "
                   "run, so a second run's writer is refused. Use a new prefix for this run (if "
                   f"{where} really continues run {marker.run}, delete {self.run_file.path} "
                   "and restore from the remote first)")
        msg = f"{url} holds run {marker.run} (its {ROOT_MARKER}); {why}"
        if self.visibility.exclusive:
            raise ConfigError(msg)
        log.warning("SECOND RUN IN ONE PREFIX, NOT REFUSED (%s has no create-only write, so "
                    "two runs cannot be kept apart reliably): %s", self.at.backend.name, msg)
        self.run = own or self.run_file.adopt(new_run_id())

    def _write_marker(self, marker: RootMarker) -> None:
        """Rewrite the root marker (its run unchanged): a key this run now pushes under."""
        data = marker.to_json(self.keys)
        self.visibility.replace(self.at.path(ROOT_MARKER), self.at.url_of(ROOT_MARKER), data)
        self._marker = RootMarker.parse(data, self.at.url_of(ROOT_MARKER))
        log.info("%s: this run is encrypted, under key ids %s", self.at.url,
                 ", ".join(self._marker.key_ids))

    def check_push_policy(self, m: Manifest) -> None:
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
                f"{self.at.url} holds an encrypted run (its {ROOT_MARKER} says so; key ids "
                f"{', '.join(marker.key_ids) or '?'}), and no key was given: pushing {m.name} "
                f"would put plaintext ({plain[0]}) into it. Give the run's key (--key-file FILE, "
                "CKPTSYNC_KEY or CKPTSYNC_KEY_FILE, Checkpointer(encryption_key=...))")
