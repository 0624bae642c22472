"""What a bucket writer, a skewed clock or a second run can do to a restore.

Each test is one attack or mishap, tried as an attacker or an unlucky user would, on the
backends where it matters: ``file://`` and S3 (SeaweedFS) have a create-only write,
``memory://`` stands for the backends that do not (Drive). An attacker here writes objects
straight into the bucket (``put``), as anyone with write access can.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from ckptsync.cli import main
from ckptsync.crypto import KeyRing
from ckptsync.errors import (
    ConfigError,
    CorruptCheckpointError,
    EncryptionKeyError,
    RemoteError,
    UnsupportedFormatError,
)
from ckptsync.local import LocalCheckpoint, LocalStore
from ckptsync.manifest import MAC_FIELD, MANIFEST_NAME, Manifest, make_name
from ckptsync.ownership import RunFile
from ckptsync.parts import make_parts, part_of
from ckptsync.remote import RemoteStore
from ckptsync.retention import RetentionPolicy
from tests.support.faults import FaultFS
from tests.support.formats import seal
from tests.support.stores import FAST, make_local, make_node_parts, put, read_tree, rpath

pytestmark = pytest.mark.full

A = KeyRing((os.urandom(32),))
B = KeyRing((os.urandom(32),))


def store_of(remote: Any, keys: KeyRing | None = None, *, run_dir: Path | None = None,
             fs: Any = None, **kw: Any) -> RemoteStore:
    return RemoteStore(remote.url, remote.storage_options, config=FAST, keys=keys, fs=fs,
                       run_file=RunFile(run_dir) if run_dir is not None else None, **kw)


def files_for(step: int) -> dict[str, bytes]:
    return {"model.pt": os.urandom(5000) + bytes([step % 256]), "rng.pt": os.urandom(100)}


def plant(remote: Any, ckpt: LocalCheckpoint, manifest: Manifest | None = None,
          name: str | None = None) -> str:
    """Write ``ckpt``'s files and (its or another) manifest straight into the bucket, under
    ``name``: what whoever can write to the bucket can do without ckptsync."""
    name = name or ckpt.name
    for f in ckpt.manifest.files:
        put(remote, rpath(remote, name, f.path), ckpt.file(f.path).read_bytes())
    m = manifest or ckpt.manifest
    put(remote, rpath(remote, name, MANIFEST_NAME), m.to_json())
    return name


def rewrite_manifest(remote: Any, name: str, edit: Any) -> None:
    """Edit a committed manifest and give it a matching self-digest (a careful forger)."""
    fs = remote.fs()
    path = rpath(remote, name, MANIFEST_NAME)
    obj = json.loads(fs.cat_file(path))
    edit(obj)
    fs.rm_file(path)
    put(remote, path, json.dumps(seal(obj)).encode())


# --------------------------------------------------------------------------- 1. a policy
@pytest.mark.parametrize("backend", ["file", "seaweedfs"])
def test_with_a_key_a_planted_plaintext_checkpoint_is_never_restored(
        backend: str, request: pytest.FixtureRequest, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    remote = request.getfixturevalue(f"{backend}_remote")
    local = LocalStore(tmp_path / "a")
    good = store_of(remote, A).push(make_local(local, 1, files_for(1)))
    planted = make_local(LocalStore(tmp_path / "evil"), 2, {"model.pt": b"attacker weights"})
    plant(remote, planted)  # newer, plaintext: no "enc" field anywhere

    skipped: list[tuple[str, str]] = []
    got = store_of(remote, A).pull(None, LocalStore(tmp_path / "b"), skipped=skipped)
    assert got.name == good.name  # the encrypted one, not the planted one
    assert skipped and skipped[0][0] == planted.name and "not encrypted" in skipped[0][1]
    with pytest.raises(CorruptCheckpointError, match=r"model\.pt.*not encrypted"):
        store_of(remote, A).pull(planted.name, LocalStore(tmp_path / "c"))
    # Without a key the root marker says the run is encrypted: still never the plaintext one.
    with pytest.raises(EncryptionKeyError, match=A.current_id):
        store_of(remote).pull(None, LocalStore(tmp_path / "d"))
    # Migrating a run that was plaintext: allowed only when asked, and said in the log.
    with caplog.at_level(logging.WARNING, logger="ckptsync"):
        got = store_of(remote, A, allow_plaintext=True).pull(None, LocalStore(tmp_path / "e"))
    assert got.name == planted.name and "allow_plaintext" in caplog.text


def test_a_push_without_a_key_into_an_encrypted_run_is_refused(
        file_remote: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store_of(file_remote, A).push(make_local(LocalStore(tmp_path / "a"), 1, files_for(1)))
    other = LocalStore(tmp_path / "b")
    store_of(file_remote, run_dir=other.directory).adopt_run()  # the same run, resumed
    make_local(other, 2, files_for(2))
    env = {k: os.environ.pop(k) for k in ("CKPTSYNC_KEY", "CKPTSYNC_KEY_FILE") if k in os.environ}
    try:
        assert main(["push", str(other.directory), file_remote.url]) == 2
    finally:
        os.environ.update(env)
    err = capsys.readouterr().err
    assert "encrypted run" in err and A.current_id in err and "--key-file" in err
    assert [m.step for m in store_of(file_remote).list()] == [1]  # nothing plaintext went up


# --------------------------------------------------------------------------- 2. keyed manifests
@pytest.mark.parametrize("backend", ["file", "seaweedfs"])
def test_keyed_manifests_refuse_altered_and_relabelled_checkpoints(
        backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    remote = request.getfixturevalue(f"{backend}_remote")
    local = LocalStore(tmp_path / "a")
    one, two = (store_of(remote, A).push(make_local(local, s, files_for(s), {"loss": 1.0 / s}))
                for s in (1, 2))

    # Swapped metadata: the newest one's metrics and extra rewritten (self-digest resealed).
    def swap(obj: dict[str, Any]) -> None:
        obj["metrics"] = {"loss": 0.0}
        obj["extra"] = {"lr": 1e9}

    rewrite_manifest(remote, two.name, swap)
    # Relabelled: checkpoint 1's files and manifest copied under a step-200 name.
    fs = remote.fs()
    relabelled = make_name(200)
    for f in one.files:
        put(remote, rpath(remote, relabelled, f.path),
            bytes(fs.cat_file(rpath(remote, one.name, f.path))))
    obj = json.loads(fs.cat_file(rpath(remote, one.name, MANIFEST_NAME)))
    obj.update(name=relabelled, step=200)
    put(remote, rpath(remote, relabelled, MANIFEST_NAME), json.dumps(seal(obj)).encode())

    skipped: list[tuple[str, str]] = []
    got = store_of(remote, A).pull(None, LocalStore(tmp_path / "b"), skipped=skipped)
    assert got.name == one.name
    assert [n for n, _ in skipped] == [relabelled, two.name]
    assert all("keyed MAC does not match" in why for _, why in skipped)
    assert one.unknown[MAC_FIELD]["key_id"] == A.current_id and "encryption/1" in one.requires


@pytest.mark.parametrize("backend", ["file", "seaweedfs"])
def test_a_forged_key_id_does_not_block_every_restore(
        backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    remote = request.getfixturevalue(f"{backend}_remote")
    local = LocalStore(tmp_path / "a")
    one, two = (store_of(remote, A, run_dir=local.directory).push(
        make_local(local, s, files_for(s))) for s in (1, 2))
    forged = "0123456789abcdef"

    def forge(obj: dict[str, Any]) -> None:
        if MAC_FIELD in obj:
            obj[MAC_FIELD]["key_id"] = forged
        for f in obj["files"]:
            f["enc"]["key_id"] = forged

    rewrite_manifest(remote, two.name, forge)
    skipped: list[tuple[str, str]] = []
    got = store_of(remote, A).pull(None, LocalStore(tmp_path / "b"), skipped=skipped)
    assert got.name == one.name and read_tree(got.path) == read_tree(local.get(one.name).path)
    assert skipped[0][0] == two.name and forged in skipped[0][1]  # loud, named
    # A key id of this run (the marker lists it, under a MAC A verifies) that the reader lacks
    # is still a missing key, never a fall back.
    rotated = KeyRing((B.keys[0], A.keys[0]))
    three = store_of(remote, rotated, run_dir=local.directory).push(
        make_local(local, 3, files_for(3)))
    with pytest.raises(EncryptionKeyError, match=B.current_id) as e:
        store_of(remote, A).pull(None, LocalStore(tmp_path / "c"))
    assert three.name in str(e.value)


# --------------------------------------------------------------------------- 3. requires
def test_an_unknown_required_feature_is_refused_never_passed_over(
        file_remote: Any, tmp_path: Path) -> None:
    local = LocalStore(tmp_path / "a")
    store_of(file_remote).push(make_local(local, 1, files_for(1)))
    newer = make_local(LocalStore(tmp_path / "future"), 2, files_for(2))
    future = dataclasses.replace(newer.manifest, unknown={"requires": ["zstd/1"],
                                                          "written_by": "ckptsync 9.0"})
    plant(file_remote, newer, future)

    for call in (lambda s: s.pull(None, LocalStore(tmp_path / "b")), lambda s: s.newest_valid()):
        with pytest.raises(UnsupportedFormatError) as e:
            call(store_of(file_remote))
        assert "'zstd/1'" in str(e.value) and "ckptsync 9.0" in str(e.value)
    assert LocalStore(tmp_path / "b").list() == []  # the older one was not pulled instead
    # What ckptsync writes lists the features it uses.
    enc = store_of(file_remote, A, allow_plaintext=True).read_manifest(
        store_of(file_remote, A).push(make_local(local, 3, files_for(3))).name)
    assert enc is not None and enc.requires == ("encryption/1",)
    parts = make_parts(Manifest.new(step=4, files=[], name=make_name(4)), [[], []])
    assert all(p.requires == ("parts/1",) for p in parts)


# --------------------------------------------------------------------------- 4. skewed clocks
def _stepless(store: LocalStore, created: datetime, tag: bytes) -> LocalCheckpoint:
    """A step-less version made by a writer whose clock reads ``created``."""
    name = make_name(None, created)
    st = store.staging(name)
    st.write_file("ckpt.pt", tag + os.urandom(1000))
    return st.commit(Manifest.new(step=None, files=st.entries, name=name, created=created))


@pytest.mark.parametrize("backend", ["file", "seaweedfs"])
def test_step_less_versions_order_by_the_remote_not_by_a_skewed_clock(
        backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    remote = request.getfixturevalue(f"{backend}_remote")
    now = datetime.now(timezone.utc)
    # Machine A's clock is an hour ahead; it writes a version, then dies.
    a = LocalStore(tmp_path / "a")
    ahead = store_of(remote, run_dir=a.directory).push(_stepless(a, now + timedelta(hours=1),
                                                                 b"A"))
    # Machine B (a true clock) resumes the run, then writes the really newer version.
    b = LocalStore(tmp_path / "b")
    store_of(remote).pull(None, b)
    newer = store_of(remote, run_dir=b.directory).push(_stepless(b, now, b"B"))

    got = store_of(remote).pull(None, LocalStore(tmp_path / "c"))
    assert got.name == newer.name
    assert [m.name for m in store_of(remote).list()] == [ahead.name, newer.name]
    assert store_of(remote).apply_retention(RetentionPolicy(keep_last=1)) == [ahead.name]
    assert [m.name for m in store_of(remote).list()] == [newer.name]
    assert newer.seq is not None and ahead.seq is not None and newer.seq > ahead.seq


# --------------------------------------------------------------------------- 6. one run
def test_a_second_run_in_one_prefix_is_refused_where_writes_can_be_create_only(
        seaweedfs_remote: Any, tmp_path: Path) -> None:
    first = LocalStore(tmp_path / "run1")
    m1 = store_of(seaweedfs_remote, run_dir=first.directory).push(
        make_local(first, 1, files_for(1)))
    run = RunFile(first.directory).read()

    second = LocalStore(tmp_path / "run2")  # another run's directory, never restored
    with pytest.raises(ConfigError, match=rf"holds run {run}.*restore from it first"):
        store_of(seaweedfs_remote, run_dir=second.directory).push(
            make_local(second, 5, files_for(5)))
    other = LocalStore(tmp_path / "run3")  # a directory of another run altogether
    RunFile(other.directory).write("f" * 32)
    with pytest.raises(ConfigError, match=r"belongs to run f{32}"):
        store_of(seaweedfs_remote, run_dir=other.directory).push(
            make_local(other, 6, files_for(6)))
    assert [m.name for m in store_of(seaweedfs_remote).list()] == [m1.name]
    assert run is not None and m1.run == run

    # The same run resumed on a fresh machine: pull, then save: the same run, pushed.
    fresh = LocalStore(tmp_path / "fresh")
    store_of(seaweedfs_remote).pull(None, fresh)
    assert RunFile(fresh.directory).read() == run
    m2 = store_of(seaweedfs_remote, run_dir=fresh.directory).push(
        make_local(fresh, 2, files_for(2)))
    assert m2.run == run


def test_without_a_create_only_write_a_second_run_is_warned_and_spared_by_retention(
        memory_remote: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    one, two = LocalStore(tmp_path / "run1"), LocalStore(tmp_path / "run2")
    s1 = store_of(memory_remote, run_dir=one.directory)
    first = s1.push(make_local(one, 1, files_for(1)))
    s2 = store_of(memory_remote, run_dir=two.directory)
    with caplog.at_level(logging.WARNING, logger="ckptsync"):
        theirs = [s2.push(make_local(two, s, files_for(s))) for s in (10, 11)]
    assert "SECOND RUN IN ONE PREFIX" in caplog.text
    ours = [s1.push(make_local(one, s, files_for(s))) for s in (2, 3)]
    policy = RetentionPolicy(keep_last=1)
    assert s1.apply_retention(policy) == [first.name, ours[0].name]
    assert s2.apply_retention(policy) == [theirs[0].name]
    left = {m.name for m in store_of(memory_remote).list()}
    assert left == {ours[-1].name, theirs[-1].name}  # each run kept its own newest


# --------------------------------------------------------------------------- 7. node parts
NODE_FILES = [{".metadata": b"meta", "__0_0.distcp": os.urandom(7000)},
              {"__1_0.distcp": os.urandom(9000)}]


def _parts(tmp_path: Path, step: int) -> list[LocalCheckpoint]:
    return make_node_parts(tmp_path, step, NODE_FILES)


@pytest.mark.parametrize("backend", ["memory", "seaweedfs"])
def test_a_forged_part_of_the_right_size_is_never_committed(
        backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    remote = request.getfixturevalue(f"{backend}_remote")
    node0, node1 = _parts(tmp_path, 5)
    name = node0.name
    # Before node 1 pushes, someone uploads "its" part: the right sizes, other bytes, and
    # the marker node 1 would write.
    put(remote, rpath(remote, name, "__1_0.distcp"), os.urandom(9000))
    put(remote, rpath(remote, name, "ckptsync-part-1.json"), node1.manifest.to_json())
    with pytest.raises(RemoteError, match=r"__1_0\.distcp.*not committed"):
        store_of(remote, run_dir=tmp_path / "node0").push(node0)
    assert store_of(remote).list() == []  # nothing committed
    # The real node 1 finds its part replaced, uploads it again, and commits the whole.
    whole = store_of(remote, run_dir=tmp_path / "node1").push(node1)
    assert part_of(whole) is None and whole.name == name
    store_of(remote).verify(name, full=True)


def test_a_node_whose_committed_part_was_replaced_never_reports_success(
        memory_remote: Any, tmp_path: Path) -> None:
    node0, node1 = _parts(tmp_path, 6)
    store_of(memory_remote, run_dir=tmp_path / "node0").push(node0)
    store_of(memory_remote, run_dir=tmp_path / "node1").push(node1)  # commits
    path = rpath(memory_remote, node1.name, "__1_0.distcp")
    memory_remote.fs().rm_file(path)
    put(memory_remote, path, os.urandom(9000))  # replaced after the commit
    with pytest.raises(RemoteError, match=r"part 1 of.*__1_0\.distcp.*replaced"):
        store_of(memory_remote, run_dir=tmp_path / "node1").push(node1)


# --------------------------------------------------------------------------- 8. gc vs commit
@pytest.mark.parametrize("backend", ["memory", "seaweedfs"])
def test_gc_during_a_commit_never_leaves_a_committed_checkpoint_without_a_file(
        backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    remote = request.getfixturevalue(f"{backend}_remote")
    local = LocalStore(tmp_path / "a")
    first = store_of(remote, run_dir=local.directory).push(make_local(local, 1, files_for(1)))
    ckpt = make_local(local, 2, files_for(2))
    collected: list[str] = []
    fs = FaultFS(remote.fs())
    # The push has uploaded every file and checked their sizes; right before its manifest
    # write, `gc --grace 0` runs from elsewhere and takes the prefix for a leftover.
    fs.before("pipe_file", f"{ckpt.name}/{MANIFEST_NAME}",
              lambda: collected.extend(store_of(remote).gc(0.0, now=time.time() + 60)))
    with pytest.raises(RemoteError, match="removed while the checkpoint was committed"):
        store_of(remote, run_dir=local.directory, fs=fs).push(ckpt)
    assert collected == [ckpt.name]
    entries = store_of(remote).scan()
    assert [e.name for e in entries if e.status != "uncommitted"] == [first.name]
    assert {e.status for e in entries} <= {"valid", "uncommitted"}  # nothing committed lacks
    # The next attempt commits it whole.
    store_of(remote, run_dir=local.directory).push(ckpt)
    store_of(remote).verify(ckpt.name, full=True)
