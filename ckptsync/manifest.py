"""The checkpoint format: ``ckptsync.json`` (:class:`Manifest`), its validation and its size
bound. Checkpoint names are :mod:`ckptsync.names`, file entries :mod:`ckptsync.entries`,
digests :mod:`ckptsync.digests` (all importable from here too).

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

``requires`` lists the format features a reader must implement to use the checkpoint
(:mod:`ckptsync.features`), derived from the content when a manifest is built
(:func:`with_requires`); one this version does not know is refused, never "corrupt".

Fields a remote push adds (not covered by the keyed MAC of :mod:`ckptsync.integrity`, so that
a pusher without the key can add them to an ``encrypt_local`` checkpoint): ``run`` (the run
id of the root marker, :mod:`ckptsync.remote.marker`) and, for a checkpoint without a step,
``seq``: its place in the run, one more than the highest the remote held, so that step-less
versions order by the remote's sequence, never by a writer's clock (:meth:`Manifest.sort_key`).

Example::

    m = Manifest.new(step=100, files=[FileEntry("model.pt", 1024, "blake3", "ab..")])
    data = m.to_json()
    assert Manifest.from_json(data, where="run/ckpt/ckptsync.json") == m
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from ckptsync.digests import (
    DIGEST_ALGOS,
    DIGEST_FIELD,
    WRITE_ALGO,
    Hasher,
    canonical_bytes,
    check_self_digest,
    new_hasher,
)
from ckptsync.entries import ENC_FIELD, Encryption, FileEntry, check_relpath
from ckptsync.errors import ManifestError, UnsupportedFormatError
from ckptsync.features import FEATURES, REQUIRES_FIELD, WRITER_FIELD, check_requires
from ckptsync.names import (
    LATEST_NAME,
    MANIFEST_NAME,
    make_name,
    name_sort_key,
    parse_name,
    utcnow,
)

# The names a manifest is made of, defined in their own modules (digests, entries, names),
# are importable from here too: this module is the checkpoint format as a whole.
__all__ = [
    "DIGEST_ALGOS",
    "DIGEST_FIELD",
    "ENC_FIELD",
    "FEATURES",
    "FORMAT",
    "LATEST_NAME",
    "MANIFEST_NAME",
    "MANIFEST_BASE_BYTES",
    "MANIFEST_BYTES_PER_FILE",
    "MAX_MANIFEST_BYTES",
    "WRITE_ALGO",
    "Encryption",
    "FileEntry",
    "Hasher",
    "Manifest",
    "canonical_bytes",
    "check_relpath",
    "make_name",
    "manifest_bound",
    "manifest_too_large",
    "name_sort_key",
    "new_hasher",
    "parse_name",
    "pending_sort_key",
    "unusable_reason",
    "utcnow",
    "with_requires",
]

FORMAT = "ckptsync/2"
FORMAT_MAJOR = 2
READ_MAJORS = ("1", "2")
#: Manifests (and the LATEST hint) larger than this are refused, never read whole: the most a
#: reader reads of one. Below it, a manifest's bound grows with its file count
#: (:func:`manifest_bound`): a file's entry takes about 150 bytes plus its path twice (its
#: ``source.paths`` too), so this is room for over a hundred thousand files.
MAX_MANIFEST_BYTES = 32 * 1024 * 1024
#: A manifest's bound: this much (its metadata), plus :data:`MANIFEST_BYTES_PER_FILE` per file.
MANIFEST_BASE_BYTES = 4 * 1024 * 1024
MANIFEST_BYTES_PER_FILE = 1024
_KNOWN_FIELDS = ("format", "name", "step", "created", "files", "metrics", "meta", "source", "extra",
                 DIGEST_FIELD)
#: The keyed MAC of a manifest written under a key (:mod:`ckptsync.integrity`):
#: ``{"key_id": ..., "blake3": hex}``.
MAC_FIELD = "manifest_mac"
RUN_FIELD = "run"
SEQ_FIELD = "seq"
#: Fields a push adds to a remote manifest, outside the keyed MAC (see the module docstring).
PUSH_FIELDS = (RUN_FIELD, SEQ_FIELD)


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


@dataclass(frozen=True, eq=False)
class Manifest:
    """A parsed, validated ``ckptsync.json``.

    ``unknown`` holds fields this version does not know; they are written back unchanged.
    Two manifests are equal when they describe the same checkpoint: the fields a push adds
    (``run``, ``seq``: where it sits in a remote, not what it is) are not compared.
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
        m = with_requires(cls(
            name=name or make_name(step, created),
            step=step,
            created=created.astimezone(timezone.utc).isoformat().replace("+00:00", "Z"),
            files=tuple(files),
            metrics=dict(metrics or {}),
            meta=dict(meta or {}),
            source=dict(source or {"kind": "native"}),
            extra=dict(extra or {}),
        ))
        # Round-trip through the parser: one set of rules for writers and readers (a manifest
        # a reader would refuse, such as one over the size bound, is refused here, at save).
        data = m.to_json()
        if len(data) > manifest_bound(len(m.files)):
            raise _too_large_to_write(m.name, len(data), len(m.files))
        return cls.from_json(data, where=f"manifest of {m.name}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Manifest):
            return NotImplemented
        return self._identity() == other._identity()

    __hash__ = None  # type: ignore[assignment]  # mutable fields, as a dataclass with eq

    def _identity(self) -> tuple[Any, ...]:
        unknown = {k: v for k, v in self.unknown.items() if k not in PUSH_FIELDS}
        return (self.name, self.step, self.created, self.files, self.metrics, self.meta,
                self.source, self.extra, self.format, unknown)

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def created_dt(self) -> datetime:
        return datetime.fromisoformat(self.created.replace("Z", "+00:00"))

    @property
    def requires(self) -> tuple[str, ...]:
        """The format features a reader must implement (:mod:`ckptsync.features`)."""
        return tuple(self.unknown.get(REQUIRES_FIELD) or ())

    @property
    def run(self) -> str | None:
        """The run id a push recorded (:mod:`ckptsync.remote.marker`), or None."""
        run = self.unknown.get(RUN_FIELD)
        return run if isinstance(run, str) else None

    @property
    def seq(self) -> int | None:
        """A step-less checkpoint's place in its run, taken from the remote at its push."""
        seq = self.unknown.get(SEQ_FIELD)
        return seq if isinstance(seq, int) and not isinstance(seq, bool) else None

    def sort_key(self) -> tuple[int, int, str, str]:
        """Newest-last: highest step, ties broken by creation time (DESIGN.md). Without a
        step, by :attr:`seq` (taken from the remote, never a writer's clock), then creation
        time; one without a seq (never pushed, or by an older ckptsync) orders first."""
        seq = -1 if self.seq is None else self.seq
        step_key = seq if self.step is None else self.step
        created = self.created_dt.astimezone(timezone.utc).isoformat()
        return (0 if self.step is None else 1, step_key, created, self.name)

    def local_view(self) -> Manifest:
        """This manifest without the fields a push added (``run``, ``seq``): what a pulled
        copy commits locally, where order is the local writer's."""
        if not any(k in self.unknown for k in PUSH_FIELDS):
            return self
        return dataclasses.replace(
            self, unknown={k: v for k, v in self.unknown.items() if k not in PUSH_FIELDS})

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
            check_self_digest(obj, where)
        check_requires(obj, where)
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


def pending_sort_key(m: Manifest) -> tuple[int, int, str, str]:
    """:meth:`Manifest.sort_key` of a local checkpoint not pushed yet: a step-less one will
    get a higher ``seq`` than every remote one when it is pushed, so it orders after them."""
    key = m.sort_key()
    return (key[0], 2**62, key[2], key[3]) if m.step is None and m.seq is None else key


def derived_requires(m: Manifest) -> tuple[str, ...]:
    """The features ``m``'s content needs a reader to know (see :data:`FEATURES`)."""
    out = set()
    if any(f.encryption is not None for f in m.files) or MAC_FIELD in m.unknown:
        out.add("encryption/1")
    if isinstance(m.meta.get("part"), dict):
        out.add("parts/1")
    return tuple(sorted(out))


def with_requires(m: Manifest) -> Manifest:
    """``m`` with ``requires`` (and, where it lists any, ``written_by``) set from its content."""
    req = derived_requires(m)
    unknown = {k: v for k, v in m.unknown.items() if k not in (REQUIRES_FIELD, WRITER_FIELD)}
    if req:
        from ckptsync.version import __version__

        unknown[REQUIRES_FIELD] = list(req)
        unknown[WRITER_FIELD] = m.unknown.get(WRITER_FIELD) or f"ckptsync {__version__}"
    if unknown == m.unknown:
        return m
    return dataclasses.replace(m, unknown=unknown)


def unusable_reason(m: Manifest) -> str | None:
    """Why a committed checkpoint cannot be restored whatever its files hold, or None.

    The one rule restore, pull, ``scan`` and retention share (DESIGN.md: a checkpoint failing
    any check does not exist for them): a manifest listing no files verifies trivially but
    restores nothing, so it neither counts as the newest valid checkpoint nor protects one.
    """
    if not m.files:
        return "its manifest lists no files: nothing to restore"
    return None


