"""A typo never looks like success. A prefix that holds
nothing at all is reported as such, with the runs beside it, by ``pull``, ``ls``, ``verify``
and ``Checkpointer.restore``; "nothing to pull: a fresh start" (exit 5) is said only for a run
that exists or where the user declared a new run. ``ls`` of a bucket lists the runs in it.
``watch`` refuses a missing directory unless ``--create``; ``status`` of one exits 2. Remote
paths with ``//``, ``.``, ``..`` or a query string are usage errors. Real remotes (file://,
SeaweedFS), the CLI's own entry point."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from ckptsync import Checkpointer
from ckptsync.errors import NoCheckpointError
from ckptsync.local import LocalCheckpoint, LocalStore
from ckptsync.manifest import Manifest, make_name
from ckptsync.remote import RemoteStore
from tests.support.cli import run_cli
from tests.support.jsonlines import events, summary
from tests.support.remotes import Remote

pytestmark = pytest.mark.core


def make_local(store: LocalStore, step: int) -> LocalCheckpoint:
    st = store.staging(make_name(step))
    st.write_file("model.pt", os.urandom(20_000))
    return st.commit(Manifest.new(step=step, files=st.entries, name=st.name))


def env_of(remote: Remote) -> dict[str, str]:
    return {"CKPTSYNC_STORAGE_OPTIONS": json.dumps(remote.storage_options)}


def sibling(remote: Remote, name: str) -> str:
    """The URL of prefix ``name`` beside the remote's run."""
    return remote.url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture
def run17(remote: Remote, tmp_path: Path) -> tuple[Remote, str, list[LocalCheckpoint]]:
    """A real run at ``<parent>/run-17`` with two checkpoints (steps 20 and 160)."""
    local = LocalStore(tmp_path / "ckpts")
    ckpts = [make_local(local, s) for s in (20, 160)]
    url = sibling(remote, "run-17")
    p = run_cli("push", str(local.directory), url, **env_of(remote))
    assert p.returncode == 0, p.stderr
    return remote, url, ckpts


@pytest.mark.parametrize("remote", ["file", "seaweedfs"], indirect=True)
def test_a_typo_is_not_a_fresh_start(run17: tuple[Remote, str, list[LocalCheckpoint]],
                                     tmp_path: Path) -> None:
    remote, good, ckpts = run17
    typo = sibling(remote, "run-71")
    env = env_of(remote)
    for argv in (["pull", typo, str(tmp_path / "out")], ["ls", typo], ["verify", typo]):
        p = run_cli(*argv, **env)
        assert p.returncode == 1, (argv, p.stderr)
        assert f"{typo} holds nothing at all" in p.stderr, p.stderr
        assert f"Did you mean {good}?" in p.stderr and "--allow-empty" in p.stderr, p.stderr
        assert "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()
    p = run_cli("pull", typo, str(tmp_path / "out"), "--json", **env)
    assert summary(p.stdout)["exit_code"] == 1 and "holds nothing at all" in summary(
        p.stdout)["error"]
    # Declared: a new run is expected there.
    p = run_cli("pull", typo, str(tmp_path / "out"), "--allow-empty", **env)
    assert p.returncode == 5 and "a fresh start" in p.stderr, p.stderr
    p = run_cli("pull", typo, str(tmp_path / "out"), **env, CKPTSYNC_ALLOW_EMPTY="1")
    assert p.returncode == 5, p.stderr
    p = run_cli("ls", typo, "--allow-empty", "--json", **env)
    assert p.returncode == 0 and summary(p.stdout)["checkpoints"] == 0
    p = run_cli("verify", typo, "--allow-empty", **env)
    assert p.returncode == 0 and "nothing to verify" in p.stdout
    # The right URL still pulls.
    p = run_cli("pull", good, str(tmp_path / "out"), **env)
    assert p.returncode == 0 and ckpts[-1].name in p.stdout, p.stderr


def test_a_run_that_exists_and_is_empty_is_a_fresh_start(file_remote: Remote,
                                                         tmp_path: Path) -> None:
    """Its marker is there (a first push), its checkpoints are gone: exit 5, no flag needed."""
    local = LocalStore(tmp_path / "ckpts")
    ckpt = make_local(local, 1)
    assert run_cli("push", str(local.directory), file_remote.url).returncode == 0
    RemoteStore(file_remote.url).delete(ckpt.name)
    p = run_cli("pull", file_remote.url, str(tmp_path / "out"))
    assert p.returncode == 5, p.stderr
    assert "nothing to pull" in p.stderr and "holds no checkpoint yet" in p.stderr
    p = run_cli("ls", file_remote.url)
    assert p.returncode == 0 and "no checkpoints" in p.stdout, p.stderr
    p = run_cli("verify", file_remote.url)
    assert p.returncode == 1 and "no committed checkpoint" in p.stderr


