"""A fresh machine resumes a sharded (DCP) checkpoint from the remote, each rank pulling only
the files its own load reads (tests/support/sharded_worker.py, FSDP2 on CPU with gloo).

Saved by 2 ranks (replicated state in rank 0's file), restored on 2, 4 and 1 ranks, each
rank on a simulated machine of its own (an empty directory of its own), and on 4 ranks
sharing one: bit-exact, and every remote path a rank reached is recorded (its remote goes
through a recording FaultFS): a rank whose shards are all in rank 0's file never reaches
rank 1's, and nothing fetched stays. A damaged shard in the newest remote checkpoint, which
only one rank reads, sends every rank to the previous checkpoint together, with the warning.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptsync.local import LocalStore
from ckptsync.remote import RemoteStore
from tests.e2e.test_sharded import _ok, _ranks, _reports
from tests.support.helpers import assert_tree_equal, staging_dirs
from tests.support.remotes import Remote

pytestmark = [pytest.mark.usefixtures("no_process_leak"), pytest.mark.full]

RANK1_FILE = "__1_0.distcp"
FETCH_DIR = ".ckptsync-fetch"  # where a rank fetches into, in its directory


def _env(remote: Remote) -> dict[str, str]:
    return {"CKPTSYNC_STORAGE_OPTIONS": json.dumps(remote.storage_options)}


def _restore(tmp_path: Path, remote: Remote, world: int, label: str, *, machines: bool
             ) -> list[dict[str, Any]]:
    """``world`` ranks restore into empty directories (``machines``: each rank one of its
    own, as on a machine of its own; else one shared); bit-exact against the save."""
    fresh, out = tmp_path / f"fresh-{label}", tmp_path / f"out-{label}"
    mode = "nodes-restore" if machines else "restore"
    _ok(_ranks(world, mode, fresh, out, remote.url, **_env(remote)))
    assert_tree_equal(torch.load(out / "restored.pt", weights_only=True),
                      torch.load(tmp_path / "save" / "expected.pt", weights_only=True))
    # Nothing fetched stays: no checkpoint (complete or partial), no fetch directory.
    for d in [fresh / f"node{r}" for r in range(world)] if machines else [fresh]:
        assert LocalStore(d).list() == [] and staging_dirs(d) == []
        assert not (d / FETCH_DIR).exists(), list((d / FETCH_DIR).rglob("*"))
    return _reports(out, world)


def _per_rank_pulls(tmp_path: Path, remote: Remote, worlds: tuple[int, ...]) -> None:
    _ok(_ranks(2, "save", tmp_path / "ckpts", tmp_path / "save", remote.url, **_env(remote)))
    (m,) = RemoteStore(remote.url, remote.storage_options).list()
    assert {f.path for f in m.files} == {".metadata", "__0_0.distcp", RANK1_FILE, "rng.pt"}
    before = _reports(tmp_path / "save", 2)
    for world in worlds:
        reports = _restore(tmp_path, remote, world, str(world), machines=True)
        assert {r["name"] for r in reports} == {m.name}
        seen = [set(r["remote_files"]) for r in reports]
        assert all(".metadata" in files for files in seen), seen
        assert "__0_0.distcp" in seen[0], seen
        if world == 2:  # rank 0's shards and the replicated state are all in rank 0's file
            assert RANK1_FILE not in seen[0] and RANK1_FILE in seen[1], seen
            assert [r["losses"] for r in reports] == [r["losses"] for r in before]
            assert [r["draws"] for r in reports] == [r["draws"] for r in before]
        if world == 4:  # rank 0 of 4's rows of every layer are among rank 0 of 2's
            assert RANK1_FILE not in seen[0] and RANK1_FILE in seen[3], seen
        if world == 1:  # one rank reads everything
            assert RANK1_FILE in seen[0]
    if 4 in worlds:  # four ranks of one machine, one directory: they share what they fetch
        _restore(tmp_path, remote, 4, "shared", machines=False)


def test_fresh_machine_pulls_only_the_files_each_rank_reads(tmp_path: Path,
                                                            file_remote: Remote) -> None:
    _per_rank_pulls(tmp_path, file_remote, (2, 4, 1))


def test_fresh_machine_pulls_only_the_files_each_rank_reads_s3(tmp_path: Path,
                                                               s3_remote: Remote) -> None:
    _per_rank_pulls(tmp_path, s3_remote, (2,))


def test_damaged_shard_in_newest_remote_checkpoint_every_rank_falls_back(
        tmp_path: Path, file_remote: Remote) -> None:
    env = _env(file_remote)
    _ok(_ranks(2, "save", tmp_path / "first", tmp_path / "save", file_remote.url, **env))
    # The second save is the same run's (its directory's, which pushed the first): another
    # directory would be a second run in one prefix, which the remote refuses.
    _ok(_ranks(2, "save", tmp_path / "first", tmp_path / "save2", file_remote.url, **env))
    store = RemoteStore(file_remote.url, file_remote.storage_options)
    newest, older = sorted((m.name for m in store.list()), reverse=True)
    fs, path = file_remote.fs(), f"{file_remote.path}/{newest}/{RANK1_FILE}"
    data = bytearray(fs.cat_file(path))
    data[len(data) // 2] ^= 0x01  # same size: only its digest tells
    fs.pipe_file(path, bytes(data))
    out = tmp_path / "out"
    results = _ranks(2, "restore", tmp_path / "fresh", out, file_remote.url, **env)
    _ok(results)
    assert {r["name"] for r in _reports(out, 2)} == {older}
    assert_tree_equal(torch.load(out / "restored.pt", weights_only=True),
                      torch.load(tmp_path / "save" / "expected.pt", weights_only=True))
    for rank, (_, text) in enumerate(results):  # every rank says which and why
        assert f"checkpoint {newest} cannot be restored here" in text, (rank, text[-3000:])
        assert RANK1_FILE in text and "digest" in text, (rank, text[-3000:])
