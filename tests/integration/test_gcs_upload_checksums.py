"""GCS uploads declare the CRC32C of their bytes, so that the server
refuses bytes damaged in transit.

gcsfs writes every object as a resumable upload; ckptsync adds ``X-Goog-Hash: crc32c=...`` to
the request that finalizes it (remote/backends/gcs.py), which real GCS checks before creating the
object. fake-gcs-server (the bundled 1.x) does NOT check a declared CRC32C (neither that
header nor ``crc32c`` in the upload metadata: it stores its own), so these tests capture what
the client sends through a proxy, and show that a byte flipped in transit still never ends in
a checkpoint: the reply's stored CRC32C differs from the one sent, the upload is sent again.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import google_crc32c
import pytest

from ckptsync.config import TransferConfig
from ckptsync.local import LocalStore
from ckptsync.manifest import Manifest, make_name
from ckptsync.remote import RemoteStore
from tests.support.fault_proxy import Fault, FaultProxy
from tests.support.remotes import Remote

pytestmark = pytest.mark.full

MiB = 1024 * 1024
# 5 MiB blocks: big.bin goes up in several chunks of one resumable upload, small.bin in one.
CONFIG = TransferConfig(max_workers=1, block_size=5 * MiB, chunk_size=MiB, retries=3,
                        backoff_initial=0.0)


def _checkpoint(tmp_path: Path, *, edges: bool = False) -> tuple[Any, dict[str, bytes]]:
    files = {"big.bin": os.urandom(11 * MiB + 17), "small.bin": os.urandom(300_000)}
    if edges:  # finalized by a request without a body ("bytes */N"); an empty object
        files |= {"exact.bin": os.urandom(10 * MiB), "empty.bin": b""}
    store = LocalStore(tmp_path / "local")
    name = make_name(7)
    staging = store.staging(name)
    for rel, data in files.items():
        staging.write_file(rel, data)
    return staging.commit(Manifest.new(step=7, files=staging.entries, name=name)), files


def _crc32c(data: bytes) -> str:
    return base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()


def _through(remote: Remote, proxy: FaultProxy) -> dict[str, Any]:
    opts: dict[str, Any] = json.loads(json.dumps(remote.storage_options))
    opts["endpoint_url"] = proxy.endpoint
    return opts


def _proxy(remote: Remote, *faults: Fault) -> FaultProxy:
    host, port = remote.extra["endpoint"].rsplit("/", 1)[1].split(":")
    return FaultProxy(host, int(port), plan=faults, lifetime=120)


def _declared(proxy: FaultProxy, rel: str) -> list[str]:
    """The CRC32Cs declared by the requests uploading ``rel``."""
    return [h["x-goog-hash"] for m, t, h in proxy.heads
            if m == "POST" and rel in t and "x-goog-hash" in h]


def _pulled(remote: Remote, name: str, dest: Path) -> dict[str, bytes]:
    ckpt = RemoteStore(remote.url, remote.storage_options).pull(name, LocalStore(dest))
    return {f.path: ckpt.file(f.path).read_bytes() for f in ckpt.manifest.files}


def test_gcs_uploads_declare_the_crc32c_of_their_bytes_on_the_finalizing_request(
        gcs_remote: Remote, tmp_path: Path) -> None:
    ckpt, files = _checkpoint(tmp_path, edges=True)
    with _proxy(gcs_remote) as proxy:
        RemoteStore(gcs_remote.url, _through(gcs_remote, proxy), config=CONFIG).push(ckpt)
    for rel, data in files.items():
        # Once per file, on the request whose Content-Range gives the total size.
        assert _declared(proxy, rel) == [f"crc32c={_crc32c(data)}"], (rel, proxy.heads)
        final = [h for m, t, h in proxy.heads if m == "POST" and rel in t
                 and not h.get("content-range", "/*").endswith("/*")]
        assert [h.get("x-goog-hash") for h in final] == [f"crc32c={_crc32c(data)}"]
    assert _pulled(gcs_remote, ckpt.name, tmp_path / "back") == files


def test_a_gcs_chunk_damaged_in_transit_is_sent_again_never_committed(
        gcs_remote: Remote, tmp_path: Path) -> None:
    """fake-gcs stores the damaged chunk (real GCS would refuse it: 400); the CRC32C in its
    reply is not the one sent, so the upload fails, retryable, and the file goes up again."""
    ckpt, files = _checkpoint(tmp_path)
    with _proxy(gcs_remote, Fault(method="POST", path_contains="upload_id", nth=2,
                                  how="flip")) as proxy:
        RemoteStore(gcs_remote.url, _through(gcs_remote, proxy), config=CONFIG).push(ckpt)
    assert len(proxy.fired) == 1, proxy.fired
    # The committed checkpoint holds the bytes of the local one (its digests verified).
    assert _pulled(gcs_remote, ckpt.name, tmp_path / "back") == files
    # The damaged file was declared twice: the damaged attempt, and the one sent again.
    damaged = next(rel for rel in files if rel in proxy.fired[0])
    assert _declared(proxy, damaged) == [f"crc32c={_crc32c(files[damaged])}"] * 2


def test_when_gcsfs_changed_how_it_uploads_one_warning_and_uploads_go_on_without_crc32c(
        gcs_remote: Remote, tmp_path: Path, monkeypatch: Any, caplog: Any) -> None:
    """The guard: gcsfs (not ckptsync) is changed so that its finalizing request no longer
    goes through ``GCSFile.gcsfs.call``; the push still succeeds, with one WARNING."""
    from gcsfs.core import GCSFile

    original = GCSFile._upload_chunk

    def bypassing(self: Any, final: bool = False) -> Any:
        hooked, self.gcsfs = self.gcsfs, self.fs  # gcsfs sends through another path
        try:
            return original(self, final=final)
        finally:
            self.gcsfs = hooked

    monkeypatch.setattr(GCSFile, "_upload_chunk", bypassing)
    ckpt, files = _checkpoint(tmp_path)
    with _proxy(gcs_remote) as proxy, caplog.at_level("WARNING", "ckptsync.remote.backends.gcs"):
        RemoteStore(gcs_remote.url, _through(gcs_remote, proxy), config=CONFIG).push(ckpt)
    warnings = [r for r in caplog.records if r.name == "ckptsync.remote.backends.gcs"]
    assert len(warnings) == 1 and "gcsfs" in warnings[0].getMessage(), warnings
    assert not any("x-goog-hash" in h for _, _, h in proxy.heads)
    monkeypatch.undo()
    assert _pulled(gcs_remote, ckpt.name, tmp_path / "back") == files
