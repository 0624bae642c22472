"""Small helpers of the remote conformance suite (tests/conformance/): the backends it runs
on, a ``RemoteStore`` with fast retries, local checkpoints to push, and direct access to a
remote's objects (as a broken or malicious tool would write them).

``STORE_BACKENDS`` is every backend the conftest starts (file, memory, seaweedfs, moto, gcs,
gdrive, mounted_drive); ``CKPTSYNC_STORE_BACKENDS=file,memory`` narrows it for a quick run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ckptsync.config import TransferConfig
from ckptsync.local import LocalCheckpoint, LocalStore
from ckptsync.manifest import MANIFEST_NAME, Manifest, make_name
from ckptsync.ownership import RUN_FILE
from ckptsync.remote import RemoteStore
from tests.support.faults import FaultFS

STORE_BACKENDS = os.environ.get(
    "CKPTSYNC_STORE_BACKENDS", "file,memory,seaweedfs,moto,gcs,gdrive,mounted_drive"
).split(",")
FAST = TransferConfig(max_workers=4, chunk_size=64 * 1024, retries=3, backoff_initial=0.0,
                      backoff_max=0.0)


def make_store(remote: Any, *, fs: Any = None, config: TransferConfig = FAST) -> RemoteStore:
    return RemoteStore(remote.url, remote.storage_options, fs=fs, config=config)


def faulty(remote: Any) -> FaultFS:
    return FaultFS(remote.fs())


def make_local(store: LocalStore, step: int | None, files: dict[str, bytes],
               metrics: dict[str, float] | None = None) -> LocalCheckpoint:
    st = store.staging(make_name(step))
    for path, data in files.items():
        st.write_file(path, data)
    return st.commit(Manifest.new(step=step, files=st.entries, name=st.name, metrics=metrics))


def make_node_parts(root: Path, step: int,
                    node_files: list[dict[str, bytes]]) -> list[LocalCheckpoint]:
    """Each node's local part of one multi-node checkpoint (node ``n`` holds
    ``node_files[n]``), committed in ``root/node<n>``."""
    from ckptsync.parts import make_parts

    name = make_name(step)
    stagings = [LocalStore(root / f"node{n}").staging(name) for n in range(len(node_files))]
    by_node = [[st.write_file(p, d) for p, d in files.items()]
               for st, files in zip(stagings, node_files, strict=True)]
    whole = Manifest.new(step=step, files=[e for es in by_node for e in es], name=name,
                         meta={"dcp": {"world_size": len(node_files), "objects": ["model"],
                                       "nodes": len(node_files)}})
    return [st.commit(m) for st, m in zip(stagings, make_parts(whole, by_node), strict=True)]


def files_for(step: int) -> dict[str, bytes]:
    return {
        "model.pt": os.urandom(300_000) + step.to_bytes(4, "little"),  # several chunks
        "optim/state.pt": os.urandom(1000),
        "empty.bin": b"",
    }


def secret_values(obj: Any) -> list[str]:
    """The strings in storage options that must never be shown (URLs and short ones aside)."""
    if isinstance(obj, str):
        return [obj] if len(obj) >= 6 and not obj.startswith("http") else []
    if isinstance(obj, dict):
        return [s for k, v in obj.items() if k != "client_kwargs" for s in secret_values(v)]
    return []


def rpath(remote: Any, *parts: str) -> str:
    return "/".join([remote.path.rstrip("/"), *parts])


def put(remote: Any, path: str, data: bytes) -> None:
    """Write a remote object directly (as a broken or malicious tool would)."""
    fs = remote.fs()
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)  # a no-op on object stores
    fs.pipe_file(path, data)
    fs.invalidate_cache()


def overwrite(remote: Any, path: str, data: bytes) -> None:
    fs = remote.fs()
    fs.rm_file(path)  # Drive would otherwise keep two files of one name
    fs.pipe_file(path, data)
    fs.invalidate_cache()


def read_tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes()
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME}


def no_leftovers(local: LocalStore) -> bool:
    """Nothing hidden left behind (a pull's staging), but the record of the run it pulled."""
    return not any(p.name.startswith(".") and p.name != RUN_FILE
                   for p in local.directory.iterdir())


class ReadSizes(FaultFS):
    """Records the largest result of any whole-or-ranged read (``cat_file``, ``cat``)."""

    def __init__(self, target: Any) -> None:
        super().__init__(target)
        self.largest = 0

    def _seen(self, data: Any) -> Any:
        for v in data.values() if isinstance(data, dict) else [data]:
            if isinstance(v, (bytes, bytearray)):
                self.largest = max(self.largest, len(v))
        return data

    def cat_file(self, path: str, start: int | None = None, end: int | None = None,
                 **kwargs: Any) -> Any:
        return self._seen(super().cat_file(path, start=start, end=end, **kwargs))

    def cat(self, path: Any, recursive: bool = False, on_error: str = "raise",
            **kwargs: Any) -> Any:
        return self._seen(super().cat(path, recursive=recursive, on_error=on_error, **kwargs))
