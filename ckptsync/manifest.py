"""The checkpoint format: ``ckptsync.json``, its validation, and checkpoint names.

A checkpoint is a directory of files plus this manifest, written last: a reader treats the
manifest's presence as the commit. Everything here is pure (no I/O) so that the local store,
the remote store and the daemon share one definition.

Formats (DESIGN.md, "Checkpoint = a directory plus a manifest"):

- ``ckptsync/2`` (written now): each file entry is ``{"path", "size", <algo>: hex}`` where
  ``<algo>`` is ``blake3`` (what ckptsync writes) or ``sha256``. The manifest verifies itself:
  ``manifest_digest`` is ``{"blake3": hex}``, the BLAKE3 of the canonical encoding of the whole
  manifest object except ``manifest_digest`` itself (unknown fields included)::

      json.dumps(obj_without_manifest_digest, sort_keys=True, separators=(",", ":"),
                 ensure_ascii=True).encode("ascii")

  computed over the object as JSON parses it (the writer hashes what a reader will parse). A
  missing or wrong ``manifest_digest`` means the manifest was altered: it is refused.
- ``ckptsync/1`` (read forever): entries carry ``sha256``; no ``manifest_digest``.

For both: a name made by :func:`make_name` carries the step, and the manifest's ``step`` must
equal it; a manifest larger than :data:`MAX_MANIFEST_BYTES` is refused without being parsed
(readers never read more than that bound plus one byte), and one larger than
:func:`manifest_bound` of its file count is refused too; an entry without a digest this
version knows raises :class:`UnsupportedFormatError`, never trusted.

Example::

    m = Manifest.new(step=100, files=[FileEntry("model.pt", 1024, "blake3", "ab..")])
    data = m.to_json()
    assert Manifest.from_json(data, where="run/ckpt/ckptsync.json") == m
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

import blake3

from ckptsync.errors import ManifestError, UnsupportedFormatError

__all__ = [
    "DIGEST_ALGOS",
    "ENC_FIELD",
    "FORMAT",
    "MANIFEST_NAME",
    "MANIFEST_BASE_BYTES",
    "MANIFEST_BYTES_PER_FILE",
    "MAX_MANIFEST_BYTES",
    "WRITE_ALGO",
    "Encryption",
    "FileEntry",
    "Hasher",
    "Manifest",
    "check_relpath",
    "make_name",
    "manifest_bound",
    "manifest_too_large",
    "name_sort_key",
    "new_hasher",
    "parse_name",
    "unusable_reason",
]

FORMAT = "ckptsync/2"
FORMAT_MAJOR = 2
READ_MAJORS = ("1", "2")
MANIFEST_NAME = "ckptsync.json"
LATEST_NAME = "LATEST"
DIGEST_FIELD = "manifest_digest"
#: Manifests (and the LATEST hint) larger than this are refused, never read whole: the most a
#: reader reads of one. Below it, a manifest's bound grows with its file count
#: (:func:`manifest_bound`): a file's entry takes about 150 bytes plus its path twice (its
#: ``source.paths`` too), so this is room for over a hundred thousand files.
MAX_MANIFEST_BYTES = 32 * 1024 * 1024
#: A manifest's bound: this much (its metadata), plus :data:`MANIFEST_BYTES_PER_FILE` per file.
MANIFEST_BASE_BYTES = 4 * 1024 * 1024
MANIFEST_BYTES_PER_FILE = 1024
#: The digest ckptsync writes for every file and for the manifest itself.
WRITE_ALGO = "blake3"
#: Digests a reader verifies, in order of preference when an entry carries several.
DIGEST_ALGOS = ("blake3", "sha256")

#: The file entry field of an encrypted file (:class:`Encryption`): only in a remote manifest.
ENC_FIELD = "enc"
_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
# step-<12 digits>-<UTC stamp>-<6 hex>  or  nostep-<UTC stamp>-<6 hex>
_NAME_RE = re.compile(
    r"^(?:step-(?P<step>\d{12})|nostep)-(?P<stamp>\d{8}T\d{6}\d{6}Z)-(?P<suffix>[0-9a-f]{6})$"
)
_KNOWN_FIELDS = ("format", "name", "step", "created", "files", "metrics", "meta", "source", "extra",
                 DIGEST_FIELD)


class Hasher(Protocol):
    """What :func:`new_hasher` returns: ``hashlib``'s and ``blake3``'s common interface."""

    def update(self, data: Any, /) -> object: ...

    def hexdigest(self) -> str: ...


def new_hasher(algo: str = WRITE_ALGO) -> Hasher:
    """A fresh hasher for ``algo`` (one of :data:`DIGEST_ALGOS`).

    Every place that verifies a file hashes it with its entry's algorithm, so a
    ``ckptsync/1`` checkpoint verifies with sha256 and a ``ckptsync/2`` one with BLAKE3.

    Raises:
        UnsupportedFormatError: an algorithm this version does not know.
    """
    if algo == "blake3":
        return blake3.blake3()
    if algo == "sha256":
        return hashlib.sha256()
    raise UnsupportedFormatError(
        f"digest algorithm {algo!r} is not supported by this ckptsync (it knows "
        f"{', '.join(DIGEST_ALGOS)}); upgrade ckptsync"
    )


def canonical_bytes(obj: Mapping[str, Any]) -> bytes:
    """The bytes ``manifest_digest`` covers: ``obj`` without that field, canonically encoded."""
    body = {k: v for k, v in obj.items() if k != DIGEST_FIELD}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode(
        "ascii"
    )


def manifest_bound(files: int) -> int:
    """The largest manifest of ``files`` files a reader accepts (and a writer writes):
    :data:`MANIFEST_BASE_BYTES` plus :data:`MANIFEST_BYTES_PER_FILE` per file, at most
    :data:`MAX_MANIFEST_BYTES`."""
    return min(MAX_MANIFEST_BYTES, MANIFEST_BASE_BYTES + MANIFEST_BYTES_PER_FILE * files)


def _bound_rule() -> str:
    return (f"{MANIFEST_BASE_BYTES // 2**20} MiB plus {MANIFEST_BYTES_PER_FILE:,} bytes per "
            f"file, at most {MAX_MANIFEST_BYTES // 2**20} MiB")


def manifest_too_large(where: str, size: int | None, files: int | None = None) -> ManifestError:
    """The error for a manifest over its bound: over :data:`MAX_MANIFEST_BYTES` (not read;
    ``size`` None: unknown), or, ``files`` given, over :func:`manifest_bound` of its count."""
    got = f"more than {MAX_MANIFEST_BYTES:,}" if size is None else f"{size:,}"
    bound = (f"the {MAX_MANIFEST_BYTES:,}-byte bound for any ckptsync manifest; it was not "
             "read" if files is None else
             f"the {manifest_bound(files):,}-byte bound for a manifest of {files:,} files "
             f"({_bound_rule()})")
    return ManifestError(
        f"{where}: manifest is {got} bytes, over {bound}, and the checkpoint will not be used "
        "(ckptsync refuses to write such a manifest: check what wrote it, and delete it)"
    )


def _too_large_to_write(name: str, size: int, files: int) -> ManifestError:
    return ManifestError(
        f"checkpoint {name}: its manifest would be {size:,} bytes for {files:,} files, over the "
        f"{manifest_bound(files):,}-byte bound for {files:,} files ({_bound_rule()}), which "
        "readers would refuse; nothing was written. Make the checkpoint smaller: fewer files "
        "per version (e.g. one watch rule per subdirectory), shorter paths, or less metadata "
        "(extra, meta)"
    )


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def make_name(step: int | None, created: datetime | None = None) -> str:
    """A unique checkpoint name that sorts by (step, creation time).

    The step is zero-padded, then comes the UTC creation time to the microsecond and a random
    suffix, so two writers never share a name and names are never reused.

    >>> make_name(42)  # doctest: +SKIP
    'step-000000000042-20261128T101500123456Z-3f9a1c'
    """
    if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
        raise ManifestError(f"step must be a non-negative int or None, got {step!r}")
    if step is not None and step >= 10**12:
        raise ManifestError(f"step {step} is too large (at most 12 digits)")
    created = created or utcnow()
    stamp = created.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    suffix = secrets.token_hex(3)
    head = "nostep" if step is None else f"step-{step:012d}"
    return f"{head}-{stamp}-{suffix}"


def parse_name(name: str) -> tuple[int | None, str] | None:
    """``(step, stamp)`` of a name made by :func:`make_name`, or None for any other name."""
    m = _NAME_RE.match(name)
    if m is None:
        return None
    step = m.group("step")
    return (int(step) if step is not None else None, m.group("stamp"))


def name_sort_key(name: str) -> tuple[int, int, str, str]:
    """Newest-last ordering from the name alone (no manifest read).

    Steps order before creation time; names without a step order by time among themselves
    and before any stepped name. Foreign names sort first (oldest).
    """
    parsed = parse_name(name)
    if parsed is None:
        return (-1, -1, "", name)
    step, stamp = parsed
    return (0 if step is None else 1, -1 if step is None else step, stamp, name)


def check_relpath(path: Any, *, where: str) -> str:
    """Validate a path listed in a manifest: relative, POSIX, no ``..``, no empty parts.

    Raises :class:`ManifestError` naming ``where`` (the manifest's location) otherwise.
    """
    if not isinstance(path, str) or not path:
        raise ManifestError(f"{where}: file path must be a non-empty string, got {path!r}")
    bad = (
        path.startswith("/")
        or "\\" in path
        or "\x00" in path
        or re.match(r"^[A-Za-z]:", path) is not None
    )
    parts = path.split("/")
    if bad or any(p in ("", ".", "..") for p in parts):
        raise ManifestError(
            f"{where}: unsafe file path {path!r} (paths must be relative POSIX paths without "
            "'..'); the manifest was tampered with or written by a broken tool: do not use it"
        )
    if parts[0] == MANIFEST_NAME:
        raise ManifestError(f"{where}: a listed file may not be named {MANIFEST_NAME}")
    return path


@dataclass(frozen=True)
class Encryption:
    """How a stored file is encrypted (:mod:`ckptsync.crypto`), from its entry's ``enc``
    field: ``{"alg": ..., "key_id": ..., "size": <plaintext bytes>, "mac": ...}``. The
    entry's own ``size`` and digest describe the stored (encrypted) bytes, so ``ls``,
    ``verify`` and ``gc`` need no key. ``mac`` (optional): the keyed MAC of the plaintext
    digest (:func:`ckptsync.crypto.content_mac`), which the daemon compares a new version with."""

    alg: str
    key_id: str
    size: int
    mac: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"alg": self.alg, "key_id": self.key_id, "size": self.size}
        if self.mac is not None:
            d["mac"] = self.mac
        return d


@dataclass(frozen=True)
class FileEntry:
    """One file of a checkpoint: relative POSIX path, size in bytes, and its digest.

    ``algo`` names the digest (``blake3``, what ckptsync writes, or ``sha256``, what
    ``ckptsync/1`` wrote); ``digest`` is its lowercase hex. In JSON the digest sits under the
    algorithm's name: ``{"path": "model.pt", "size": 1024, "blake3": "ab.."}``.
    """

    path: str
    size: int
    algo: str
    digest: str
    unknown: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.unknown)
        d.update({"path": self.path, "size": self.size, self.algo: self.digest})
        return d

    @property
    def encryption(self) -> Encryption | None:
        """How the stored file is encrypted, or None (plaintext). Validated when parsed."""
        enc = self.unknown.get(ENC_FIELD)
        if not isinstance(enc, dict):
            return None
        return Encryption(enc["alg"], enc["key_id"], enc["size"], enc.get("mac"))

    @classmethod
    def from_dict(cls, d: Any, *, where: str) -> FileEntry:
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: each entry of 'files' must be an object, got {d!r}")
        path = check_relpath(d.get("path"), where=where)
        size = d.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ManifestError(f"{where}: file {path!r} has invalid size {size!r}")
        algo = next((a for a in DIGEST_ALGOS if a in d), None)
        if algo is None:
            others = sorted(k for k in d if k not in ("path", "size"))
            raise UnsupportedFormatError(
                f"{where}: file {path!r} carries no digest this ckptsync can verify (it knows "
                f"{', '.join(DIGEST_ALGOS)}; the entry has {others or 'no other fields'}); the "
                "file cannot be trusted: upgrade ckptsync to read this checkpoint"
            )
        digest = d[algo]
        if not isinstance(digest, str) or not _HEX64_RE.match(digest):
            raise ManifestError(f"{where}: file {path!r} has invalid {algo} digest {digest!r}")
        unknown = {k: v for k, v in d.items() if k not in ("path", "size", algo)}
        enc = unknown.get(ENC_FIELD)
        if enc is not None and not (
                isinstance(enc, dict) and isinstance(enc.get("alg"), str)
                and isinstance(enc.get("key_id"), str)
                and isinstance(enc.get("size"), int) and not isinstance(enc["size"], bool)
                and 0 <= enc["size"] <= size
                and (enc.get("mac") is None or (isinstance(enc["mac"], str)
                                                and _HEX64_RE.match(enc["mac"]) is not None))):
            raise ManifestError(f"{where}: file {path!r} has an invalid {ENC_FIELD!r} field "
                                f"{enc!r}; the manifest was altered and will not be used")
        return cls(path, size, algo, digest, unknown)


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated ``ckptsync.json``.

    ``unknown`` holds fields this version does not know; they are written back unchanged.
    """

    name: str
    step: int | None
    created: str
    files: tuple[FileEntry, ...]
    metrics: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=lambda: {"kind": "native"})
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    unknown: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def new(
        cls,
        *,
        step: int | None,
        files: list[FileEntry] | tuple[FileEntry, ...],
        name: str | None = None,
        metrics: dict[str, float] | None = None,
        meta: dict[str, Any] | None = None,
        source: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        created: datetime | None = None,
    ) -> Manifest:
        """Build and validate a manifest for a new checkpoint."""
        created = created or utcnow()
        m = cls(
            name=name or make_name(step, created),
            step=step,
            created=created.astimezone(timezone.utc).isoformat().replace("+00:00", "Z"),
            files=tuple(files),
            metrics=dict(metrics or {}),
            meta=dict(meta or {}),
            source=dict(source or {"kind": "native"}),
            extra=dict(extra or {}),
        )
        # Round-trip through the parser: one set of rules for writers and readers (a manifest
        # a reader would refuse, such as one over the size bound, is refused here, at save).
        data = m.to_json()
        if len(data) > manifest_bound(len(m.files)):
            raise _too_large_to_write(m.name, len(data), len(m.files))
        return cls.from_json(data, where=f"manifest of {m.name}")

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def created_dt(self) -> datetime:
        return datetime.fromisoformat(self.created.replace("Z", "+00:00"))

    def sort_key(self) -> tuple[int, int, str, str]:
        """Newest-last: highest step, ties broken by creation time (DESIGN.md)."""
        step_key = -1 if self.step is None else self.step
        created = self.created_dt.astimezone(timezone.utc).isoformat()
        return (0 if self.step is None else 1, step_key, created, self.name)

    @property
    def major(self) -> int:
        """The format's major version (1 or 2)."""
        return int(self.format.split("/", 1)[1].split(".", 1)[0])

    def to_dict(self) -> dict[str, Any]:
        """The manifest as a JSON object, without ``manifest_digest`` (:meth:`to_json` adds it)."""
        d: dict[str, Any] = dict(self.unknown)
        d.update(
            {
                "format": self.format,
                "name": self.name,
                "step": self.step,
                "created": self.created,
                "files": [f.to_dict() for f in self.files],
                "metrics": self.metrics,
                "meta": self.meta,
                "source": self.source,
                "extra": self.extra,
            }
        )
        return d

    def to_json(self) -> bytes:
        """The bytes of ``ckptsync.json``; from format 2 on, with its ``manifest_digest``."""
        d = self.to_dict()
        if self.major >= 2:
            # Hash what a reader will parse (JSON turns tuples into lists, int keys into strings).
            h = new_hasher(WRITE_ALGO)
            h.update(canonical_bytes(json.loads(json.dumps(d))))
            d[DIGEST_FIELD] = {WRITE_ALGO: h.hexdigest()}
        return (json.dumps(d, indent=2, sort_keys=False) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes | str, *, where: str) -> Manifest:
        """Parse and validate; ``where`` (a path or URL) is named in every error.

        Raises:
            ManifestError: not JSON, over :data:`MAX_MANIFEST_BYTES`, altered (its
                ``manifest_digest`` does not match), or breaking a rule of the format.
            UnsupportedFormatError: a major format or digest this version does not know.
        """
        size = len(data.encode() if isinstance(data, str) else data)
        if size > MAX_MANIFEST_BYTES:
            raise manifest_too_large(where, size)
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise ManifestError(
                f"{where}: manifest is not valid JSON ({e}); the checkpoint is incomplete or "
                "corrupt and will not be used"
            ) from e
        files = obj.get("files") if isinstance(obj, dict) else None
        if isinstance(files, list) and size > manifest_bound(len(files)):
            raise manifest_too_large(where, size, len(files))
        return cls.from_dict(obj, where=where)

    @classmethod
    def from_dict(cls, obj: Any, *, where: str) -> Manifest:
        if not isinstance(obj, dict):
            raise ManifestError(f"{where}: manifest must be a JSON object")
        fmt = obj.get("format")
        if not isinstance(fmt, str) or not fmt.startswith("ckptsync/"):
            raise ManifestError(f"{where}: not a ckptsync manifest (format={fmt!r})")
        major = fmt.split("/", 1)[1].split(".", 1)[0]
        if major not in READ_MAJORS:
            raise UnsupportedFormatError(
                f"{where}: manifest format {fmt!r} is not supported by this ckptsync "
                f"(reads ckptsync/1 and {FORMAT}); upgrade ckptsync to read it"
            )
        if major == "1":
            if DIGEST_FIELD in obj:  # only format 2 writes one: this one's format was altered
                raise ManifestError(f"{where}: a {fmt!r} manifest with a {DIGEST_FIELD!r}: the "
                                    "manifest was altered and will not be used")
        else:
            _check_self_digest(obj, where)
        name = obj.get("name")
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise ManifestError(f"{where}: invalid checkpoint name {name!r}")
        step = obj.get("step")
        if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
            raise ManifestError(f"{where}: invalid step {step!r}")
        named = parse_name(name)
        if named is not None and named[0] != step:
            raise ManifestError(
                f"{where}: step {step!r} differs from the step in the checkpoint's name {name!r} "
                f"({named[0]!r}); the manifest was altered and will not be used"
            )
        created = obj.get("created")
        try:
            datetime.fromisoformat(str(created).replace("Z", "+00:00"))
        except ValueError as e:
            raise ManifestError(f"{where}: invalid 'created' timestamp {created!r}") from e
        raw_files = obj.get("files")
        if not isinstance(raw_files, list):
            raise ManifestError(f"{where}: 'files' must be a list")
        files = tuple(FileEntry.from_dict(f, where=where) for f in raw_files)
        seen: set[str] = set()
        for f in files:
            if f.path in seen:
                raise ManifestError(f"{where}: file {f.path!r} is listed twice")
            seen.add(f.path)
        metrics = obj.get("metrics", {})
        if not isinstance(metrics, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
            for k, v in metrics.items()
        ):
            raise ManifestError(f"{where}: 'metrics' must map names to numbers")
        for key in ("meta", "source", "extra"):
            if not isinstance(obj.get(key, {}), dict):
                raise ManifestError(f"{where}: {key!r} must be an object")
        return cls(
            name=name,
            step=step,
            created=str(created),
            files=files,
            metrics={k: float(v) for k, v in metrics.items()},
            meta=dict(obj.get("meta", {})),
            source=dict(obj.get("source", {"kind": "native"})),
            extra=dict(obj.get("extra", {})),
            format=fmt,
            unknown={k: v for k, v in obj.items() if k not in _KNOWN_FIELDS},
        )


