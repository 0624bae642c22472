"""The requests a save costs on S3 (fixed costs of small, frequent
checkpoints). On a cloud link every sequential request is a round trip of tens of ms, paid by
every save whatever its size, so a save's upload makes only the requests the commit protocol
needs: the data, one listing that finds every file with its size, the create-only manifest,
a second listing after the manifest (no file of a committed checkpoint was collected
meanwhile), and the ``LATEST`` hint. It does not look for a committed copy of a name it just
made, copies unchanged files from the checkpoint it committed last without reading a
manifest, and writes ``LATEST`` without reading it after its own previous commit (a hint:
readers list the prefix anyway, so a rare step back costs nothing).

SeaweedFS behind a fault proxy that records every request (and answers them all).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptsync import Checkpointer
from ckptsync.remote import RemoteStore
from tests.support.fault_proxy import FaultProxy
from tests.support.remotes import Remote

pytestmark = pytest.mark.core


def _proxy(remote: Remote) -> FaultProxy:
    host, port = remote.extra["endpoint"].rsplit("/", 1)[1].split(":")
    return FaultProxy(host, int(port), lifetime=120)


def _through(remote: Remote, proxy: FaultProxy) -> dict[str, Any]:
    opts: dict[str, Any] = json.loads(json.dumps(remote.storage_options))
    opts["client_kwargs"]["endpoint_url"] = proxy.endpoint
    return opts


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(50_000, generator=g), "b": torch.randn(300, generator=g)}


def _save(c: Checkpointer, proxy: FaultProxy, step: int, objects: dict[str, Any]
          ) -> list[tuple[str, str, dict[str, str]]]:
    before = len(proxy.heads)
    c.save(step=step, **objects)
    assert c.wait(60)
    return proxy.heads[before:]


def test_a_save_reads_no_manifest_and_makes_five_requests(seaweedfs_remote: Remote,
                                                         tmp_path: Path) -> None:
    with _proxy(seaweedfs_remote) as proxy, Checkpointer(
            tmp_path / "ckpts", remote=seaweedfs_remote.url, rng=False,
            storage_options=_through(seaweedfs_remote, proxy)) as c:
        _save(c, proxy, 1, {"state": _state(1)})
        sent = _save(c, proxy, 2, {"state": _state(2)})
    lines = [f"{m} {t}" for m, t, _ in sent]
    assert not [x for x in lines if x.startswith("GET") and "ckptsync.json" in x], lines
    assert len(sent) == 5, lines  # data, listing, manifest, listing again, LATEST
    assert not [x for x in lines if x.startswith("GET") and x.endswith("/LATEST")], lines
    assert RemoteStore(seaweedfs_remote.url, seaweedfs_remote.storage_options).list()[-1].step == 2
    with Checkpointer(tmp_path / "fresh", remote=seaweedfs_remote.url, rng=False,
                      storage_options=seaweedfs_remote.storage_options) as c2:
        info = c2.restore(state={})
    assert info is not None and info.step == 2
    got = info.state["state"]
    assert all(torch.equal(got[k], v) for k, v in _state(2).items())


def test_unchanged_files_are_copied_from_the_last_commit_without_reading_it(
        seaweedfs_remote: Remote, tmp_path: Path) -> None:
    model = torch.nn.Linear(200, 200)
    with _proxy(seaweedfs_remote) as proxy, Checkpointer(
            tmp_path / "ckpts", remote=seaweedfs_remote.url, rng=False,
            storage_options=_through(seaweedfs_remote, proxy)) as c:
        _save(c, proxy, 1, {"model": model, "moving": _state(1)})
        sent = _save(c, proxy, 2, {"model": model, "moving": _state(2)})
    copied = [t for m, t, h in sent if m == "PUT" and "x-amz-copy-source" in h]
    assert [t.rsplit("/", 1)[1] for t in copied] == ["model.pt"], [(m, t) for m, t, _ in sent]
    assert not [t for m, t, _ in sent if m == "GET" and "ckptsync.json" in t]
    fresh = torch.nn.Linear(200, 200)
    with Checkpointer(tmp_path / "fresh", remote=seaweedfs_remote.url, rng=False,
                      storage_options=seaweedfs_remote.storage_options) as c2:
        info = c2.restore(model=fresh, moving={})
    assert info is not None and info.step == 2
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                  model.state_dict().values(), strict=True))


def test_a_last_commit_deleted_since_means_uploading_not_losing_the_save(
        seaweedfs_remote: Remote, tmp_path: Path) -> None:
    """Another process's gc deleted the checkpoint the copy would come from: the copy fails,
    the file is uploaded instead, and the save is committed whole."""
    model = torch.nn.Linear(200, 200)
    store = RemoteStore(seaweedfs_remote.url, seaweedfs_remote.storage_options)
    with _proxy(seaweedfs_remote) as proxy, Checkpointer(
            tmp_path / "ckpts", remote=seaweedfs_remote.url, rng=False,
            storage_options=_through(seaweedfs_remote, proxy)) as c:
        _save(c, proxy, 1, {"model": model})
        (first,) = store.list()
        store.delete(first.name)
        sent = _save(c, proxy, 2, {"model": model})
    uploads = [t for m, t, h in sent if m == "PUT" and "model.pt" in t
               and "x-amz-copy-source" not in h]
    assert uploads, [(m, t) for m, t, _ in sent]
    assert [e.step for e in store.list()] == [2]
    fresh = torch.nn.Linear(200, 200)
    with Checkpointer(tmp_path / "fresh", remote=seaweedfs_remote.url, rng=False,
                      storage_options=seaweedfs_remote.storage_options) as c2:
        assert c2.restore(model=fresh) is not None
    assert torch.equal(fresh.weight, model.weight) and torch.equal(fresh.bias, model.bias)
