"""A GCS upload whose finalizing reply is lost (DESIGN.md: an ambiguous
outcome is resolved by reading the remote, never assumed either way).

gcsfs writes every object as a resumable upload. When the reply to the request that
finalizes it is lost after fake-gcs-server made the object (the fault proxy relays the
request, throws the reply away and resets the connection), gcsfs sends that request again and
the server, whose upload session is closed, answers 404. The push reads the object back: it
holds the bytes sent (size and CRC32C), so the file is uploaded and the checkpoint committed,
from the command line as from the API.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

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


def _checkpoint(tmp_path: Path, files: dict[str, bytes]) -> Any:
    store = LocalStore(tmp_path / "local")
    staging = store.staging(make_name(7))
    for rel, data in files.items():
        staging.write_file(rel, data)
    return staging.commit(Manifest.new(step=7, files=staging.entries, name=staging.name))


def _proxy(remote: Remote, fault: Fault) -> FaultProxy:
    host, port = remote.extra["endpoint"].rsplit("/", 1)[1].split(":")
    return FaultProxy(host, int(port), plan=[fault], lifetime=120)


def _through(remote: Remote, proxy: FaultProxy) -> dict[str, Any]:
    opts: dict[str, Any] = json.loads(json.dumps(remote.storage_options))
    opts["endpoint_url"] = proxy.endpoint
    return opts


def _finalizing(proxy: FaultProxy, rel: str) -> list[str]:
    """The finalizing requests (Content-Range with the total size) sent for ``rel``."""
    return [h.get("content-range", "") for m, t, h in proxy.heads
            if m == "POST" and "upload_id" in t and f"/{rel}&" in t
            and not h.get("content-range", "/*").endswith("/*")]


@pytest.mark.parametrize("rel, size", [("small.bin", 300_000), ("big.bin", 11 * MiB + 17)])
def test_a_lost_final_reply_is_read_back_and_the_push_commits(
        gcs_remote: Remote, tmp_path: Path, rel: str, size: int) -> None:
    files = {rel: os.urandom(size)}
    ckpt = _checkpoint(tmp_path, files)
    # The last request of the upload: its Content-Range ends with the total size.
    chunks = -(-size // CONFIG.block_size)
    fault = Fault(method="POST", path_contains="upload_id", nth=chunks, how="drop")
    with _proxy(gcs_remote, fault) as proxy:
        m = RemoteStore(gcs_remote.url, _through(gcs_remote, proxy), config=CONFIG).push(ckpt)
        assert len(proxy.fired) == 1 and "dropped after the server acted" in proxy.fired[0], (
            proxy.fired)
        # gcsfs sent the finalizing request again (the server no longer knew the upload);
        # the file was not uploaded a second time.
        assert len(_finalizing(proxy, rel)) == 2, proxy.heads
        initiated = [t for m_, t, _ in proxy.heads
                     if m_ == "POST" and "uploadType=resumable" in t and "upload_id" not in t]
        assert len(initiated) == 1, initiated
    assert m.name == ckpt.name
    back = RemoteStore(gcs_remote.url, gcs_remote.storage_options).pull(
        ckpt.name, LocalStore(tmp_path / "back"))
    assert back.file(rel).read_bytes() == files[rel]


def test_the_cli_push_succeeds_when_the_final_reply_is_lost(
        gcs_remote: Remote, tmp_path: Path) -> None:
    from tests.support.cli import cli

    files = {"model.bin": os.urandom(300_000)}
    ckpt = _checkpoint(tmp_path, files)
    fault = Fault(method="POST", path_contains="upload_id", how="drop")
    with _proxy(gcs_remote, fault) as proxy:
        done = cli("push", str(tmp_path / "local"), gcs_remote.url, "--no-progress",
                   CKPTSYNC_STORAGE_OPTIONS=json.dumps(_through(gcs_remote, proxy)))
        assert len(proxy.fired) == 1, proxy.fired
    assert done.returncode == 0, done.stderr
    (listed,) = RemoteStore(gcs_remote.url, gcs_remote.storage_options).list()
    assert listed.name == ckpt.name
