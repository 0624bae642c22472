"""A save is never paced by the network (DESIGN.md, "Local side"): with an S3 remote whose link
is stalled, throttled, or whose trainer dies mid-upload, the local commit happens at the speed
of the disk, and the upload finishes after it, from the committed files.

Real SeaweedFS behind the fault proxy (tests/support/fault_proxy.py), which holds every request
(a stalled link) or paces upload bodies (a slow one).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptsync import Checkpointer
from ckptsync.config import TransferConfig
from ckptsync.local import LocalStore
from ckptsync.remote import RemoteStore
from tests.support.fault_proxy import FaultProxy
from tests.support.remotes import Remote

pytestmark = [pytest.mark.core, pytest.mark.serial]

MiB = 1024 * 1024
# 5 MiB parts (S3's minimum), two in flight: a ~20 MB state fills the window after two parts.
# A long read timeout: a held request is waited for, not given up on (the old code then
# waits in the save for as long as the link is stalled).
CFG = TransferConfig(max_workers=2, part_size=5 * MiB, parts_in_flight=2, retries=3,
                     backoff_initial=0.05, backoff_max=0.5, read_timeout=120.0)
LOCAL_COMMIT_BOUND_S = 60.0  # a bounded wait, not a timing claim: the save takes ~1 s here


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(1024, 5 * 1024)  # ~21 MB of float32


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def through(remote: Remote, proxy: FaultProxy) -> dict[str, Any]:
    opts = json.loads(json.dumps(remote.storage_options))
    opts["client_kwargs"]["endpoint_url"] = proxy.endpoint
    return opts


@pytest.fixture
def proxy_of(s3_remote: Remote) -> Iterator[Any]:
    proxies: list[FaultProxy] = []

    def make(rate: float | None = None) -> FaultProxy:
        host, port = s3_remote.extra["endpoint"].rsplit("/", 1)[1].split(":")
        p = FaultProxy(host, int(port), rate=rate, lifetime=300, timeout=150)
        proxies.append(p.__enter__())
        return p

    yield make
    for p in proxies:
        p.unstall()
        p.stop()


def direct(remote: Remote) -> RemoteStore:
    """The remote as a fresh reader sees it (not through the proxy)."""
    store = RemoteStore(remote.url, remote.storage_options, config=CFG)
    store.fs.invalidate_cache()
    return store


def nothing_remote(remote: Remote) -> bool:
    """No checkpoint, and no object at all under the checkpoint's names."""
    store = direct(remote)
    inside = [p for p in store.fs.find(store.root) if "/" in p[len(store.root) + 1:]]
    return store.newest_valid() is None and not inside


def no_multipart_left(remote: Remote) -> bool:
    uploads = direct(remote).fs.list_multipart_uploads(remote.extra["bucket"])
    return not [u for u in uploads if "run/" in u.get("Key", "")]


def restored_from_remote(remote: Remote, tmp_path: Path) -> torch.nn.Module:
    fresh = torch.nn.Linear(1024, 5 * 1024)
    with Checkpointer(tmp_path / "fresh", remote_store=direct(remote)) as c:
        info = c.restore(model=fresh)
    assert info is not None
    return fresh


def check_local(directory: Path, expected: torch.nn.Module) -> None:
    """The local checkpoint exists, verifies (sizes and digests) and restores bit-exact."""
    local = LocalStore(directory)
    [ckpt] = local.list()
    local.verify(ckpt, full=True)
    loaded = torch.nn.Linear(1024, 5 * 1024)
    loaded.load_state_dict(torch.load(ckpt.file("model.pt"), weights_only=True))
    assert same(loaded, expected)


def test_a_stalled_link_does_not_hold_the_local_commit(s3_remote: Remote, proxy_of: Any,
                                                      tmp_path: Path) -> None:
    proxy = proxy_of()
    m = model()
    store = RemoteStore(s3_remote.url, through(s3_remote, proxy), config=CFG)
    with Checkpointer(tmp_path / "a", remote_store=store) as ckpt:
        proxy.stall()  # every request to S3 is held from now on
        try:
            # Without the fix, the save waits in create_multipart_upload / the part window.
            manifest = ckpt.save(1, model=m).wait(timeout=LOCAL_COMMIT_BOUND_S)
            check_local(tmp_path / "a", m)
            assert proxy.body_bytes == 0  # the link really was stalled all along
            assert nothing_remote(s3_remote)
        finally:
            proxy.unstall()
        assert ckpt.wait(timeout=120)
    newest = direct(s3_remote).newest_valid()
    assert newest is not None and newest.name == manifest.name
    assert same(restored_from_remote(s3_remote, tmp_path), m)
    assert no_multipart_left(s3_remote)
    # The upload resumed where the stream stopped: no byte of the state went up twice.
    assert proxy.body_bytes < manifest.total_size + MiB


@pytest.mark.full
def test_a_slow_link_uploads_after_the_local_commit(s3_remote: Remote, proxy_of: Any,
                                                    tmp_path: Path) -> None:
    proxy = proxy_of(rate=2e6)  # 2 MB/s: the upload of ~21 MB takes ~10 s
    m = model()
    store = RemoteStore(s3_remote.url, through(s3_remote, proxy), config=CFG)
    with Checkpointer(tmp_path / "a", remote_store=store) as ckpt:
        manifest = ckpt.save(1, model=m).wait(timeout=LOCAL_COMMIT_BOUND_S)
        check_local(tmp_path / "a", m)
        assert nothing_remote(s3_remote)  # committed locally, the upload still under way
        assert ckpt.wait(timeout=120)
    # The remote holds exactly the manifest's bytes: a pull verifies every digest.
    got = direct(s3_remote).pull(None, LocalStore(tmp_path / "pulled"))
    assert got.name == manifest.name
    for entry in manifest.files:
        assert got.file(entry.path).read_bytes() == (tmp_path / "a" / manifest.name /
                                                     entry.path).read_bytes()
    assert no_multipart_left(s3_remote)
    assert proxy.body_bytes < manifest.total_size + MiB


TRAINER = """
import json, sys, time, torch
from ckptsync import Checkpointer
from ckptsync.config import TransferConfig
from ckptsync.remote import RemoteStore
url, opts, directory = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
cfg = TransferConfig(max_workers=2, part_size=5 * 2**20, parts_in_flight=2, read_timeout=120.0)
torch.manual_seed(0)
m = torch.nn.Linear(1024, 5 * 1024)
c = Checkpointer(directory, remote_store=RemoteStore(url, opts, config=cfg))
c.save(1, model=m).wait()
print("committed", flush=True)
time.sleep(600)
"""


@pytest.mark.full
def test_a_trainer_killed_mid_upload_leaves_a_local_checkpoint_to_upload_later(
        s3_remote: Remote, proxy_of: Any, tmp_path: Path) -> None:
    proxy = proxy_of(rate=1e6)  # ~21 s of upload: the kill comes mid-upload
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(
        [sys.executable, "-c", TRAINER, s3_remote.url, json.dumps(through(s3_remote, proxy)),
         str(tmp_path / "a")], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "committed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    m = model()
    check_local(tmp_path / "a", m)
    assert nothing_remote(s3_remote)  # parts may be there, in an uncommitted multipart upload
    # What the daemon (`ckptsync watch`) and `ckptsync push` do with a local checkpoint that
    # the remote lacks: push it.
    [ckpt] = LocalStore(tmp_path / "a").list()
    direct(s3_remote).push(ckpt)
    assert same(restored_from_remote(s3_remote, tmp_path), m)
