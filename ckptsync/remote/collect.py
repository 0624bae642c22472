"""Deleting from the remote: ``delete``, ``abandon``, retention and ``gc``.

Everything here deletes only what ckptsync wrote (:mod:`ckptsync.ownership`): checkpoint
names, under a root ckptsync marked or already holds a checkpoint of. A delete removes the
manifest first, so a half-deleted checkpoint is merely uncommitted, and ``gc`` collects
uncommitted prefixes, temporary upload files and (on S3) unfinished multipart uploads older
than a grace period.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime, timezone
from functools import partial

from ckptsync.atomic import TEMP_NAME
from ckptsync.errors import ConfigError, ManifestError
from ckptsync.manifest import LATEST_NAME, MANIFEST_NAME, parse_name
from ckptsync.ownership import ROOT_MARKER
from ckptsync.redact import redact_url
from ckptsync.remote.claim import RunClaim
from ckptsync.remote.listing import Listing, RemoteEntry
from ckptsync.remote.location import SAFE_NAME, Location, mtime, to_epoch
from ckptsync.remote.manifests import ManifestReader
from ckptsync.retention import CheckpointInfo, RetentionPolicy, select_for_deletion

__all__ = ["Collector"]

log = logging.getLogger("ckptsync.remote")

#: The files at the root whose temporaries ``gc`` collects (beside the checkpoint prefixes).
ROOT_FILES = (LATEST_NAME, ROOT_MARKER)


class Collector:
    """Deletion, retention and ``gc`` under one :class:`Location`: only what ckptsync wrote
    (see the module docstring)."""

    def __init__(self, at: Location, manifests: ManifestReader, listing: Listing,
                 claim: RunClaim) -> None:
        self.at = at
        self.manifests = manifests
        self.listing = listing
        self.claim = claim

    def check_owned(self, entries: Iterable[RemoteEntry] | None = None) -> bool:
        """Whether ckptsync may delete under this root: it carries the marker, or (a root
        written before the marker existed) at least one committed ckptsync checkpoint.

        Returns False for a root that holds nothing at all (nothing to delete either).

        Raises:
            ConfigError: the root holds something, but nothing ckptsync wrote.
        """
        if self.claim.has_marker():
            return True
        entries = self.listing.scan() if entries is None else entries
        if any(e.status in ("valid", "partial") and parse_name(e.name) for e in entries):
            return True
        if not self.at.ls_root():
            return False
        raise ConfigError(
            f"{redact_url(self.at.url)} is not a ckptsync remote: it has no {ROOT_MARKER} "
            "marker and no ckptsync checkpoint, so nothing under it was deleted. Check the "
            "URL; ckptsync only ever deletes what it wrote"
        )

    def delete(self, name: str) -> None:
        """Delete a checkpoint: the manifest first (it stops existing), then its files.

        Raises:
            ConfigError: ``name`` is not a ckptsync checkpoint name (nothing is deleted).
        """
        if not SAFE_NAME.match(name) or parse_name(name) is None:
            raise ConfigError(f"refusing to delete {self.at.url_of(name)!r}: {name!r} is not a "
                              "ckptsync checkpoint name, and ckptsync deletes only what it wrote")
        self.at.remove(name, MANIFEST_NAME)
        self.at.remove_tree(name)
        self.at.forget()
        log.info("deleted %s from %s", name, redact_url(self.at.url))

    def abandon(self, name: str) -> list[str]:
        """Remove what an abandoned push of ``name`` left: its files and, on S3, its unfinished
        multipart uploads. For the pusher that gave ``name`` up (stopped, failed for good,
        superseded), so that nothing waits for ``gc``'s grace period.

        Only a ckptsync checkpoint name, under a root ckptsync marked, and only while it is
        uncommitted: with a manifest there (committed, or an ambiguous push that did commit)
        nothing is touched.

        Returns:
            What was removed: ``name`` (its files) and ``multipart:<key>`` entries; [] when
            there was nothing to remove or ``name`` is committed.

        Raises:
            ConfigError: ``name`` is not a ckptsync checkpoint name (nothing is deleted).
            RemoteError: the backend failed (what is left is still ``gc``'s).
        """
        if not SAFE_NAME.match(name) or parse_name(name) is None:
            raise ConfigError(f"refusing to abandon {self.at.url_of(name)!r}: {name!r} is not a "
                              "ckptsync checkpoint name, and ckptsync deletes only what it wrote")
        if not self.claim.has_marker():
            return []  # nothing of ours was ever pushed here
        try:
            committed = self.manifests.read(name) is not None
        except ManifestError:
            committed = True  # a manifest is there, if a bad one: not ours to remove here
        if committed:
            log.info("%s is committed: nothing to abandon", self.at.url_of(name))
            return []
        at = self.at
        removed = self._gc_multipart(float("inf"), False, name)
        if at.sizes(name) or (at.backend.needs_dirs and at.call(
                partial(at.fs.exists, at.path(name)), at.url_of(name), "stat")):
            at.remove_tree(name)
            removed.append(name)
        at.forget()
        if removed:
            log.info("removed the abandoned upload of %s from %s", name, redact_url(at.url))
        return removed

    def apply_retention(
        self, policy: RetentionPolicy, protect: Iterable[str] = (), *, dry_run: bool = False
    ) -> list[str]:
        """Delete the valid checkpoints ``policy`` does not keep; return their names.

        Only valid checkpoints with ckptsync names count (the newest valid one is always
        kept); partial or corrupt ones are left for a human (``ckptsync ls`` shows them), and
        anything ckptsync did not write is never touched. Only this store's run counts
        (:attr:`run_id`): a checkpoint another run pushed (its manifest names another run
        id) is never deleted, nor counted. The order is :meth:`scan`'s (step, else the
        remote's ``seq``), the one restore and ``pull`` use.
        """
        run = self.claim.run_id
        entries = self.listing.scan()
        infos = [
            CheckpointInfo(e.name, e.manifest.step, (key,), e.manifest.metrics)
            for key, e in enumerate(entries)  # scan's order: newest last
            if e.status == "valid" and e.manifest is not None and parse_name(e.name) is not None
            and e.manifest.run in (None, run)
        ]
        others = [e.name for e in entries if e.manifest is not None
                  and e.manifest.run not in (None, run)]
        if others:
            log.warning("%s holds %d checkpoint(s) of another run than %s (%s...): retention "
                        "leaves them alone; one prefix should hold one run", self.at.url,
                        len(others), run, others[0])
        doomed = select_for_deletion(infos, policy, protect)
        if not dry_run:
            for name in doomed:
                self.delete(name)
        return doomed

    def gc(
        self, grace_s: float | None = None, *, dry_run: bool = False, now: float | None = None
    ) -> list[str]:
        """Remove uncommitted prefixes (no manifest) older than ``grace_s`` seconds, the
        temporary files a crashed writer left (of ``LATEST``, of a manifest, of an upload)
        written longer ago than that and, on S3, multipart uploads initiated longer ago.

        Only what ckptsync wrote: prefixes whose names parse as checkpoint names, temporary
        names (:func:`ckptsync.atomic.temp_name`) inside them or of ckptsync's files at the
        root, and multipart uploads of keys inside such prefixes, under a root that ckptsync
        owns (:meth:`check_owned`). Whatever the backend does not report an age for is kept.
        Returns what was (or, with ``dry_run``, would be) removed: checkpoint names,
        ``part:<path>`` and ``temp:<path>`` entries (temporary files, relative to the root)
        and ``multipart:<key>`` entries.

        Raises:
            ConfigError: the root holds entries, none of them written by ckptsync (nothing
                is deleted).
        """
        grace = self.at.config.grace_s if grace_s is None else grace_s
        now = datetime.now(timezone.utc).timestamp() if now is None else now
        removed: list[str] = []
        entries = self.listing.scan()
        if not self.check_owned(entries):
            return removed  # an empty root: nothing there at all
        for e in entries:
            if e.status != "uncommitted" or parse_name(e.name) is None:
                continue
            if e.mtime is None or now - e.mtime < grace:
                continue
            if not dry_run and not self._collect_leftover(e.name):
                continue
            removed.append(e.name)
        removed.extend(self._gc_multipart(now - grace, dry_run))
        removed.extend(self._gc_temporaries(now - grace, dry_run, skip=set(removed)))
        return removed

    def _collect_leftover(self, name: str) -> bool:
        """Remove uncommitted prefix ``name``; False when a push committed it meanwhile.

        A push may commit the prefix at any instant (``--grace 0`` while it runs): the
        manifest is looked for right before the delete, and after it, so that no committed
        checkpoint is left without a file (the push re-checks after its manifest write too,
        :class:`~ckptsync.remote.commit.Committer`).
        """
        at = self.at
        if self._committed_now(name):
            log.info("gc: %s was committed meanwhile: left alone", at.url_of(name))
            return False
        at.call(partial(at.fs.rm, at.path(name), recursive=True), at.url_of(name), "delete")
        if self._committed_now(name):
            # Its push committed between our look and the delete: the files went, so its
            # manifest must go too (the push itself sees the missing files and retries).
            at.remove(name, MANIFEST_NAME)
            log.warning("gc: %s was committed while gc removed it as a leftover; its manifest "
                        "was removed too (no committed checkpoint lacks a file); its push is "
                        "retried. Give gc a --grace longer than a push takes", at.url_of(name))
        return True

    def _committed_now(self, name: str) -> bool:
        self.at.forget(name)
        try:
            return self.manifests.read(name) is not None
        except ManifestError:
            return True  # a manifest is there, if a bad one: not a leftover

    def _gc_temporaries(self, cutoff: float, dry_run: bool, skip: set[str]) -> list[str]:
        """Temporary files (:func:`ckptsync.atomic.temp_name`) a writer that died left,
        written before ``cutoff``: those of ``LATEST`` and the root marker beside them, and
        any inside a ckptsync checkpoint prefix (a manifest's, a part marker's, an upload's
        ``.part-`` file; committed checkpoints too: a failed attempt before the one that
        committed). ``part:<rel>`` for an upload's, ``temp:<rel>`` for the others."""
        out = []
        for rel, info in sorted(self.at.find().items()):
            head, _, rest = rel.partition("/")
            temp = TEMP_NAME.match(rel.rsplit("/", 1)[-1])
            if temp is None:
                continue
            if rest:
                if head in skip or parse_name(head) is None:
                    continue  # not inside a ckptsync checkpoint: somebody else's
            elif temp["name"] not in ROOT_FILES:
                continue
            t = mtime(info)
            if t is None or t > cutoff:
                continue  # a writer may be using it
            out.append(f"{'part' if temp['kind'] == 'part' else 'temp'}:{rel}")
            if not dry_run:
                self.at.remove(rel)
        return out

    def _gc_multipart(self, cutoff: float, dry_run: bool, name: str | None = None) -> list[str]:
        """Unfinished multipart uploads initiated before ``cutoff`` of keys inside ckptsync
        checkpoint prefixes (only ``name``'s, given one); ``multipart:<key>`` entries."""
        at = self.at
        bucket = at.backend.bucket_of(at.root)
        if bucket is None:
            return []
        prefix = at.root.partition("/")[2]
        uploads = at.call(partial(at.backend.multipart_uploads, bucket), at.url,
                          "list multipart uploads in")
        out = []
        for u in uploads:
            key = u.get("Key", "")
            started = to_epoch(u.get("Initiated"))
            if prefix and not key.startswith(prefix + "/"):
                continue
            head = key[len(prefix) + 1:] if prefix else key
            if parse_name(head.split("/", 1)[0]) is None:
                continue  # not inside a ckptsync checkpoint: somebody else's upload
            if name is not None and head.split("/", 1)[0] != name:
                continue
            if started is None or started > cutoff:
                continue
            out.append(f"multipart:{key}")
            if not dry_run:
                at.call(partial(at.backend.abort_multipart, bucket, key, u["UploadId"]),
                        f"{at.scheme}://{bucket}/{key}", "abort multipart upload of")
        return out
