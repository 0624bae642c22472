"""A manifest read that comes back short is read again, as a data read is, before its
checkpoint counts as invalid: one bad read never makes a restore pass over the newest valid
checkpoint, nor makes a named pull fail.

The short body is FaultFS's ``damage_on`` (the transport did not notice that the body was cut);
the same on the wire, a 416 answered once by a proxy in front of S3, is
tests/integration/test_manifest_read_416.py. Written once against ``store_remote``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from ckptsync.local import LocalCheckpoint, LocalStore
from ckptsync.manifest import MANIFEST_NAME
from ckptsync.remote import RemoteStore
from tests.support.faults import FaultFS
from tests.support.stores import make_local, make_store, read_tree

pytestmark = pytest.mark.core


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _two_pushed(remote: Any, tmp_path: Path) -> tuple[LocalCheckpoint, dict[str, bytes]]:
    """Steps 1 and 2 pushed; step 2 (the newest) and its files."""
    local = LocalStore(tmp_path / "src")
    make_store(remote).push(make_local(local, 1, {"model.pt": os.urandom(5000)}))
    files = {"model.pt": os.urandom(7000), "optim/state.pt": os.urandom(900)}
    newest = make_local(local, 2, files)
    make_store(remote).push(newest)
    return newest, files


def _store_cutting_one_manifest_read(remote: Any, name: str) -> tuple[RemoteStore, FaultFS]:
    fs = FaultFS(remote.fs())
    fs.damage_on("cat_file", _half, suffix=f"{name}/{MANIFEST_NAME}")
    return make_store(remote, fs=fs), fs


def test_restore_after_one_short_manifest_read_is_of_the_newest_checkpoint(
        store_remote: Any, tmp_path: Path) -> None:
    newest, files = _two_pushed(store_remote, tmp_path)
    store, fs = _store_cutting_one_manifest_read(store_remote, newest.name)
    skipped: list[tuple[str, str]] = []

    got = store.pull(None, LocalStore(tmp_path / "dst"), skipped=skipped)

    assert got.name == newest.name and skipped == []
    assert read_tree(got.path) == files
    assert fs.count("cat_file", f"{newest.name}/{MANIFEST_NAME}") >= 2  # it was read again


def test_a_named_pull_after_one_short_manifest_read_succeeds(store_remote: Any,
                                                            tmp_path: Path) -> None:
    newest, files = _two_pushed(store_remote, tmp_path)
    store, _ = _store_cutting_one_manifest_read(store_remote, newest.name)

    got = store.pull(newest.name, LocalStore(tmp_path / "dst"))

    assert read_tree(got.path) == files


def test_listing_after_one_short_manifest_read_lists_every_checkpoint(
        store_remote: Any, tmp_path: Path) -> None:
    newest, _ = _two_pushed(store_remote, tmp_path)
    store, _ = _store_cutting_one_manifest_read(store_remote, newest.name)

    assert [m.step for m in store.list()] == [1, 2]
    store, _ = _store_cutting_one_manifest_read(store_remote, newest.name)
    assert [(e.manifest.step if e.manifest else None, e.status) for e in store.scan()] == [
        (1, "valid"), (2, "valid")]
