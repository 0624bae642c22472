"""The multi-node commit (:mod:`ckptsync.parts`): :class:`NodeParts`.

Each node uploads its part of the checkpoint and writes its part marker; whichever node
writes its marker last sees every marker and commits the whole manifest with the storage's
create-only write (:class:`~ckptsync.remote.commit.Committer`). A part is taken as uploaded,
and the whole committed, only where every file has the digest the whole manifest lists (hashed
remotely), so that a forged or replaced part of the right size is never committed, and a node
whose part was replaced never reports success.
"""

from __future__ import annotations

import logging
import threading
from functools import partial
from typing import Any

from ckptsync.errors import CorruptCheckpointError, ManifestError, RemoteError
from ckptsync.manifest import FileEntry, Manifest
from ckptsync.parts import PART_MARKER, Part, marker_name, part_of
from ckptsync.redact import redact_url
from ckptsync.remote.commit import Committer
from ckptsync.remote.listing import Listing
from ckptsync.remote.location import Location
from ckptsync.remote.manifests import ManifestReader
from ckptsync.remote.visibility import Visibility
from ckptsync.transfer import hash_remote_file, run_parallel

__all__ = ["NodeParts"]

log = logging.getLogger("ckptsync.remote")


class NodeParts:
    """The parts of multi-node checkpoints under ``at``, checked and committed."""

    def __init__(self, at: Location, manifests: ManifestReader, listing: Listing,
                 visibility: Visibility, committer: Committer) -> None:
        self.at = at
        self.manifests = manifests
        self.listing = listing
        self.visibility = visibility
        self.committer = committer
        self._seen: dict[str, tuple[Any, ...]] = {}  # checkpoint name -> objects hashed

    def commit(self, name: str, m: Manifest, part: Part, own_checked: bool = False) -> Manifest:
        """After node ``part.node``'s files are all there: write its marker, then commit the
        whole checkpoint if every node's marker and file is there, with its digest.

        Returns the whole manifest once committed (here or by another node), else ``m``.
        """
        at = self.at
        # Marker before looking at the others': whichever node writes its marker last sees
        # every marker, so some node always commits.
        self.visibility.replace(at.path(name, marker_name(part.node)),
                                at.url_of(name, marker_name(part.node)), m.to_json())
        at.forget(name)
        sizes = at.sizes(name)
        done = {int(x.group(1)) for rel in sizes if (x := PART_MARKER.match(rel))}
        if not done >= set(range(part.nodes)):
            log.info("part %d of %d of %s uploaded to %s, waiting for nodes %s: not restorable "
                     "until then (the node that uploads last commits it)", part.node,
                     part.nodes, name, redact_url(at.url),
                     sorted(set(range(part.nodes)) - done))
            return m
        try:
            self.listing.check_sizes(part.whole, sizes)
        except CorruptCheckpointError as e:
            raise RemoteError(f"every node's part of {name} says it is uploaded, but: {e}",
                              url=at.url_of(name), retryable=True) from e
        # This node's files were just uploaded (or, own_checked, just hashed): the others'
        # are hashed, so that the whole manifest never commits bytes nobody wrote for it.
        self._check_others(name, part, frozenset(f.path for f in m.files))
        return self.committer.commit(name, part.whole)

    def uploaded(self, name: str, m: Manifest, node: int) -> bool:
        """This node's marker and every file of its part ``m`` are there, with their sizes
        and their digests (a part replaced remotely is uploaded again, never taken as ours)."""
        found = self.at.find(name)
        sizes = {rel: int(i.get("size") or 0) for rel, i in found.items()}
        try:
            self.listing.check_sizes(m, sizes)
        except CorruptCheckpointError:
            return False
        if marker_name(node) not in sizes:
            return False
        # Hashed once per version of the objects (a daemon looks again at every scan while
        # the other nodes upload): the listing's own tags of each object say if it changed.
        seen = tuple(sorted((f.path, repr(sorted((k, str(v)) for k, v in found[f.path].items())))
                            for f in m.files))
        if self._seen.get(name) == seen:
            return True
        try:
            self.check_bytes(name, m, f"part {node} of")
        except RemoteError as e:
            log.warning("%s; uploading this node's part again", e)
            return False
        self._seen[name] = seen
        return True

    def check_bytes(self, name: str, m: Manifest, what: str,
                    skip: frozenset[str] = frozenset()) -> None:
        """Every file of ``m`` (but ``skip``) under ``name`` has the digest ``m`` lists,
        hashed remotely (streamed, files in parallel).

        Raises:
            RemoteError: naming the first file whose bytes differ (not retryable).
        """
        at = self.at

        def task(entry: FileEntry, ev: threading.Event) -> None:
            url = at.url_of(name, entry.path)
            _, digest = hash_remote_file(at.fs, at.path(name, entry.path), url=url,
                                         config=at.config, retrier=at.retry, stop=ev,
                                         algo=entry.algo)
            if digest != entry.digest:
                raise RemoteError(
                    f"{what} {name}: remote file {url} is not the bytes its manifest lists "
                    f"({entry.algo} differs): it was replaced or forged after it was uploaded; "
                    "it is not taken for this node's part", url=url, retryable=False)

        run_parallel([partial(task, f) for f in m.files if f.path not in skip],
                     max_workers=at.backend.workers)

    def _check_others(self, name: str, part: Part, mine: frozenset[str]) -> None:
        """Before the commit: every other node's marker is a part of this very checkpoint,
        listing the digests the whole manifest lists, and every file not in ``mine`` (this
        node's, just checked) has its digest remotely. A forged or replaced part of the right
        size is never committed.

        Raises:
            RemoteError: naming the node and file (retryable: the node's next push uploads it
                again).
        """
        at = self.at
        whole = {f.path: f for f in part.whole.files}
        for node in range(part.nodes):
            if node == part.node:
                continue
            url = at.url_of(name, marker_name(node))
            data = at.read_small(name, marker_name(node))
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
            self.check_bytes(name, part.whole, "checkpoint", skip=mine)
        except RemoteError as e:
            raise RemoteError(f"{e}; {name} is not committed until that node uploads its part "
                              "again", url=e.url, retryable=True) from e

    def waiting_for(self, m: Manifest) -> tuple[int, ...] | None:
        """Where the checkpoint of the part ``m`` stands remotely, after a push returned ``m``
        (a node's part, not committed): None once the whole checkpoint is committed (its
        manifest is there), else the nodes whose part marker is missing (empty: every part
        is up and the last node's commit is under way). One read and one listing.

        Raises:
            RemoteError: the backend failed.
        """
        part = part_of(m)
        if part is None:
            return None
        self.at.forget(m.name)
        if self.manifests.read(m.name) is not None:
            return None
        done = {int(x.group(1)) for rel in self.at.sizes(m.name)
                if (x := PART_MARKER.match(rel))}
        return tuple(sorted(set(range(part.nodes)) - done))
