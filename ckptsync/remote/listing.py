"""The store's base: construction, and reading what is on the remote.

:class:`StoreBase` opens the filesystem, chooses its backend (:mod:`.backends`) and reads:
manifests, the listing of checkpoints (:meth:`~StoreBase.list`, :meth:`~StoreBase.scan`,
:meth:`~StoreBase.iter_committed`, :meth:`~StoreBase.iter_valid`), the ``LATEST`` hint and the
root marker (:meth:`~StoreBase.check_owned`). Every backend call goes through
:meth:`StoreBase._call`: retried, and translated at the boundary (:mod:`.boundary`).
The concerns that write and delete are mixins over this base (:mod:`ckptsync.remote.store`).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from fsspec.core import split_protocol

from ckptsync.config import TransferConfig
from ckptsync.crypto import KeyRing
from ckptsync.errors import (
    CkptSyncError,
    ConfigError,
    CorruptCheckpointError,
    ManifestError,
    RemoteError,
    UnsupportedFormatError,
)
from ckptsync.local import FileOps
from ckptsync.manifest import (
    LATEST_NAME,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    Manifest,
    manifest_too_large,
    name_sort_key,
    parse_name,
    unusable_reason,
)
from ckptsync.ownership import ROOT_MARKER, RunFile, check_remote_url
from ckptsync.redact import install_scrubber, redact_url, remember, scrub, secrets_of
from ckptsync.remote.backends import choose_backend
from ckptsync.remote.boundary import empty_range, open_fs, translate_error
from ckptsync.remote.marker import RootMarker
from ckptsync.transfer import Retrier, Slots

__all__ = ["RemoteEntry", "Status", "StoreBase"]

log = logging.getLogger("ckptsync.remote")

# A top-level entry the store lists at all (checkpoint names, and foreign names that a scan
# reports but never touches). Wider than manifest.parse_name on purpose: ``ls`` shows what
# else is there, and ``gc`` refuses a root holding only such entries.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# The temporary name an upload writes before renaming into place (PushMixin._upload_task).
PART_FILE = re.compile(r"^\..+\.part-[0-9a-f]{8}$")
# A temporary file untouched this long belongs to an upload that died (an upload under way
# writes to it at least once per read timeout), so the next push of its checkpoint removes it.
PART_QUIET_S = 600.0

Status = Literal["valid", "partial", "corrupt", "uncommitted"]


def to_epoch(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, datetime):
        return (v if v.tzinfo else v.replace(tzinfo=timezone.utc)).timestamp()
    if isinstance(v, str):
        try:
            return to_epoch(datetime.fromisoformat(v.replace("Z", "+00:00")))
        except ValueError:
            return None
    return None


def mtime(info: Mapping[str, Any]) -> float | None:
    for key in ("mtime", "LastModified", "updated", "modifiedTime", "created", "timeCreated"):
        t = to_epoch(info.get(key))
        if t is not None:
            return t
    return None


@dataclass(frozen=True)
class RemoteEntry:
    """One top-level prefix of the remote, as :meth:`RemoteStore.scan` sees it.

    ``status``: ``valid`` (manifest parses, every file has its listed size), ``partial``
    (manifest present, a file missing or of the wrong size), ``corrupt`` (manifest does not
    parse, is unsafe, or cannot be used: :func:`~ckptsync.manifest.unusable_reason`; then
    ``manifest`` is kept), ``uncommitted`` (no manifest: an upload in progress or a leftover).
    """

    name: str
    status: Status
    manifest: Manifest | None
    size: int
    mtime: float | None
    problem: str | None = None


class StoreBase:
    """Construction and the read side of :class:`~ckptsync.remote.RemoteStore` (see there)."""

    def __init__(
        self,
        url: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        fs: Any = None,
        config: TransferConfig | None = None,
        ops: FileOps | None = None,
        keys: KeyRing | None = None,
        run_file: RunFile | None = None,
        allow_plaintext: bool = False,
    ) -> None:
        check_remote_url(url)
        self.keys = keys
        """Encrypt pushes with the first key, decrypt pulls by key id (:mod:`ckptsync.crypto`);
        None: files are stored as they are, and encrypted checkpoints cannot be pulled."""
        self.allow_plaintext = allow_plaintext
        """Accept plaintext checkpoints (and manifests without a MAC) where the encryption
        policy (:mod:`ckptsync.integrity`) would refuse them: for migrating a run."""
        if allow_plaintext:
            log.warning("allow_plaintext: plaintext checkpoints and manifests without a MAC "
                        "are accepted from %s (a bucket writer could plant one)", redact_url(url))
        self.run_file = run_file
        """The local directory's record of its run (:class:`~ckptsync.ownership.RunFile`):
        this store's pushes are that run's (:mod:`ckptsync.remote.marker`); None: the store
        takes the run of the root it pushes to."""
        self._run: str | None = None  # the run this store pushes as, once it pushed
        self._ops = ops or FileOps()
        self.url = redact_url(url.rstrip("/") or url)
        """The remote URL as it may be shown: without user info or query string."""
        self.config = config or TransferConfig.resolve()
        options = dict(storage_options or {})
        self._secrets = secrets_of(options, url)
        remember(self._secrets)  # for the log scrubber (botocore's and s3fs's records too)
        install_scrubber()
        self.scheme = (split_protocol(url)[0] or "file").split("::")[-1]
        if fs is None:
            expected = choose_backend(None, self.scheme, self.config)
            fs, root = open_fs(url, expected.open_options(options, self.config), self._secrets)
        else:
            root = fs._strip_protocol(url)
        self.fs = fs
        self.root = str(root).rstrip("/")
        self.backend = choose_backend(fs, self.scheme, self.config)
        """What the storage can do (:class:`~ckptsync.remote.backends.Backend`)."""
        self._retry = Retrier(self.config, self._translate)
        self._stats_lock = threading.Lock()
        self._marked = False  # this store has checked (or written) the root marker to push
        self._marker: RootMarker | None = None
        self._parts_seen: dict[str, tuple[Any, ...]] = {}  # part name -> objects hashed
        self._stream_slots = Slots(self.config.parts_in_flight)
        self.stats: dict[str, int] = {"bytes_uploaded": 0, "bytes_copied": 0}
        # The newest checkpoint this store committed itself: the next push copies unchanged
        # files from it without reading LATEST and its manifest first (two round trips).
        self._last_commit: Manifest | None = None
        """Totals over this store's pushes: bytes sent, and bytes copied server-side instead."""

    def __repr__(self) -> str:
        return f"RemoteStore({redact_url(self.url)!r})"

    # ------------------------------------------------------------------ helpers

    def _translate(self, exc: BaseException, url: str, action: str) -> CkptSyncError:
        return translate_error(exc, url, action, secrets=self._secrets)

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def url_of(self, *parts: str) -> str:
        """The user-facing URL of ``parts`` under the root (for messages)."""
        return "/".join([redact_url(self.url), *parts])

    def _call(self, fn: Callable[[], Any], url: str, action: str) -> Any:
        return self._retry.call(fn, url=url, action=action)

    def _rel(self, full: str, base: str) -> str:
        full = full.rstrip("/")
        base = base.rstrip("/")
        return full[len(base) + 1 :] if full.startswith(base + "/") else full

    def _missing_root(self) -> None:
        """Raise if the bucket itself is missing (a listing of a missing prefix is just empty)."""
        if not self.backend.buckets:
            return
        bucket = self.root.split("/", 1)[0]
        exists = self._call(lambda: self.fs.exists(bucket), self.url, "list")
        if not exists:
            raise RemoteError(
                f"no such bucket {scrub(bucket, self._secrets)!r} for {redact_url(self.url)}; "
                "create it or fix the URL",
                url=redact_url(self.url),
                retryable=False,
            )

    def _ls_root(self) -> list[dict[str, Any]]:
        def ls() -> list[dict[str, Any]]:
            try:
                self.fs.invalidate_cache(self.root)
                return list(self.fs.ls(self.root, detail=True))
            except FileNotFoundError:
                return []

        entries: list[dict[str, Any]] = self._call(ls, self.url, "list")
        if not entries:
            self._missing_root()
        return entries

    def _names(self) -> list[str]:
        """Top-level checkpoint directory names (committed or not), one listing call."""
        out = []
        for e in self._ls_root():
            name = self._rel(e["name"], self.root)
            if e.get("type") == "directory" and SAFE_NAME.match(name) and "/" not in name:
                out.append(name)
        return out

    def _read_bytes(self, path: str, url: str) -> bytes | None:
        """A small object's bytes (None when missing), never more than the manifest bound + 1:
        a longer result means the object is over the bound, and it was not read whole."""
        def cat() -> bytes | None:
            try:
                return bytes(self.fs.cat_file(path, start=0, end=MAX_MANIFEST_BYTES + 1))
            except FileNotFoundError:
                return None
            except Exception as e:
                if empty_range(e):
                    return b""
                raise

        result: bytes | None = self._call(cat, url, "read")
        return result

    def _size_or_none(self, path: str, url: str) -> int | None:
        """The size of ``path`` for an error message; None if it cannot be had."""
        try:
            size: int = self._call(lambda: int(self.fs.size(path)), url, "stat")
        except CkptSyncError as e:
            log.debug("cannot stat %s: %s", url, e)
            return None
        return size

    def _parse_manifest(self, name: str, data: bytes) -> Manifest:
        where = self.url_of(name, MANIFEST_NAME)
        if len(data) > MAX_MANIFEST_BYTES:  # only the first bound + 1 bytes were read
            raise manifest_too_large(where, self._size_or_none(self._path(name, MANIFEST_NAME),
                                                               where))
        m = Manifest.from_json(data, where=where)
        if m.name != name:
            raise ManifestError(f"{where}: manifest names {m.name!r} but lives under {name!r}")
        return m

    def read_manifest(self, name: str) -> Manifest | None:
        """The manifest of ``name``, or None when it is not committed.

        A manifest whose bytes do not verify (a body cut short, a 416 answered for a ranged
        read) is read again, up to ``config.digest_attempts`` reads in all, before it counts
        as bad: one torn read never passes over a valid checkpoint.

        Raises:
            ManifestError: the manifest does not parse, is unsafe, or names another checkpoint
                (read after read).
            RemoteError: the backend failed.
        """
        if not SAFE_NAME.match(name):
            raise ConfigError(f"invalid checkpoint name {name!r}")
        return self._read_manifest(name, self.config.digest_attempts)

    def _read_manifest(self, name: str, attempts: int) -> Manifest | None:
        """:meth:`read_manifest`, read up to ``attempts`` times while what comes back does
        not verify."""
        path, where = self._path(name, MANIFEST_NAME), self.url_of(name, MANIFEST_NAME)
        attempt = 1
        while True:
            data = self._read_bytes(path, where)
            if data is None:
                return None
            try:
                return self._parse_manifest(name, data)
            except UnsupportedFormatError:
                raise
            except ManifestError as e:
                if attempt >= attempts or len(data) > MAX_MANIFEST_BYTES:
                    raise
                # A body cut short on the way, or a 416 for a ranged read of an object the
                # server has not settled, reads like a corrupt manifest: as for a data file,
                # only the same result, read after read, is damage at rest.
                attempt += 1
                log.warning("%s; reading it again (read %d of %d)", e, attempt, attempts)
                self.fs.invalidate_cache(path)

    def _find(self, name: str | None = None) -> dict[str, dict[str, Any]]:
        """Relative path -> backend info of every object under ``<root>/<name>/`` (the whole
        root without ``name``): one listing, uncached."""
        prefix = self.root if name is None else self._path(name)

        def find() -> dict[str, Any]:
            try:
                self.fs.invalidate_cache(prefix)
                return dict(self.fs.find(prefix, detail=True))
            except FileNotFoundError:
                return {}

        url = self.url if name is None else self.url_of(name)
        found: dict[str, Any] = self._call(find, url, "list")
        return {self._rel(p, prefix): i for p, i in found.items()}

    def _sizes(self, name: str) -> dict[str, int]:
        """Relative path -> size of every object under ``<root>/<name>/`` (one listing)."""
        return {rel: int(i.get("size") or 0) for rel, i in self._find(name).items()}

    def _check_sizes(self, m: Manifest, sizes: Mapping[str, int] | None = None) -> None:
        """Raise :class:`CorruptCheckpointError` unless ``m`` is usable and every file it lists
        is there with its size: what "valid" means before any byte is read."""
        reason = unusable_reason(m)
        if reason is not None:
            url = self.url_of(m.name)
            raise CorruptCheckpointError(f"{url}: {reason}", path=url)
        sizes = self._sizes(m.name) if sizes is None else sizes
        for f in m.files:
            url = self.url_of(m.name, f.path)
            if f.path not in sizes:
                raise CorruptCheckpointError(
                    f"{url}: file listed in the manifest is missing", path=url
                )
            if sizes[f.path] != f.size:
                raise CorruptCheckpointError(
                    f"{url}: size {sizes[f.path]} != {f.size} in the manifest (truncated or "
                    "altered)",
                    path=url,
                )

    # ------------------------------------------------------------------ LATEST hint

    def read_latest(self) -> str | None:
        """The checkpoint name ``LATEST`` points to, or None (missing, unreadable, unsafe)."""
        try:
            data = self._read_bytes(self._path(LATEST_NAME), self.url_of(LATEST_NAME))
        except RemoteError as e:
            log.debug("cannot read the LATEST hint: %s", e)
            return None
        if data is None or len(data) > MAX_MANIFEST_BYTES:
            return None
        try:
            name = json.loads(data).get("name")
        except (ValueError, AttributeError, UnicodeDecodeError):
            return None
        return name if isinstance(name, str) and SAFE_NAME.match(name) else None

    # ------------------------------------------------------------------ ownership

    def read_marker(self, *, fresh: bool = False) -> RootMarker | None:
        """The root marker (:mod:`ckptsync.remote.marker`), or None where there is none;
        read once per store unless ``fresh``."""
        if self._marker is None or fresh:
            data = self._read_bytes(self._path(ROOT_MARKER), self.url_of(ROOT_MARKER))
            if data is not None:
                self._marker = RootMarker.parse(data, self.url_of(ROOT_MARKER))
        return self._marker

    def has_marker(self) -> bool:
        """Whether the root carries ckptsync's marker (:data:`~ckptsync.ownership.ROOT_MARKER`)."""
        return self.read_marker() is not None

    @property
    def run_id(self) -> str | None:
        """The run this store writes as: the one it pushed as, else its local directory's,
        else the root marker's (``gc``, retention); None when none is known."""
        if self._run is not None:
            return self._run
        own = self.run_file.read() if self.run_file is not None else None
        if own is not None:
            return own
        marker = self.read_marker()
        return marker.run if marker is not None else None

    def bind_run(self, directory: Any) -> None:
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


    def check_owned(self, entries: Iterable[RemoteEntry] | None = None) -> bool:
        """Whether ckptsync may delete under this root: it carries the marker, or (a root
        written before the marker existed) at least one committed ckptsync checkpoint.

        Returns False for a root that holds nothing at all (nothing to delete either).

        Raises:
            ConfigError: the root holds something, but nothing ckptsync wrote.
        """
        if self.has_marker():
            return True
        entries = self.scan() if entries is None else entries
        if any(e.status in ("valid", "partial") and parse_name(e.name) for e in entries):
            return True
        if not self._ls_root():
            return False
        raise ConfigError(
            f"{redact_url(self.url)} is not a ckptsync remote: it has no {ROOT_MARKER} marker "
            "and no ckptsync checkpoint, so nothing under it was deleted. Check the URL; "
            "ckptsync only ever deletes what it wrote"
        )

    # ------------------------------------------------------------------ listing

    def _read_manifests(self, names: list[str]) -> dict[str, Manifest | CkptSyncError | None]:
        if not names:
            return {}
        paths = [self._path(n, MANIFEST_NAME) for n in names]

        def cat() -> list[Any]:
            # Ranged reads (concurrent where the backend is async): a manifest over the bound
            # shows as bound + 1 bytes and is refused, never read whole.
            n = len(paths)
            return list(self.fs.cat_ranges(paths, [0] * n, [MAX_MANIFEST_BYTES + 1] * n,
                                           on_error="return"))

        raw: list[Any] = self._call(cat, self.url, "read manifests from")
        out: dict[str, Manifest | CkptSyncError | None] = {}
        for name, data in zip(names, raw, strict=True):
            if isinstance(data, Exception) and empty_range(data):
                data = b""
            if data is None or isinstance(data, FileNotFoundError):
                out[name] = None
            elif isinstance(data, BaseException):
                err = self._translate(data, self.url_of(name, MANIFEST_NAME), "read")
                if isinstance(err, RemoteError) and err.retryable:
                    raise err from err.__cause__
                out[name] = err
            else:
                try:
                    out[name] = self._parse_manifest(name, bytes(data))
                except UnsupportedFormatError as e:
                    out[name] = e
                except ManifestError as e:  # read again, as read_manifest does
                    if len(data) > MAX_MANIFEST_BYTES or self.config.digest_attempts < 2:
                        out[name] = e
                        continue
                    log.warning("%s; reading it again (read 2 of %d)", e,
                                self.config.digest_attempts)
                    try:
                        out[name] = self._read_manifest(name, self.config.digest_attempts - 1)
                    except ManifestError as again:
                        out[name] = again
        return out

    def scan(self) -> list[RemoteEntry]:
        """Every top-level prefix with its status, oldest first (one listing of the whole
        remote plus every manifest). Used by ``ls``, retention and ``gc``."""
        top = [e for e in self._ls_root() if e.get("type") == "directory"]
        names = [self._rel(e["name"], self.root) for e in top]
        names = [n for n in names if SAFE_NAME.match(n)]
        dir_mtime = {self._rel(e["name"], self.root): mtime(e) for e in top}
        found = self._find() if names else {}
        files: dict[str, dict[str, int]] = {n: {} for n in names}
        mtimes: dict[str, list[float]] = {n: [] for n in names}
        for rel, info in found.items():
            head, _, rest = rel.partition("/")
            if head in files and rest:
                files[head][rest] = int(info.get("size") or 0)
                t = mtime(info)
                if t is not None:
                    mtimes[head].append(t)
        manifests = self._read_manifests(names)
        out = []
        for n in names:
            size = sum(files[n].values())
            t = max(mtimes[n]) if mtimes[n] else dir_mtime.get(n)
            m = manifests.get(n)
            if m is None and not files[n] and self.backend.buckets:
                # An empty "directory" on an object store (SeaweedFS keeps one after its
                # objects are deleted) holds nothing: there is nothing to list or collect.
                continue
            if m is None:
                out.append(RemoteEntry(n, "uncommitted", None, size, t))
            elif isinstance(m, CkptSyncError):
                out.append(RemoteEntry(n, "corrupt", None, size, t, str(m)))
            else:
                try:
                    self._check_sizes(m, files[n])
                    out.append(RemoteEntry(n, "valid", m, m.total_size, t))
                except CorruptCheckpointError as e:
                    status: Status = "corrupt" if unusable_reason(m) else "partial"
                    out.append(RemoteEntry(n, status, m, size, t, str(e)))

        def key(e: RemoteEntry) -> Any:
            if e.manifest is None:
                return name_sort_key(e.name)
            k = e.manifest.sort_key()
            if e.manifest.step is None and e.mtime is not None:
                # Equal seqs (two pushes at once, or versions pushed before seqs existed)
                # order by the remote's own clock, never by the writer's alone.
                return (k[0], k[1], datetime.fromtimestamp(e.mtime, timezone.utc).isoformat(),
                        k[3])
            return k

        out.sort(key=key)
        return out

    def iter_committed(self) -> Iterator[RemoteEntry]:
        """Committed checkpoints (a manifest is there), newest first, each with its status
        (``valid``, ``partial`` or ``corrupt``, as :meth:`scan` says; ``mtime`` not read),
        reading manifests lazily.

        One listing of the root, then for each candidate one manifest read and one listing
        of its prefix, stopping as soon as the caller does. Names sort by (step, creation
        time), so the listing alone gives the order of checkpoints with a step; those without
        one order by the ``seq`` their manifests carry (read together once the caller gets
        that far), never by a writer's clock. ``LATEST`` adds its checkpoint to the
        candidates even when an eventually consistent listing does not show it yet (it is
        still checked like any other).

        Raises:
            UnsupportedFormatError: the next checkpoint needs a format feature this version
                does not read: never passed over for an older one.
        """
        names = set(self._names())
        hint = self.read_latest()
        if hint is not None:
            names.add(hint)
        ordered = sorted(names, key=name_sort_key, reverse=True)
        stepless = [n for n in ordered if (p := parse_name(n)) is not None and p[0] is None]
        for name in ordered:
            if stepless and name == stepless[0]:
                yield from self._iter_stepless(stepless)
                stepless = []
            if (p := parse_name(name)) is not None and p[0] is None:
                continue
            try:
                m = self.read_manifest(name)
            except UnsupportedFormatError:
                raise
            except ManifestError as e:
                yield RemoteEntry(name, "corrupt", None, 0, None, str(e))
                continue
            if m is None:
                continue  # uncommitted: an upload in progress or a leftover
            yield self._entry(m)

    def _iter_stepless(self, names: list[str]) -> Iterator[RemoteEntry]:
        """:meth:`iter_committed` of step-less checkpoints: every manifest read at once,
        newest first by :meth:`Manifest.sort_key` (their ``seq``)."""
        read = self._read_manifests(names)
        bad = [n for n in names if isinstance(read.get(n), CkptSyncError)]
        good = sorted((m for m in read.values() if isinstance(m, Manifest)),
                      key=lambda m: m.sort_key(), reverse=True)
        for m in good:
            yield self._entry(m)
        for n in bad:
            err = read[n]
            if isinstance(err, UnsupportedFormatError):
                raise err
            yield RemoteEntry(n, "corrupt", None, 0, None, str(err))

    def _entry(self, m: Manifest) -> RemoteEntry:
        sizes = self._sizes(m.name)
        try:
            self._check_sizes(m, sizes)
        except CorruptCheckpointError as e:
            status: Status = "corrupt" if unusable_reason(m) else "partial"
            return RemoteEntry(m.name, status, m, sum(sizes.values()), None, str(e))
        return RemoteEntry(m.name, "valid", m, m.total_size, None)

    def iter_valid(self) -> Iterator[Manifest]:
        """Valid checkpoints, newest first, reading manifests lazily (:meth:`iter_committed`);
        the others are logged and skipped."""
        for e in self.iter_committed():
            if e.status == "valid" and e.manifest is not None:
                yield e.manifest
            else:
                log.warning("remote checkpoint %s is not valid, skipping it: %s", e.name,
                            e.problem)

    def newest_valid(self) -> Manifest | None:
        """The newest valid checkpoint, or None. Cheap: O(1) manifest reads in the usual case."""
        return next(self.iter_valid(), None)

    # Defined last: inside the class body the name "list" would shadow the builtin.
    def list(self, *, strict: bool = False) -> list[Manifest]:
        """Committed checkpoints (manifest present and parseable), oldest first.

        Reads every manifest (concurrently where the backend allows); bad manifests are
        logged and skipped. Validity (file sizes) is not checked: see :meth:`scan`.

        ``strict`` (for choosing what to restore): a checkpoint needing a format feature
        this version does not read raises :class:`UnsupportedFormatError` instead.
        """
        names = self._names()
        manifests = self._read_manifests(names)
        out = [m for m in manifests.values() if isinstance(m, Manifest)]
        for n, m in manifests.items():
            if strict and isinstance(m, UnsupportedFormatError):
                raise m
            if isinstance(m, CkptSyncError):
                log.warning("skipping remote checkpoint %s: %s", n, m)
        out.sort(key=lambda m: m.sort_key())
        return out
