"""Zero-code watch rules: which files form one checkpoint, and whether a file looks whole.

A :class:`WatchRule` names which files or directories form one checkpoint and how to know a
version is finished:

``file:PATTERN``
    The files matching ``PATTERN`` (a glob relative to the watched directory, e.g. ``ckpt.pt``
    or ``weights/*.pt``) form one checkpoint. A version is finished when every matching file
    was renamed into place since the last version (the temp-file-and-rename pattern: finished
    at once), or when none of them changed for ``settle`` seconds (a file rewritten in place
    with ``open(path, "wb")``).
``dir:GLOB:MARKER``
    Each directory matching ``GLOB`` (e.g. ``checkpoint-*``) is one version, finished when
    ``MARKER`` (a path inside it, e.g. ``DONE``) exists and the directory was quiet for
    ``settle`` seconds. The newest finished directory is taken; the trainer may delete old ones.

Options follow a ``;``: ``step=`` says where a version's step comes from. ``content`` (the
default): what the files say, never the name (:mod:`ckptsync.zerocode.contentstep`: a Hugging
Face ``trainer_state.json``'s ``global_step``, a ``torch.save`` dict's top-level ``step``,
``iter_num``, ``global_step``, else ``epoch``), else no step; ``name``: the first integer of
the file or directory name; ``REGEX``: the regex's first group, or the whole match, searched
in the relative path; ``none``: no step. E.g. ``dir:run/ckpt-*:DONE;step=ckpt-(\\d+)``. (A
name's first integer is often not a step: ``pretrain_64.pth``'s 64 is a hidden size.)

:func:`check_complete` and :func:`structure_complete` tell, without torch, whether a file in a
self-describing format (``torch.save``'s zip, safetensors) is whole. :func:`is_watched` tells a
zero-code checkpoint's manifest from a native one's.

Nothing here imports torch.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import os
import re
import stat
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ckptsync.errors import ConfigError
from ckptsync.local import PRIVATE_PREFIX
from ckptsync.manifest import Manifest
from ckptsync.zerocode.contentstep import content_step

__all__ = [
    "WATCHED",
    "StatSig",
    "WatchRule",
    "check_complete",
    "dir_files",
    "glob_match",
    "is_private",
    "is_watched",
    "stat_sig",
    "structure_complete",
]

WATCHED = "watched"
_INT_RE = re.compile(r"\d+")
_STEP_WORDS = ("content", "name", "none")
_MAX_SAFETENSORS_HEADER = 100 << 20
_MAX_JSON = 64 << 20

StatSig = tuple[int, int, int, int]
"""(inode, size, mtime_ns, ctime_ns): changes whenever a file is rewritten or replaced."""


def stat_sig(st: os.stat_result) -> StatSig:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def is_private(rel: str) -> bool:
    """The daemon's directory, a pull's temp dir, a checkpointer's lock: ckptsync's own."""
    return rel.split("/", 1)[0].startswith(PRIVATE_PREFIX)


def glob_match(rel: str, pattern: str) -> bool:
    """Does ``rel`` match ``pattern`` as :meth:`pathlib.Path.glob` would list it?

    ``*``, ``?`` and ``[...]`` match within one path component (``fnmatch`` alone lets ``*``
    cross a ``/``); a ``**`` component matches any number of components.
    """
    parts, pats = rel.split("/"), pattern.split("/")

    @functools.cache
    def match(i: int, j: int) -> bool:
        if j == len(pats):
            return i == len(parts)
        if pats[j] == "**":
            return any(match(k, j + 1) for k in range(i, len(parts) + 1))
        return i < len(parts) and fnmatch.fnmatchcase(parts[i], pats[j]) and match(i + 1, j + 1)

    return match(0, 0)


@dataclass(frozen=True)
class WatchRule:
    """One zero-code rule, parsed from ``file:PATTERN`` or ``dir:GLOB:MARKER`` (see module doc).

    Raises:
        ConfigError: a malformed rule (the message shows the accepted forms).
    """

    kind: Literal["file", "dir"]
    pattern: str
    marker: str | None = None
    step: str = "content"
    """``content``, ``name``, ``none``, or a regex searched in the relative path."""
    spec: str = ""

    @classmethod
    def parse(cls, spec: str) -> WatchRule:
        """Parse a rule. Example: ``WatchRule.parse("dir:checkpoint-*:DONE")``."""
        text, _, opts = spec.partition(";")
        kind, _, rest = text.partition(":")
        step = "content"
        for opt in filter(None, (o.strip() for o in opts.split(";"))):
            key, eq, value = opt.partition("=")
            if key != "step" or not eq or not value:
                raise ConfigError(f"watch rule {spec!r}: unknown option {opt!r} (known: "
                                  "step=content|name|none|REGEX)")
            step = value.lower() if value.lower() in _STEP_WORDS else value
            if step not in _STEP_WORDS:
                try:
                    re.compile(step)
                except re.error as e:
                    raise ConfigError(f"watch rule {spec!r}: bad step regex ({e})") from e
        usage = ("expected 'file:PATTERN' or 'dir:GLOB:MARKER' with paths relative to the watched "
                 "directory, e.g. 'file:ckpt.pt' or 'dir:checkpoint-*:DONE'")
        if kind == "file" and rest and ":" not in rest:
            rule = cls("file", rest.strip("/"), None, step, spec)
        elif kind == "dir" and rest.count(":") == 1:
            glob, marker = rest.split(":")
            if not glob or not marker:
                raise ConfigError(f"invalid watch rule {spec!r}: {usage}")
            rule = cls("dir", glob.strip("/"), marker.strip("/"), step, spec)
        else:
            raise ConfigError(f"invalid watch rule {spec!r}: {usage}")
        for p in filter(None, (rule.pattern, rule.marker)):
            if p.startswith("/") or ".." in p.split("/") or is_private(p):
                raise ConfigError(f"invalid watch rule {spec!r}: paths must be relative, "
                                  f"without '..', not under a {PRIVATE_PREFIX}* name")
        return rule

    # ------------------------------------------------------------------ matching
    def matches_file(self, rel: str) -> bool:
        """Does ``rel`` (a file path relative to the watched dir) belong to this rule?"""
        if is_private(rel):
            return False
        if self.kind == "file":
            return glob_match(rel, self.pattern)
        return self.version_dir(rel) is not None

    def version_dir(self, rel: str) -> str | None:
        """For a dir rule: the matching version directory that contains (or is) ``rel``."""
        if self.kind != "dir":
            return None
        parts = rel.split("/")
        depth = len(self.pattern.split("/"))
        if len(parts) < depth:
            return None
        head = "/".join(parts[:depth])
        return head if glob_match(head, self.pattern) else None

    def step_of(self, rel: str) -> int | None:
        """The step a version's relative path names (``step=name`` or a regex), or None."""
        if self.step in ("content", "none"):
            return None
        if self.step == "name":
            m = _INT_RE.search(rel.rsplit("/", 1)[-1])
        else:
            found = re.search(self.step, rel)
            if found is None:
                return None
            m = _INT_RE.search((found.group(1) if found.groups() else found.group(0)) or "")
        if m is None:
            return None
        step = int(m.group(0))
        return step if step < 10**12 else None

    def step_for(self, root: Path, rels: list[str]) -> int | None:
        """The step of the version made of ``rels``: from its name or content, as ``step=``
        says (see the module doc)."""
        vdir = self.version_dir(rels[0]) if rels and self.kind == "dir" else None
        if self.step == "content":
            return content_step(root, rels, vdir)
        return self.step_of(vdir if vdir is not None else rels[0]) if rels else None

    # ------------------------------------------------------------------ listing
    def current_files(self, root: Path) -> list[str]:
        """For a file rule: the matching files that exist now, sorted."""
        return sorted(self.current_stats(root))

    def current_stats(self, root: Path) -> dict[str, StatSig]:
        """For a file rule: the matching files that exist now, with their stat (one ``stat``
        per file: a rule may match ten thousand)."""
        out: dict[str, StatSig] = {}
        for rel in _glob(root, self.pattern):
            try:
                st = os.stat(root / rel)
            except FileNotFoundError:
                continue  # deleted since it was listed
            if stat.S_ISREG(st.st_mode):
                out[rel] = stat_sig(st)
        return out

    def finished_dirs(self, root: Path) -> list[str]:
        """For a dir rule: matching directories holding the marker, oldest first."""
        marker = self.marker
        assert marker is not None
        out = [rel for rel in _glob(root, self.pattern)
               if (root / rel).is_dir() and (root / rel / marker).is_file()]
        return sorted(out, key=lambda rel: (self.step_of(rel) or -1, _mtime(root / rel / marker),
                                            _natural(rel)))