@pytest.mark.parametrize("remote", ["file", "seaweedfs"], indirect=True)
def test_ls_of_a_bucket_lists_the_runs_in_it(run17: tuple[Remote, str, list[LocalCheckpoint]],
                                             tmp_path: Path) -> None:
    remote, good, ckpts = run17
    env = env_of(remote)
    local = LocalStore(tmp_path / "other")
    make_local(local, 3)
    nested = sibling(remote, "project/run-3")
    assert run_cli("push", str(local.directory), nested, **env).returncode == 0
    parent = remote.url.rsplit("/", 1)[0]
    p = run_cli("ls", parent, "--json", **env)
    assert p.returncode == 0, p.stderr
    runs = {r["url"]: r for r in events(p.stdout, "run")}
    assert set(runs) == {good, nested}
    assert runs[good]["checkpoints"] == 2 and runs[good]["step"] == 160
    assert runs[good]["newest"] == ckpts[-1].name and runs[good]["size"] >= 40_000
    assert runs[nested]["step"] == 3 and summary(p.stdout)["runs"] == 2
    p = run_cli("ls", parent, **env)
    assert p.returncode == 0 and "is not a run; the runs under it" in p.stdout
    assert good in p.stdout and "160" in p.stdout
    # A folder above runs is not a run either: pull says which runs it holds.
    p = run_cli("pull", sibling(remote, "project"), str(tmp_path / "out"), **env)
    assert p.returncode == 1 and f"It holds runs: {nested}" in p.stderr, p.stderr


def test_watch_refuses_a_missing_directory_and_status_of_one_exits_2(
        file_remote: Remote, tmp_path: Path) -> None:
    missing = tmp_path / "chekpoints"
    p = run_cli("watch", str(missing), file_remote.url, "--once")
    assert p.returncode == 2 and f"LOCAL_DIR {missing} does not exist" in p.stderr
    assert "--create" in p.stderr and not missing.exists()
    p = run_cli("status", str(missing))
    assert p.returncode == 2 and "does not exist" in p.stderr, p.stderr
    assert p.stdout == ""
    p = run_cli("watch", str(missing), file_remote.url, "--once", "--create")
    assert p.returncode == 0, p.stderr
    assert missing.is_dir()


@pytest.mark.parametrize("url", [
    "s3://bucket//run", "s3://bucket/./run", "s3://bucket/a/../run",
    "s3://bucket/run?versionId=x", "gs://bucket/run//x", "memory://run/../other"])
@pytest.mark.parametrize("command", ["ls", "pull", "push", "watch"])
def test_malformed_remote_paths_are_usage_errors(url: str, command: str,
                                                 tmp_path: Path) -> None:
    local = tmp_path / "ckpts"
    local.mkdir()
    argv = {"ls": ["ls", url], "pull": ["pull", url, str(local)],
            "push": ["push", str(local), url], "watch": ["watch", str(local), url, "--once"]}
    p = run_cli(*argv[command])
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert url.split("?")[0] in p.stderr and "Traceback" not in p.stderr
    assert "versionId" not in p.stderr  # a query string may hold a signature: never shown
    assert ("path component" in p.stderr or "query string" in p.stderr), p.stderr


# --------------------------------------------------------------------------- Checkpointer


def test_checkpointer_restore_of_a_typo_raises_naming_the_run_beside_it(
        file_remote: Remote, tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    with Checkpointer(tmp_path / "a", remote=file_remote.url) as ck:
        assert ck.restore(model=model, fresh_ok=True) is None  # the run's first start
        ck.save(1, model=model)
    typo = sibling(file_remote, "rnu")
    with Checkpointer(tmp_path / "fresh-machine", remote=typo) as ck:
        with pytest.raises(NoCheckpointError) as e:
            ck.restore(model=model)
        assert type(e.value).__name__ == "NotARunError"
        assert f"Did you mean {file_remote.url}?" in str(e.value)
        assert ck.list() == []  # nothing saved, nothing started
    with Checkpointer(tmp_path / "fresh-machine", remote=file_remote.url) as ck:
        info = ck.restore(model=model)  # the run exists: found and restored
        assert info is not None and info.step == 1


def test_checkpointer_fresh_ok_from_the_environment(file_remote: Remote, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CKPTSYNC_ALLOW_EMPTY", "1")
    with Checkpointer(tmp_path / "a", remote=file_remote.url) as ck:
        assert ck.restore(model=torch.nn.Linear(3, 2)) is None
    assert f"starting a new run: {file_remote.url} holds no ckptsync run yet" in \
        capfd.readouterr().err
    monkeypatch.delenv("CKPTSYNC_ALLOW_EMPTY")
    with Checkpointer(tmp_path / "b", remote=file_remote.url) as ck, \
            pytest.raises(NoCheckpointError, match="holds nothing at all"):
        ck.restore(model=torch.nn.Linear(3, 2))
