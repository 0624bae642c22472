"""Format features: what a manifest's ``requires`` may list, and the refusal of one this
version does not know (DESIGN.md, "Checkpoint = a directory plus a manifest").

A checkpoint lists in ``requires`` every feature a reader must implement to use it; a reader
that meets one it does not know raises :class:`~ckptsync.errors.UnsupportedFormatError`
naming the feature and the ckptsync that wrote it (``written_by``), and restore stops there:
never "corrupt", never passed over for an older checkpoint (that would resume from the wrong
step).

- ``encryption/1``: files encrypted as ``aes-256-gcm-chunked/1`` (:mod:`ckptsync.crypto`) and
  the manifest's keyed MAC (:mod:`ckptsync.integrity`). One feature, not two: a MAC is written
  only under a key, where every file is encrypted, so the two always come together; and a
  separate ``mac/1`` would make the readers that need neither (``ls``, ``verify``, ``gc``,
  without the key) refuse checkpoints they can read.
- ``parts/1``: one node's part of a multi-node checkpoint (:mod:`ckptsync.parts`), which a
  reader that does not know parts would take for a whole checkpoint.
"""

from __future__ import annotations

from typing import Any

from ckptsync.errors import ManifestError, UnsupportedFormatError

__all__ = ["FEATURES", "REQUIRES_FIELD", "WRITER_FIELD", "check_requires"]

REQUIRES_FIELD = "requires"
#: Which ckptsync wrote a manifest that lists ``requires`` (named when a reader refuses it).
WRITER_FIELD = "written_by"
#: The format features this version reads, with what each means.
FEATURES = {
    "encryption/1": "files encrypted as aes-256-gcm-chunked/1 and the manifest's keyed MAC",
    "parts/1": "one node's part of a multi-node checkpoint (ckptsync.parts)",
}


def check_requires(obj: dict[str, Any], where: str) -> None:
    """Refuse a manifest object whose ``requires`` lists a feature this version does not
    implement, naming it and the writer.

    Raises:
        UnsupportedFormatError: an unknown feature.
        ManifestError: ``requires`` is not a list of strings.
    """
    req = obj.get(REQUIRES_FIELD)
    if req is None:
        return
    if not isinstance(req, list) or not all(isinstance(r, str) for r in req):
        raise ManifestError(f"{where}: {REQUIRES_FIELD!r} must be a list of feature names, "
                            f"got {req!r}; the manifest was altered and will not be used")
    unknown = [r for r in req if r not in FEATURES]
    if unknown:
        from ckptsync.version import __version__

        writer = obj.get(WRITER_FIELD)
        who = writer if isinstance(writer, str) and len(writer) < 80 else "a newer ckptsync"
        raise UnsupportedFormatError(
            f"{where}: this checkpoint requires format feature {unknown[0]!r}, which this "
            f"ckptsync ({__version__}) does not implement; it was written by {who}: upgrade "
            "to that version (or newer) to read it. It is not skipped as corrupt: restoring "
            "an older checkpoint in its place would resume from the wrong step")