def _natural(rel: str) -> tuple[tuple[int, str], ...]:
    """``ckpt-9`` before ``ckpt-10``: digit runs compare as numbers."""
    return tuple((int(t), "") if t.isdigit() else (-1, t) for t in re.split(r"(\d+)", rel) if t)


def _mtime(p: Path) -> int:
    try:
        return p.stat().st_mtime_ns
    except OSError:
        return 0


def _glob(root: Path, pattern: str) -> list[str]:
    if not any(c in pattern for c in "*?["):
        return [pattern] if (root / pattern).exists() else []
    skip = len(str(root).rstrip(os.sep)) + 1  # str slicing: relative_to() per path is slow
    rels = (str(p)[skip:].replace(os.sep, "/") for p in root.glob(pattern))
    return [rel for rel in rels if not is_private(rel)]


def dir_files(root: Path, rel_dir: str) -> list[str]:
    """Every file under ``root/rel_dir`` (a directory rule's version), relative to ``root``."""
    base = root / rel_dir
    return sorted(p.relative_to(root).as_posix() for p in base.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- completeness
def check_complete(path: Path) -> str | None:
    """Why ``path`` is visibly incomplete, or None when it looks whole.

    Torch-free structural checks: an empty file; a ``.json`` file that does not parse; a zip
    archive (``torch.save``'s format) whose central directory is missing or points past the
    end; a safetensors file whose header does not account for its size. Other formats are
    opaque and pass.
    """
    return _structure(path)[1]


def structure_complete(path: Path) -> bool:
    """Is ``path`` in a self-describing format (``torch.save``'s zip, safetensors) and whole?

    False for an opaque format, for an incomplete file and for one that cannot be read.
    """
    try:
        known, why = _structure(path)
    except OSError:
        return False
    return known and why is None


def _structure(path: Path) -> tuple[bool, str | None]:
    """``(self-describing format, why incomplete or None)``."""
    size = path.stat().st_size
    if path.suffix == ".json":
        # A JSON document is whole when it parses: Hugging Face's trainer_state.json (the
        # hf-trainer preset's marker) is created empty, then written, not renamed into place.
        if size > _MAX_JSON:
            return False, None
        try:
            json.loads(path.read_bytes())
        except ValueError as e:
            return True, f"not a complete JSON document ({e})"
        return True, None
    if size == 0:
        return False, "empty file"
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                for info in z.infolist():
                    if info.header_offset + info.compress_size > size:
                        return True, (f"zip member {info.filename} extends past the end of "
                                      "the file")
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            return True, f"not a complete zip archive ({e})"
        return True, None
    if path.suffix == ".safetensors" and len(head) == 8:
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_SAFETENSORS_HEADER):
            return True, f"safetensors header of {n} bytes does not fit in {size} bytes"
        try:
            with open(path, "rb") as f:
                f.seek(8)
                header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                      default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            return True, f"safetensors header unreadable ({e})"
        if 8 + n + end != size:
            return True, f"safetensors size {size} != {8 + n + end} announced by its header"
        return True, None
    return False, None


def is_watched(m: Manifest) -> bool:
    return m.source.get("kind") == WATCHED
