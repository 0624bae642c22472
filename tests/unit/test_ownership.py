"""ckptsync deletes only what it wrote: gc, retention, multipart clean-up, local
clean-up and spools leave every foreign entry byte for byte; an empty remote URL, or a remote
inside the local checkpoint directory, is a usage error (exit 2) that changes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptsync import Checkpointer, ConfigError, start_watcher
from ckptsync.errors import ManifestError
from ckptsync.local import LocalCheckpoint, LocalStore
from ckptsync.manifest import Manifest, make_name
from ckptsync.ownership import ROOT_MARKER
from ckptsync.remote import RemoteStore
from ckptsync.retention import RetentionPolicy
from tests.support.cli import cli as subprocess_cli
from tests.support.cli import run_cli
from tests.support.jsonlines import events, summary
from tests.support.remotes import backend_params

pytestmark = pytest.mark.core

OLD = time.time() - 30 * 86400  # foreign entries a month old: well past any grace period
FUTURE = time.time() + 10**7  # gc(now=FUTURE): every leftover counts as old

# Foreign entries planted under a remote root: names unlike ours, and names that look like ours
# without parsing as checkpoint names.
FOREIGN_REMOTE = {
    "other/data.bin": b"somebody else's data",
    "notes.txt": b"my notes",
    "step-000000000009-backup/model.pt": b"a backup that looks like a checkpoint",
    "Step-000000000001-20260101T000000000000Z-abcdef/x.bin": b"case differs",
    "exported/ckptsync.json": b"not json at all",
    "exported/model.pt": b"exported weights",
    ".staging-step-000000000001/x": b"hidden, staging-like",
}


def make_local(store: LocalStore, step: int, payload: bytes = b"w") -> LocalCheckpoint:
    st = store.staging(make_name(step))
    st.write_file("model.pt", payload * 1000 + step.to_bytes(4, "little"))
    return st.commit(Manifest.new(step=step, files=st.entries, name=st.name))


def plant(fs: Any, root: str, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = f"{root}/{rel}"
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, data)
    fs.invalidate_cache()


def read_back(fs: Any, root: str, files: dict[str, bytes]) -> dict[str, bytes | None]:
    fs.invalidate_cache()
    out: dict[str, bytes | None] = {}
    for rel in files:
        try:
            out[rel] = bytes(fs.cat_file(f"{root}/{rel}"))
        except FileNotFoundError:
            out[rel] = None
    return out


def tree(path: Path) -> dict[str, tuple[bytes | str, float]]:
    """Every entry below ``path`` (files with bytes, links with targets) and its mtime."""
    out: dict[str, tuple[bytes | str, float]] = {}
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        st = p.lstat()
        if p.is_symlink():
            out[rel] = (os.readlink(p), st.st_mtime)
        elif p.is_file():
            out[rel] = (p.read_bytes(), st.st_mtime)
        else:
            out[rel] = ("<dir>", st.st_mtime)
    return out


@pytest.fixture(params=backend_params(["file", "memory", "seaweedfs"]))
def owned_remote(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue(f"{request.param}_remote")


# --------------------------------------------------------------------------- the remote store


def test_gc_and_retention_touch_only_what_ckptsync_wrote(owned_remote: Any, tmp_path: Path) -> None:
    local = LocalStore(tmp_path / "ckpts")
    store = RemoteStore(owned_remote.url, owned_remote.storage_options)
    ckpts = [make_local(local, s) for s in (1, 2, 3)]
    for c in ckpts:
        store.push(c)
    fs, root = owned_remote.fs(), owned_remote.path
    assert fs.exists(f"{root}/{ROOT_MARKER}"), "the first push marks the root as ckptsync's"
    ours = make_name(7)  # a crashed upload of ours: gc's job
    plant(fs, root, {**FOREIGN_REMOTE, f"{ours}/model.pt": b"partial"})

    assert store.gc(0.0, dry_run=True, now=FUTURE) == [ours]
    assert store.gc(0.0, now=FUTURE) == [ours]
    assert store.apply_retention(RetentionPolicy(keep_last=1)) == [c.name for c in ckpts[:2]]
    assert store.gc(0.0, now=FUTURE) == []

    assert read_back(fs, root, FOREIGN_REMOTE) == FOREIGN_REMOTE
    assert read_back(fs, root, {f"{ours}/model.pt": b""}) == {f"{ours}/model.pt": None}
    assert [m.name for m in store.list()] == [ckpts[-1].name]
    with pytest.raises(ConfigError, match="not a ckptsync checkpoint name"):
        store.delete("other")
    assert read_back(fs, root, FOREIGN_REMOTE) == FOREIGN_REMOTE


def test_gc_refuses_a_root_ckptsync_never_wrote(owned_remote: Any) -> None:
    fs, root = owned_remote.fs(), owned_remote.path
    store = RemoteStore(owned_remote.url, owned_remote.storage_options)
    assert store.gc(0.0, now=FUTURE) == []  # an empty root: nothing to do, nothing refused
    plant(fs, root, FOREIGN_REMOTE)
    with pytest.raises(ConfigError, match=rf"not a ckptsync remote.*{ROOT_MARKER}"):
        store.gc(0.0, now=FUTURE)
    assert read_back(fs, root, FOREIGN_REMOTE) == FOREIGN_REMOTE


def test_a_root_from_before_the_marker_is_still_collected(owned_remote: Any,
                                                         tmp_path: Path) -> None:
    local = LocalStore(tmp_path / "ckpts")
    store = RemoteStore(owned_remote.url, owned_remote.storage_options)
    store.push(make_local(local, 1))
    fs, root = owned_remote.fs(), owned_remote.path
    fs.rm_file(f"{root}/{ROOT_MARKER}")  # as an older ckptsync left it
    ours = make_name(2)
    plant(fs, root, {"other/data.bin": b"x", f"{ours}/model.pt": b"partial"})
    fresh = RemoteStore(owned_remote.url, owned_remote.storage_options)
    assert fresh.gc(0.0, now=FUTURE) == [ours]
    assert read_back(fs, root, {"other/data.bin": b"x"}) == {"other/data.bin": b"x"}


def test_gc_aborts_only_multipart_uploads_inside_our_checkpoints(s3_remote: Any,
                                                                 tmp_path: Path) -> None:
    store = RemoteStore(s3_remote.url, s3_remote.storage_options)
    store.push(make_local(LocalStore(tmp_path / "ckpts"), 1))
    fs = s3_remote.fs()
    bucket, _, prefix = s3_remote.path.partition("/")
    keys = {name: f"{prefix}/{name}" for name in (
        f"{make_name(5)}/model.pt",  # ours: abandoned by a killed daemon
        "other/big.bin",  # foreign, under the root
        "step-000000000009-backup/model.pt",  # foreign, a name that looks like ours
    )}
    for key in keys.values():
        fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)
    ours = next(k for k in keys.values() if "backup" not in k and "other" not in k)
    assert store.gc(0.0, now=FUTURE) == [f"multipart:{ours}"]
    left = sorted(u["Key"] for u in fs.list_multipart_uploads(bucket))
    assert left == sorted(k for k in keys.values() if k != ours)


# --------------------------------------------------------------------------- the command line


def cli(*args: str, cwd: Path,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, cwd=cwd, env=env)


@pytest.fixture(params=["file", "seaweedfs"])
def cli_remote(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue(f"{request.param}_remote")


def test_cli_gc_and_push_leave_foreign_entries(cli_remote: Any, tmp_path: Path) -> None:
    env = {"CKPTSYNC_STORAGE_OPTIONS": json.dumps(cli_remote.storage_options)}
    local = LocalStore(tmp_path / "ckpts")
    ckpts = [make_local(local, s) for s in (1, 2, 3)]
    fs, root = cli_remote.fs(), cli_remote.path
    plant(fs, root, FOREIGN_REMOTE)

    # A root holding only foreign entries: gc refuses and deletes nothing.
    p = cli("gc", cli_remote.url, "--keep-last", "1", "--grace", "0", cwd=tmp_path, env=env)
    assert p.returncode == 2, p.stderr
    assert "not a ckptsync remote" in p.stderr and "nothing under it was deleted" in p.stderr

    p = cli("push", str(local.directory), cli_remote.url, cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr
    ours = make_name(8)
    plant(fs, root, {f"{ours}/model.pt": b"partial"})
    p = cli("gc", cli_remote.url, "--keep-last", "1", "--grace", "0", "--dry-run", "--json",
            cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr
    assert [(e["event"], e["name"], e["kind"]) for e in events(p.stdout)
            if e["event"] != "would_keep"] == [
        *[("would_delete", c.name, "checkpoint") for c in ckpts[:2]],
        ("would_delete", ours, "leftover")]
    assert summary(p.stdout) == {"event": "summary", "command": "gc", "dry_run": True,
                                 "deleted": 2, "leftovers": 1, "exit_code": 0}
    p = cli("gc", cli_remote.url, "--keep-last", "1", "--grace", "0", cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr
    assert f"deleted leftover {ours}" in p.stdout
    assert read_back(fs, root, FOREIGN_REMOTE) == FOREIGN_REMOTE
    fs.invalidate_cache()
    # Every object left (SeaweedFS keeps empty "directories", so look at objects, not ls).
    heads = {f[len(root) + 1:].split("/", 1)[0] for f in fs.find(root)}
    assert heads == {ckpts[-1].name, ROOT_MARKER, "LATEST",
                     *(k.split("/")[0] for k in FOREIGN_REMOTE)}


@pytest.fixture
def user_home(tmp_path: Path) -> Path:
    """A directory as a user's home looks: old folders and files of their own, plus a local
    checkpoint directory a trainer wrote (with its writer lock)."""
    home = tmp_path / "home"
    for rel, data in {"data/train.csv": b"1,2,3\n", "projects/x/main.py": b"print(1)\n",
                      "notes.txt": b"n"}.items():
        (home / rel).parent.mkdir(parents=True, exist_ok=True)
        (home / rel).write_bytes(data)
    ckpts = LocalStore(home / "checkpoints")
    assert ckpts.acquire_writer_lock()
    ckpts.release_writer_lock()
    for s in (1, 2):
        make_local(ckpts, s)
    for p in home.rglob("*"):
        os.utime(p, (OLD, OLD), follow_symlinks=False)
    return home


@pytest.mark.parametrize("args", [
    ["gc", ""],
    ["gc", "", "--keep-last", "1", "--grace", "0"],
    ["gc", "   "],
    ["push", "checkpoints", ""],
    ["pull", "", "restored"],
    ["ls", ""],
    ["verify", ""],
    ["watch", "checkpoints", "", "--once"],
], ids=lambda a: " ".join(repr(x) for x in a))
def test_empty_remote_url_is_a_usage_error_that_changes_nothing(args: list[str],
                                                                user_home: Path) -> None:
    before = tree(user_home)
    p = cli(*args, cwd=user_home, env={"CKPTSYNC_REMOTE": ""})
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "is empty" in p.stderr and "REMOTE" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    assert tree(user_home) == before


@pytest.mark.parametrize("args", [
    ["push", "checkpoints", "checkpoints"],
    ["push", "checkpoints", "file://{home}/checkpoints/mirror"],
    ["watch", "checkpoints", "checkpoints/remote", "--once"],
    ["gc", "checkpoints", "--keep-last", "1", "--grace", "0"],
    ["gc", "file://{home}/checkpoints/sub", "--grace", "0"],
], ids=lambda a: " ".join(a))
def test_remote_inside_the_local_checkpoint_directory_is_refused(args: list[str],
                                                                 user_home: Path) -> None:
    before = tree(user_home)
    p = cli(*[a.format(home=user_home) for a in args], cwd=user_home)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "local checkpoint directory" in p.stderr, p.stderr
    assert tree(user_home) == before


def test_client_and_launcher_refuse_empty_or_inner_remotes(tmp_path: Path) -> None:
    d = tmp_path / "ckpts"
    with pytest.raises(ConfigError, match="remote= is empty"):
        Checkpointer(d, remote="")
    with pytest.raises(ConfigError, match="inside the local checkpoint directory"):
        Checkpointer(d, remote=f"file://{d}/remote")
    with pytest.raises(ConfigError, match="remote is empty"):
        start_watcher(tmp_path / "w", "")
    with pytest.raises(ConfigError, match="inside the local checkpoint directory"):
        start_watcher(tmp_path / "w", str(tmp_path / "w"))
    assert not (tmp_path / "w").exists(), "nothing is started or created"
    with pytest.raises(ConfigError, match="is empty"):
        RemoteStore("")


# --------------------------------------------------------------------------- local side


def test_local_retention_and_cleanup_leave_foreign_entries(tmp_path: Path) -> None:
    d = tmp_path / "ckpts"
    elsewhere = LocalStore(tmp_path / "elsewhere")
    outside = make_local(elsewhere, 0)
    d.mkdir()
    foreign = {
        "other/data.bin": b"user data",
        "notes.txt": b"notes",
        "step-000000000009-backup/model.pt": b"looks like ours",
        ".staging-mine/x": b"a hidden folder of the user's",
        ".deleting-old/x": b"another",
    }
    for rel, data in foreign.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
    # A copy of a checkpoint under the user's own name, with a manifest that says so.
    backup = LocalStore(tmp_path / "tmp")
    c = make_local(backup, 0)
    renamed = Manifest.new(step=None, files=list(c.manifest.files), name="my-backup")
    (d / "my-backup").mkdir()
    (d / "my-backup" / "model.pt").write_bytes(c.file("model.pt").read_bytes())
    (d / "my-backup" / "ckptsync.json").write_bytes(renamed.to_json())
    # A link to a checkpoint elsewhere, under a checkpoint name: never followed.
    os.symlink(outside.path, d / outside.name)
    # A crashed save of ours: cleaned up.
    (d / f".staging-{make_name(3)}").mkdir()
    for p in d.rglob("*"):
        os.utime(p, (OLD, OLD), follow_symlinks=False)
    keep = {rel: v for rel, v in tree(d).items() if not rel.startswith(".staging-step")}

    model = torch.nn.Linear(3, 2)
    ckpt = Checkpointer(d, keep_last=1)
    for step in (1, 2, 3):
        ckpt.save(step, model=model)
    ckpt.close()

    after = tree(d)
    assert {rel: after.get(rel) for rel in keep} == keep
    assert not any(rel.startswith(".staging-step") for rel in after)
    # The user's renamed copy is listed (it is readable), but never deleted; the link is not.
    assert [(c.name == "my-backup", c.step) for c in LocalStore(d).list()] == [(True, None),
                                                                               (False, 3)]
    assert elsewhere.get(outside.name).path.exists()
    assert (outside.path / "ckptsync.json").exists() and (outside.path / "model.pt").exists()
    with pytest.raises(ManifestError, match="symlink"):
        LocalStore(d).delete(outside.name)
    with pytest.raises(ManifestError, match="not a ckptsync checkpoint name"):
        LocalStore(d).delete("my-backup")
    assert tree(d) == after


def test_watch_once_leaves_foreign_entries_remote_and_in_the_spool(tmp_path: Path) -> None:
    d = tmp_path / "run"
    d.mkdir()
    (d / "ckpt.bin").write_bytes(b"zero-code checkpoint v1")
    spool = d / ".ckptsync-watch" / "spool"
    spool.mkdir(parents=True)
    (spool / "user.txt").write_bytes(b"u")
    (spool / ".staging-foreign").mkdir()
    (spool / ".staging-foreign" / "x").write_bytes(b"x")
    remote_root = tmp_path / "remote" / "run"
    remote_root.mkdir(parents=True)
    (remote_root / ROOT_MARKER).write_text("{}")
    (remote_root / "other").mkdir()
    (remote_root / "other" / "data.bin").write_bytes(b"d")
    for step in (1, 2):
        make_local(LocalStore(d), step)
    p = subprocess_cli("watch", str(d), f"file://{remote_root}", "--once", "--keep-last", "1",
                       "--rule", "file:ckpt.bin", "--settle", "0", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert (remote_root / "other" / "data.bin").read_bytes() == b"d"
    assert (spool / "user.txt").read_bytes() == b"u"
    assert (spool / ".staging-foreign" / "x").read_bytes() == b"x"
    assert len([m for m in RemoteStore(f"file://{remote_root}").list()]) == 1
