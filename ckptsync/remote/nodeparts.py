"""Checking the parts of a multi-node checkpoint (:mod:`ckptsync.parts`) before and after
their commit: a part is taken as uploaded, and the whole committed, only where every file
has the digest the whole manifest lists (hashed remotely), so that a forged or replaced part
of the right size is never committed, and a node whose part was replaced never reports
success.
"""

from __future__ import annotations

import logging
import threading
from functools import partial

from ckptsync.errors import CorruptCheckpointError, ManifestError, RemoteError
from ckptsync.manifest import FileEntry, Manifest
from ckptsync.parts import PART_MARKER, Part, marker_name, part_of
from ckptsync.remote.claim import ClaimMixin
from ckptsync.transfer import hash_remote_file, run_parallel

__all__ = ["PartsMixin"]

log = logging.getLogger("ckptsync.remote")


class PartsMixin(ClaimMixin):
    """What :class:`~ckptsync.remote.RemoteStore` checks of a multi-node checkpoint's parts."""

    def _part_uploaded(self, name: str, m: Manifest, node: int) -> bool:
        """This node's marker and every file of its part ``m`` are there, with their sizes
        and their digests (a part replaced remotely is uploaded again, never taken as ours)."""
        found = self._find(name)
        sizes = {rel: int(i.get("size") or 0) for rel, i in found.items()}
        try:
            self._check_sizes(m, sizes)
        except CorruptCheckpointError:
            return False
        if marker_name(node) not in sizes:
            return False
        # Hashed once per version of the objects (a daemon looks again at every scan while
        # the other nodes upload): the listing's own tags of each object say if it changed.
        seen = tuple(sorted((f.path, repr(sorted((k, str(v)) for k, v in found[f.path].items())))
                            for f in m.files))
        if self._parts_seen.get(name) == seen:
            return True
        try:
            self._check_part_bytes(name, m, f"part {node} of")
        except RemoteError as e:
            log.warning("%s; uploading this node's part again", e)
            return False
        self._parts_seen[name] = seen
        return True

    def _check_part_bytes(self, name: str, m: Manifest, what: str,
                          skip: frozenset[str] = frozenset()) -> None:
        """Every file of ``m`` (but ``skip``) under ``name`` has the digest ``m`` lists,
        hashed remotely (streamed, files in parallel).

        Raises:
            RemoteError: naming the first file whose bytes differ (not retryable).
        """
        def task(entry: FileEntry, ev: threading.Event) -> None:
            url = self.url_of(name, entry.path)
            _, digest = hash_remote_file(self.fs, self._path(name, entry.path), url=url,
                                         config=self.config, retrier=self._retry, stop=ev,
                                         algo=entry.algo)
            if digest != entry.digest:
                raise RemoteError(
                    f"{what} {name}: remote file {url} is not the bytes its manifest lists "
                    f"({entry.algo} differs): it was replaced or forged after it was uploaded; "
                    "it is not taken for this node's part", url=url, retryable=False)

        run_parallel([partial(task, f) for f in m.files if f.path not in skip],
                     max_workers=self.backend.workers)

    def _check_parts(self, name: str, part: Part, mine: frozenset[str]) -> None:
        """Before the commit: every other node's marker is a part of this very checkpoint,
        listing the digests the whole manifest lists, and every file not in ``mine`` (this
        node's, just checked) has its digest remotely. A forged or replaced part of the right
        size is never committed.

        Raises:
            RemoteError: naming the node and file (retryable: the node's next push uploads it
                again).
        """
        whole = {f.path: f for f in part.whole.files}
        for node in range(part.nodes):
            if node == part.node:
                continue
            url = self.url_of(name, marker_name(node))
            data = self._read_bytes(self._path(name, marker_name(node)), url)
            try:
                pm = Manifest.from_json(data or b"", where=url)
                other = part_of(pm)
            except ManifestError as e:
                other, pm = None, None
                log.warning("%s", e)
            if (other is None or pm is None or other.node != node or pm.name != name
                    or other.whole.files != part.whole.files
                    or any(whole.get(f.path) != f for f in pm.files)):
                raise RemoteError(f"{url}: node {node}'s part marker does not match the whole "
                                  f"checkpoint {name} (forged or of another save): not committed",
                                  url=url, retryable=True)
        try:
            self._check_part_bytes(name, part.whole, "checkpoint", skip=mine)
        except RemoteError as e:
            raise RemoteError(f"{e}; {name} is not committed until that node uploads its part "
                              "again", url=e.url, retryable=True) from e

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
