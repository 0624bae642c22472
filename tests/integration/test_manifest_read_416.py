"""A manifest read answered 416 "Range Not Satisfiable" once is read again, on the wire: a
proxy in front of S3 answers the ranged GET of the newest checkpoint's manifest with 416, and
``ckptsync pull`` still restores that checkpoint and exits 0, by name and as the newest valid
one (before, the 416 read as an empty manifest: ``pull --name`` exited 1 and a plain pull
fell back to the older checkpoint).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from ckptsync.local import LocalStore
from ckptsync.manifest import MANIFEST_NAME
from ckptsync.remote import RemoteStore
from tests.support.cli import run_cli
from tests.support.fault_proxy import Fault, FaultProxy
from tests.support.remotes import Remote
from tests.support.stores import make_local, read_tree

pytestmark = pytest.mark.core


def _options(remote: Remote, proxy: FaultProxy) -> str:
    opts: dict[str, Any] = json.loads(json.dumps(remote.storage_options))
    opts["client_kwargs"]["endpoint_url"] = proxy.endpoint
    return json.dumps(opts)


def _two_pushed(remote: Remote, tmp_path: Path) -> tuple[Any, dict[str, bytes]]:
    local = LocalStore(tmp_path / "src")
    store = RemoteStore(remote.url, remote.storage_options)
    store.push(make_local(local, 1, {"model.pt": os.urandom(4000)}))
    files = {"model.pt": os.urandom(6000), "optim.pt": os.urandom(700)}
    newest = make_local(local, 2, files)
    store.push(newest)
    return newest, files


def _proxy(remote: Remote, name: str) -> FaultProxy:
    host, port = remote.extra["endpoint"].rsplit("/", 1)[1].split(":")
    once = Fault(method="GET", path_contains=f"/{name}/{MANIFEST_NAME}", how="416")
    return FaultProxy(host, int(port), plan=[once], lifetime=120)


def test_pull_by_name_exits_0_after_a_416_on_its_manifest(s3_remote: Remote,
                                                         tmp_path: Path) -> None:
    newest, files = _two_pushed(s3_remote, tmp_path)

    with _proxy(s3_remote, newest.name) as proxy:
        done = run_cli("pull", s3_remote.url, str(tmp_path / "dst"), "--name", newest.name,
                       "--no-progress", CKPTSYNC_STORAGE_OPTIONS=_options(s3_remote, proxy))
        fired = list(proxy.fired)

    assert fired and "416" in fired[0], fired  # the manifest read was answered 416
    assert done.returncode == 0, done.stderr
    (back,) = LocalStore(tmp_path / "dst").list()
    assert back.name == newest.name
    assert read_tree(back.path) == files


def test_restore_of_the_newest_after_a_416_on_its_manifest(s3_remote: Remote,
                                                           tmp_path: Path) -> None:
    newest, files = _two_pushed(s3_remote, tmp_path)
    skipped: list[tuple[str, str]] = []

    with _proxy(s3_remote, newest.name) as proxy:
        options = json.loads(_options(s3_remote, proxy))
        back = RemoteStore(s3_remote.url, options).pull(None, LocalStore(tmp_path / "dst"),
                                                        skipped=skipped)
        fired = list(proxy.fired)

    assert fired and "416" in fired[0], fired
    assert back.name == newest.name and skipped == []
    assert read_tree(back.path) == files
