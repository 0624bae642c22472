"""Manifests written by hand, as another writer would: format 2 objects given their
``manifest_digest``, and checkpoints rewritten exactly as ``ckptsync/1`` wrote them.

Imported as ``tests.support.formats``; needs no torch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import blake3

MANIFEST = "ckptsync.json"


def seal(obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` with the ``manifest_digest`` that manifest.py's documented rule gives it."""
    body = {k: v for k, v in obj.items() if k != "manifest_digest"}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return {**body, "manifest_digest": {"blake3": blake3.blake3(canon.encode()).hexdigest()}}


def v1_manifest(checkpoint_dir: Path) -> bytes:
    """The manifest ``ckptsync/1`` would have written for the files of a committed checkpoint:
    format "ckptsync/1", ``{path, size, sha256}`` entries, no ``manifest_digest``."""
    obj = json.loads((checkpoint_dir / MANIFEST).read_bytes())
    obj.pop("manifest_digest", None)
    obj["format"] = "ckptsync/1"
    obj["files"] = [
        {"path": f["path"], "size": f["size"],
         "sha256": hashlib.sha256((checkpoint_dir / f["path"]).read_bytes()).hexdigest()}
        for f in obj["files"]
    ]
    return (json.dumps(obj, indent=2) + "\n").encode()


def rewrite_as_v1(checkpoint_dir: Path) -> None:
    """Turn a committed local checkpoint into one that ``ckptsync/1`` wrote (same files)."""
    data = v1_manifest(checkpoint_dir)
    (checkpoint_dir / MANIFEST).write_bytes(data)


def put_tree(fs: Any, checkpoint_dir: Path, remote_dir: str) -> None:
    """Upload a checkpoint directory as it is, manifest last (as ckptsync/1's push did)."""
    files = sorted(p for p in checkpoint_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    for p in [*files, checkpoint_dir / MANIFEST]:
        dst = f"{remote_dir}/{p.relative_to(checkpoint_dir).as_posix()}"
        fs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)  # a no-op on object stores
        fs.pipe_file(dst, p.read_bytes())
    fs.invalidate_cache()
