"""Multi-node checkpoints: one checkpoint written in parts, one part per node.

DESIGN.md, "Distributed": with several nodes, each node's ranks write their DCP files to
that node's own disk, so no local directory holds the whole checkpoint. Each node commits
its *part* locally: a checkpoint of the same name whose manifest lists that node's files
only, and carries, in ``meta["part"]``, the node's index, the number of nodes and the whole
checkpoint's manifest (every node's files with their digests, built by rank 0).

Remotely the parts meet under the one checkpoint name. A node's uploader uploads its files,
checks their sizes, then writes its part marker ``<name>/ckptsync-part-<node>.json`` (the
part's manifest); then it lists the checkpoint's prefix, and when it finds every node's
marker and every file of the whole manifest with its size, it writes the whole manifest with
the create-only write. Each node writes its marker *before* it looks for the others', so
whichever node finishes last sees every marker and commits; two that see them at once race
on the create-only write, and the loser finds the same manifest there (no harm). Until then
the prefix has no manifest: it does not exist for restore, and ``gc`` collects it as an
uncommitted leftover (markers included) once it is older than the grace period. The
markers of a committed checkpoint stay beside its files, unlisted, and go with it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ckptsync.manifest import FileEntry, Manifest

__all__ = ["PART_KEY", "PART_MARKER", "Part", "make_parts", "marker_name", "part_of"]

PART_KEY = "part"
"""Key in a part's ``meta``: ``{"node", "nodes", "manifest"}``."""

PART_MARKER = re.compile(r"^ckptsync-part-([0-9]+)\.json$")


def marker_name(node: int) -> str:
    """The relative path of node ``node``'s part marker under the checkpoint's prefix."""
    return f"ckptsync-part-{node}.json"


@dataclass(frozen=True)
class Part:
    """What a part's manifest says of the whole checkpoint."""

    node: int
    nodes: int
    whole: Manifest


def part_of(m: Manifest) -> Part | None:
    """The :class:`Part` that ``m`` is the manifest of, or None for a whole checkpoint.

    Raises:
        ManifestError: ``meta["part"]`` is there but malformed, or its whole manifest is
            invalid or of another checkpoint.
    """
    from ckptsync.errors import ManifestError

    info = m.meta.get(PART_KEY)
    if info is None:
        return None
    try:
        node, nodes = int(info["node"]), int(info["nodes"])
        whole = Manifest.from_json(json.dumps(info["manifest"]),
                                   where=f"whole manifest in part of {m.name}")
    except (KeyError, TypeError, ValueError) as e:
        raise ManifestError(f"manifest of {m.name}: malformed part information ({e}); "
                            "the checkpoint was not written by this ckptsync") from e
    if whole.name != m.name or not 0 <= node < nodes or not set(m.files) <= set(whole.files):
        raise ManifestError(f"manifest of {m.name}: part {node} of {nodes} does not match the "
                            "whole checkpoint it names")
    return Part(node, nodes, whole)


def make_parts(whole: Manifest, by_node: list[list[FileEntry]]) -> list[Manifest]:
    """One part manifest per node: node ``i``'s files ``by_node[i]``, and the whole."""
    out = []
    for node, files in enumerate(by_node):
        meta: dict[str, Any] = dict(whole.meta)
        meta[PART_KEY] = {"node": node, "nodes": len(by_node),
                          "manifest": json.loads(whole.to_json())}
        out.append(Manifest.new(step=whole.step, files=files, name=whole.name,
                                metrics=whole.metrics, meta=meta, source=whole.source,
                                extra=whole.extra, created=whole.created_dt))
    return out
