"""``gc`` collects the temporary files a crashed writer leaves, past the grace period: those of
``LATEST`` and of the root marker beside them, of a manifest inside a checkpoint, and the
part files of an upload, whatever name :func:`ckptsync.atomic.temp_name` gave them; never a
fresh one (a writer may be using it), never one outside ckptsync's names, and never a file of
a committed checkpoint. Written once against ``store_remote``: a local directory, a mount and
the object stores alike (the temporaries are planted; their age is ``gc``'s ``now``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from ckptsync.atomic import temp_name
from ckptsync.local import LocalStore
from ckptsync.manifest import LATEST_NAME, MANIFEST_NAME
from ckptsync.ownership import ROOT_MARKER
from tests.support.remotes import backend_params
from tests.support.stores import make_local, make_store, put, rpath

pytestmark = pytest.mark.core

HOUR = 3600.0


def _exists(remote: Any, path: str) -> bool:
    fs = remote.fs()
    fs.invalidate_cache()
    return bool(fs.exists(path))


def test_gc_collects_stale_temporaries_of_latest_manifests_and_uploads(
        store_remote: Any, tmp_path: Path) -> None:
    store = make_store(store_remote)
    committed = store.push(make_local(LocalStore(tmp_path / "src"), 3,
                                      {"model.pt": os.urandom(3000)}))
    stale = {
        f"temp:{n}": rpath(store_remote, n) for n in (temp_name(LATEST_NAME),
                                                      temp_name(ROOT_MARKER))
    } | {
        f"temp:{committed.name}/{n}": rpath(store_remote, committed.name, n)
        for n in (temp_name(MANIFEST_NAME),)
    } | {
        f"part:{committed.name}/{n}": rpath(store_remote, committed.name, n)
        for n in (temp_name("model.pt", "part"),)
    }
    kept = [rpath(store_remote, "notes", temp_name(LATEST_NAME)),  # not ckptsync's
            rpath(store_remote, temp_name("README.md"))]
    for path in [*stale.values(), *kept]:
        put(store_remote, path, b"left by a writer that crashed")

    assert store.gc(HOUR) == []  # younger than the grace period: a writer may be using them
    removed = store.gc(HOUR, now=time.time() + 2 * HOUR)

    assert sorted(removed) == sorted(stale)
    assert not any(_exists(store_remote, p) for p in stale.values())
    assert all(_exists(store_remote, p) for p in kept)
    store.verify(committed.name, full=True)
    again = make_store(store_remote)
    assert again.read_latest() == committed.name
    assert again.has_marker()


def test_gc_dry_run_names_stale_temporaries_and_removes_nothing(
        store_remote: Any, tmp_path: Path) -> None:
    store = make_store(store_remote)
    committed = store.push(make_local(LocalStore(tmp_path / "src"), 4, {"w.bin": b"w" * 99}))
    path = rpath(store_remote, committed.name, temp_name(MANIFEST_NAME))
    put(store_remote, path, b"{")

    assert store.gc(HOUR, dry_run=True, now=time.time() + 2 * HOUR) == [
        f"temp:{committed.name}/{os.path.basename(path)}"]
    assert _exists(store_remote, path)


@pytest.mark.parametrize("backend", backend_params(["file", "mounted_drive"]))
def test_gc_collects_a_latest_temporary_by_its_own_age_on_a_directory(
        backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    remote = request.getfixturevalue(f"{backend}_remote")
    store = make_store(remote)
    store.push(make_local(LocalStore(tmp_path / "src"), 5, {"w.bin": b"w" * 10}))
    old, fresh = (rpath(remote, temp_name(LATEST_NAME)) for _ in range(2))
    for p in (old, fresh):
        put(remote, p, b"{}")
    two_hours_ago = time.time() - 2 * HOUR
    os.utime(old, (two_hours_ago, two_hours_ago))

    assert store.gc(HOUR) == [f"temp:{Path(old).name}"]
    assert not Path(old).exists() and Path(fresh).exists()