def unusable_reason(m: Manifest) -> str | None:
    """Why a committed checkpoint cannot be restored whatever its files hold, or None.

    The one rule restore, pull, ``scan`` and retention share (DESIGN.md: a checkpoint failing
    any check does not exist for them): a manifest listing no files verifies trivially but
    restores nothing, so it neither counts as the newest valid checkpoint nor protects one.
    """
    if not m.files:
        return "its manifest lists no files: nothing to restore"
    return None


def _check_self_digest(obj: dict[str, Any], where: str) -> None:
    """Raise unless ``obj[manifest_digest]`` is the digest of ``obj``'s canonical bytes."""
    got = obj.get(DIGEST_FIELD)
    if not isinstance(got, dict) or not got:
        raise ManifestError(
            f"{where}: manifest has no valid {DIGEST_FIELD!r} (a {obj.get('format')!r} manifest "
            "always carries one); the manifest was altered or damaged and will not be used"
        )
    algo = next((a for a in DIGEST_ALGOS if a in got), None)
    if algo is None:
        raise UnsupportedFormatError(
            f"{where}: {DIGEST_FIELD!r} uses no algorithm this ckptsync knows "
            f"({sorted(got)}); upgrade ckptsync to read this checkpoint"
        )
    h = new_hasher(algo)
    h.update(canonical_bytes(obj))
    if got[algo] != h.hexdigest():
        raise ManifestError(
            f"{where}: manifest content does not match its {DIGEST_FIELD!r}: the manifest was "
            "altered after it was written (or damaged) and will not be used"
        )
