"""The checkpoint format: ``ckptsync.json``, its validation, and checkpoint names.

A checkpoint is a directory of files plus this manifest, written last: a reader treats the
manifest's presence as the commit. Everything here is pure (no I/O) so that the local store,
the remote store and the daemon share one definition.

Example::

    m = Manifest.new(step=100, files=[FileEntry("model.pt", 1024, "ab..")])
    data = m.to_json()
    assert Manifest.from_json(data, where="run/ckpt/ckptsync.json") == m
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from ckptsync.errors import ManifestError, UnsupportedFormatError

__all__ = [
    "FORMAT",
    "MANIFEST_NAME",
    "FileEntry",
    "Manifest",
    "check_relpath",
    "make_name",
    "name_sort_key",
    "parse_name",
    "unusable_reason",
]

FORMAT = "ckptsync/1"
FORMAT_MAJOR = 1
MANIFEST_NAME = "ckptsync.json"
LATEST_NAME = "LATEST"

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# step-<12 digits>-<UTC stamp>-<6 hex>  or  nostep-<UTC stamp>-<6 hex>
_NAME_RE = re.compile(
    r"^(?:step-(?P<step>\d{12})|nostep)-(?P<stamp>\d{8}T\d{6}\d{6}Z)-(?P<suffix>[0-9a-f]{6})$"
)
_KNOWN_FIELDS = ("format", "name", "step", "created", "files", "metrics", "meta", "source", "extra")


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
class FileEntry:
    """One file of a checkpoint: relative POSIX path, size in bytes, sha256 hex digest."""

    path: str
    size: int
    sha256: str
    unknown: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.unknown)
        d.update({"path": self.path, "size": self.size, "sha256": self.sha256})
        return d

    @classmethod
    def from_dict(cls, d: Any, *, where: str) -> FileEntry:
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: each entry of 'files' must be an object, got {d!r}")
        path = check_relpath(d.get("path"), where=where)
        size = d.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ManifestError(f"{where}: file {path!r} has invalid size {size!r}")
        digest = d.get("sha256")
        if not isinstance(digest, str) or not _SHA256_RE.match(digest):
            raise ManifestError(f"{where}: file {path!r} has invalid sha256 {digest!r}")
        unknown = {k: v for k, v in d.items() if k not in ("path", "size", "sha256")}
        return cls(path, size, digest, unknown)


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
        # Round-trip through the parser: one set of rules for writers and readers.
        return cls.from_dict(m.to_dict(), where=f"manifest of {m.name}")

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

    def to_dict(self) -> dict[str, Any]:
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
        return (json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes | str, *, where: str) -> Manifest:
        """Parse and validate; ``where`` (a path or URL) is named in every error."""
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise ManifestError(
                f"{where}: manifest is not valid JSON ({e}); the checkpoint is incomplete or "
                "corrupt and will not be used"
            ) from e
        return cls.from_dict(obj, where=where)

    @classmethod
    def from_dict(cls, obj: Any, *, where: str) -> Manifest:
        if not isinstance(obj, dict):
            raise ManifestError(f"{where}: manifest must be a JSON object")
        fmt = obj.get("format")
        if not isinstance(fmt, str) or not fmt.startswith("ckptsync/"):
            raise ManifestError(f"{where}: not a ckptsync manifest (format={fmt!r})")
        major = fmt.split("/", 1)[1].split(".", 1)[0]
        if major != str(FORMAT_MAJOR):
            raise UnsupportedFormatError(
                f"{where}: manifest format {fmt!r} is not supported by this ckptsync "
                f"(reads {FORMAT}); upgrade ckptsync to read it"
            )
        name = obj.get("name")
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise ManifestError(f"{where}: invalid checkpoint name {name!r}")
        step = obj.get("step")
        if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
            raise ManifestError(f"{where}: invalid step {step!r}")
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
