"""``RemoteStore.fetch_files``: some of a checkpoint's files, verified while they stream, into
a directory that is not a checkpoint (what a rank of a sharded restore reads from).

A file already there is not fetched again (another rank on the host put it there, verified);
a damaged remote file is never renamed into place and leaves no temporary behind; an
encrypted checkpoint's files arrive decrypted.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ckptsync.crypto import KeyRing
from ckptsync.errors import CorruptCheckpointError
from ckptsync.local import LocalStore
from ckptsync.remote import RemoteStore
from tests.support.faults import FaultFS
from tests.support.remotes import Remote
from tests.support.stores import FAST, files_for, make_local, overwrite, rpath

pytestmark = pytest.mark.core


def _pushed(tmp_path: Path, remote: Remote, keys: KeyRing | None = None
            ) -> tuple[RemoteStore, FaultFS, str]:
    local = LocalStore(tmp_path / "local")
    ckpt = make_local(local, 1, files_for(1))
    fs = FaultFS(remote.fs())
    store = RemoteStore(remote.url, remote.storage_options, fs=fs, config=FAST, keys=keys)
    store.push(ckpt)
    return store, fs, ckpt.name


def _tree(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in d.rglob("*") if p.is_file()}


@pytest.mark.parametrize("encrypted", [False, True])
def test_fetches_only_the_files_named_once_each(tmp_path: Path, file_remote: Remote,
                                                encrypted: bool) -> None:
    keys = KeyRing((os.urandom(32),)) if encrypted else None
    store, fs, name = _pushed(tmp_path, file_remote, keys)
    m = store.read_manifest(name)
    assert m is not None and all((f.encryption is not None) == encrypted for f in m.files)
    d = tmp_path / "fetch" / name
    got = store.fetch_files(m, ["model.pt", "model.pt"], d)
    assert [f.path for f in got] == ["model.pt"]
    local = LocalStore(tmp_path / "local").list()[0]
    assert _tree(d) == {"model.pt": local.file("model.pt").read_bytes()}  # plaintext
    assert not any(p.endswith("state.pt") for _, p in fs.calls)  # never asked for
    before = len(fs.calls)
    assert store.fetch_files(m, ["model.pt"], d) == []  # there, verified: not again
    assert len(fs.calls) == before
    assert [f.path for f in store.fetch_files(m, ["model.pt", "optim/state.pt"], d)] == [
        "optim/state.pt"]
    assert sorted(_tree(d)) == ["model.pt", "optim/state.pt"]


def test_damaged_file_is_never_put_in_place(tmp_path: Path, file_remote: Remote) -> None:
    store, _, name = _pushed(tmp_path, file_remote)
    m = store.read_manifest(name)
    assert m is not None
    path = rpath(file_remote, name, "model.pt")
    data = bytearray(file_remote.fs().cat_file(path))
    data[1000] ^= 0xFF
    overwrite(file_remote, path, bytes(data))
    d = tmp_path / "fetch" / name
    with pytest.raises(CorruptCheckpointError, match=r"model\.pt.*digest"):
        store.fetch_files(m, ["optim/state.pt", "model.pt"], d)
    assert "model.pt" not in _tree(d) and not any(p.startswith(".") for p in _tree(d)), \
        _tree(d).keys()
    with pytest.raises(CorruptCheckpointError, match="not listed in its manifest"):
        store.fetch_files(m, ["__9_0.distcp"], d)
