"""Faults: transient errors are retried, a missing bucket or wrong credentials fail fast, and
(S3, through a fault-injecting proxy) a reset in the middle of a body is survived.

Written once against ``store_remote`` (conformance/conftest.py): every backend runs it.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest

from ckptsync.config import TransferConfig
from ckptsync.errors import RemoteError
from ckptsync.local import LocalStore
from ckptsync.manifest import MANIFEST_NAME
from ckptsync.remote import RemoteStore
from tests.support.fault_proxy import Fault, FaultProxy
from tests.support.stores import (
    FAST,
    faulty,
    files_for,
    make_local,
    make_store,
    read_tree,
    secret_values,
)

pytestmark = pytest.mark.core


class TestFaults:
    """Faults, on every backend ``store_remote`` names."""

    def test_transient_faults_are_retried(self, store_remote: Any, tmp_path: Path) -> None:
        local = LocalStore(tmp_path / "a")
        ckpt = make_local(local, 7, files_for(7))
        fs = faulty(store_remote)
        fs.fail_on("open:wb", nth=1, exc=ConnectionError("injected: connection reset"))
        store = make_store(store_remote, fs=fs)
        store.push(ckpt)
        fs.fail_on("open:rb", nth=1, exc=TimeoutError("injected: read timed out"))
        got = store.pull(None, LocalStore(tmp_path / "b"))
        assert read_tree(got.path) == read_tree(ckpt.path)
        assert [m.name for m in store.list()] == [ckpt.name]

    def test_missing_bucket_fails_fast(self, store_remote: Any) -> None:
        if store_remote.missing_url is None:
            pytest.skip("this backend has no buckets")
        store = RemoteStore(store_remote.missing_url, store_remote.storage_options,
                            config=TransferConfig(retries=5, backoff_initial=30.0))
        start = time.monotonic()
        with pytest.raises(RemoteError, match="bucket") as ei:
            store.newest_valid()
        assert not ei.value.retryable and time.monotonic() - start < 20

    def test_wrong_credentials_fail_fast_without_secrets(self, store_remote: Any,
                                                         tmp_path: Path) -> None:
        if store_remote.wrong_credentials is None:
            pytest.skip("this backend does not check credentials")
        ckpt = make_local(LocalStore(tmp_path / "a"), 1, {"w.bin": b"abc"})
        start = time.monotonic()
        with pytest.raises(RemoteError) as ei:
            store = RemoteStore(store_remote.url, store_remote.wrong_credentials,
                                config=TransferConfig(retries=5, backoff_initial=30.0))
            store.push(ckpt)
        assert not ei.value.retryable and time.monotonic() - start < 30
        assert re.search("access denied|credentials", str(ei.value))
        for secret in secret_values(store_remote.wrong_credentials):
            assert secret not in str(ei.value)


# --------------------------------------------------------------------------- mid-body faults

MIB = 1024 * 1024


def _through(remote: Any, proxy: FaultProxy) -> dict[str, Any]:
    """``remote``'s storage options with the endpoint pointing at ``proxy``."""
    opts = json.loads(json.dumps(remote.storage_options))
    opts["client_kwargs"]["endpoint_url"] = proxy.endpoint
    return opts


def _proxy(remote: Any, *faults: Fault) -> FaultProxy:
    host, port = remote.extra["endpoint"].rsplit("/", 1)[1].split(":")
    return FaultProxy(host, int(port), plan=faults, lifetime=120)


# A ranged download (parallel ranges through botocore), a streamed one (s3fs's file object,
# which reads in ranges too) and a whole-object GET (the manifest): each reset mid-body once.
MID_BODY = {
    "ranged": (TransferConfig(max_workers=2, block_size=5 * MIB, ranged_min_size=5 * MIB,
                              retries=3, backoff_initial=0.0, backoff_max=0.0),
               Fault(path_contains="/w.bin", ranged=True, nth=2)),
    "streamed": (TransferConfig(max_workers=2, block_size=5 * MIB, retries=3,
                                backoff_initial=0.0, backoff_max=0.0),
                 Fault(path_contains="/w.bin", ranged=True, nth=1)),
    # Manifests are read with a bounded (ranged) GET: at most the size bound + 1 byte.
    "manifest": (FAST, Fault(path_contains=f"/{MANIFEST_NAME}", ranged=True, nth=1)),
}


@pytest.mark.parametrize("kind", list(MID_BODY))
def test_pull_survives_a_reset_mid_body(s3_remote: Any, tmp_path: Path, kind: str) -> None:
    config, fault = MID_BODY[kind]
    body = os.urandom(12 * MIB + 12345)
    ckpt = make_local(LocalStore(tmp_path / "a"), 3, {"w.bin": body, "small.bin": b"x" * 100})
    make_store(s3_remote).push(ckpt)
    with _proxy(s3_remote, fault) as proxy:
        store = RemoteStore(s3_remote.url, _through(s3_remote, proxy), config=config)
        got = store.pull(None, LocalStore(tmp_path / "b"))
    assert len(proxy.fired) == 1, proxy.requests
    assert got.name == ckpt.name
    assert (got.path / "w.bin").read_bytes() == body
    assert (got.path / "small.bin").read_bytes() == b"x" * 100


def test_verify_survives_a_reset_mid_body(s3_remote: Any, tmp_path: Path) -> None:
    body = os.urandom(11 * MIB)
    ckpt = make_local(LocalStore(tmp_path / "a"), 3, {"w.bin": body})
    make_store(s3_remote).push(ckpt)
    config = MID_BODY["streamed"][0]
    with _proxy(s3_remote, Fault(path_contains="/w.bin", ranged=True, nth=1)) as proxy:
        store = RemoteStore(s3_remote.url, _through(s3_remote, proxy), config=config)
        assert store.verify(ckpt.name).name == ckpt.name
    assert len(proxy.fired) == 1, proxy.requests


@pytest.mark.parametrize("kind", ["ranged", "streamed"])
def test_checkpointer_restore_survives_a_reset_mid_body(s3_remote: Any, tmp_path: Path,
                                                        kind: str) -> None:
    import torch

    from ckptsync import Checkpointer

    torch.manual_seed(0)
    model = torch.nn.Linear(1024, 2048)  # model.pt is 8 MiB: two ranges of 5 MiB
    with Checkpointer(tmp_path / "a", remote_store=make_store(s3_remote)) as c:
        c.save(5, model=model)
    config, fault = MID_BODY[kind]
    fresh = torch.nn.Linear(1024, 2048)
    with _proxy(s3_remote, Fault(path_contains="/model.pt", ranged=True, nth=fault.nth)) as proxy:
        store = RemoteStore(s3_remote.url, _through(s3_remote, proxy), config=config)
        with Checkpointer(tmp_path / "b", remote_store=store) as c:
            info = c.restore(model=fresh)
    assert len(proxy.fired) == 1, proxy.requests
    assert info is not None and info.step == 5
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
