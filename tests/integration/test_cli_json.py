"""``--json`` is JSON Lines for the commands that work through several checkpoints
(push, pull, ls, verify, gc): one compact object per checkpoint, written as each is done, so a
pipe reading line by line sees progress; a summary line last, with the counts and the exit
code, on a failure too. ``status`` and ``demo`` stay one object. ``gc --dry-run`` writes
nothing. Real remotes (file://, SeaweedFS through a proxy that holds chosen requests), real
subprocesses reading real pipes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest

from ckptsync.local import LocalCheckpoint, LocalStore
from ckptsync.manifest import Manifest, make_name
from tests.support.cli import cli, run_cli
from tests.support.cli import cli_env as _env
from tests.support.fault_proxy import FaultProxy
from tests.support.faultkit import upstream_of
from tests.support.jsonlines import events, json_lines, summary
from tests.support.paths import REPO
from tests.support.remotes import Remote

pytestmark = pytest.mark.core


def make_local(store: LocalStore, step: int, size: int = 50_000) -> LocalCheckpoint:
    st = store.staging(make_name(step))
    st.write_file("model.pt", os.urandom(size))
    return st.commit(Manifest.new(step=step, files=st.entries, name=st.name,
                                  metrics={"loss": 1.0 / step}))


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_a_pipe_sees_each_pushed_checkpoint_while_later_uploads_still_run(
        seaweedfs_remote: Remote, tmp_path: Path) -> None:
    """The first line arrives, and parses, while the second checkpoint's requests are held
    by the proxy: the push is provably not finished when its first object is read."""
    local = LocalStore(tmp_path / "ckpts")
    ckpts = [make_local(local, s) for s in (1, 2, 3)]
    fs = seaweedfs_remote.fs()
    with FaultProxy(*upstream_of(seaweedfs_remote.extra["endpoint"]), lifetime=120) as proxy:
        opts = json.loads(json.dumps(seaweedfs_remote.storage_options))
        opts["client_kwargs"]["endpoint_url"] = proxy.endpoint
        proxy.stall(path_contains=ckpts[1].name)  # every request for the second checkpoint
        with (tmp_path / "stderr").open("w") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "ckptsync.cli", "push", str(local.directory),
                 seaweedfs_remote.url, "--json"], stdout=subprocess.PIPE, stderr=err,
                text=True, cwd=REPO,
                env=_env(CKPTSYNC_STORAGE_OPTIONS=json.dumps(opts),
                         CKPTSYNC_READ_TIMEOUT="300"))
            try:
                assert proc.stdout is not None
                first = proc.stdout.readline()
                still_running = proc.poll() is None
                fs.invalidate_cache()
                second_committed = fs.exists(
                    f"{seaweedfs_remote.path}/{ckpts[1].name}/ckptsync.json")
            finally:
                proxy.unstall()
            rest, _ = proc.communicate(timeout=120)
    stderr = (tmp_path / "stderr").read_text()
    assert json.loads(first) == {"event": "pushed", "name": ckpts[0].name, "step": 1,
                                 "size": 50_000, "files": 1}, (first, stderr)
    assert still_running and not second_committed
    assert proc.returncode == 0, stderr
    lines = json_lines(first + rest)
    assert [(o["event"], o.get("name")) for o in lines] == [
        *[("pushed", c.name) for c in ckpts], ("summary", None)]
    assert summary(first + rest) == {"event": "summary", "command": "push", "dry_run": False,
                                     "pushed": 3, "skipped": 0, "bytes": 3 * 50_000,
                                     "exit_code": 0}


@pytest.mark.parametrize("remote", ["file", "seaweedfs"], indirect=True)
def test_every_line_of_every_streaming_command_is_one_json_object(
        remote: Remote, tmp_path: Path) -> None:
    """push, ls, verify, pull and gc: each line parses on its own (compact, one object), names
    its event, and the summary's exit code is the command's."""
    local = LocalStore(tmp_path / "ckpts")
    ckpts = [make_local(local, s) for s in (1, 2, 3)]
    env = {"CKPTSYNC_STORAGE_OPTIONS": json.dumps(remote.storage_options)}
    runs = {
        "push": ["push", str(local.directory), remote.url],
        "ls": ["ls", remote.url],
        "verify": ["verify", remote.url],
        "pull": ["pull", remote.url, str(tmp_path / "restore")],
        "gc": ["gc", remote.url, "--keep-last", "2"],
    }
    for command, argv in runs.items():
        p = run_cli(*argv, "--json", **env)
        assert p.returncode == 0, (command, p.stderr)
        assert all(line.startswith("{") and "\n" not in line
                   and json.loads(line) == json.loads(json.dumps(json.loads(line)))
                   for line in p.stdout.splitlines()), p.stdout
        out = summary(p.stdout)
        assert out["command"] == command and out["exit_code"] == 0, p.stdout
    assert [e["name"] for e in events(run_cli(*runs["ls"], "--json", **env).stdout)] == [
        c.name for c in ckpts[1:]]


def test_a_failure_ends_the_stream_with_a_summary_naming_it(tmp_path: Path) -> None:
    """A corrupt checkpoint (exit 1) and a command that stops on an error (a pull of a name
    the remote lacks): the last line is still the summary, with the exit code."""
    local = LocalStore(tmp_path / "ckpts")
    ckpts = [make_local(local, s) for s in (1, 2)]
    url = f"file://{tmp_path}/remote/run"
    assert run_cli("push", str(local.directory), url).returncode == 0
    model = tmp_path / "remote" / "run" / ckpts[0].name / "model.pt"
    model.write_bytes(b"x" * model.stat().st_size)
    p = run_cli("verify", url, "--json")
    assert p.returncode == 1
    assert [(e["name"], e["ok"]) for e in events(p.stdout, "verified")] == [
        (ckpts[0].name, False), (ckpts[1].name, True)]
    assert summary(p.stdout) == {"event": "summary", "command": "verify", "verified": 2,
                                 "ok": 1, "corrupt": 1, "exit_code": 1}

    p = run_cli("pull", url, str(tmp_path / "restore"), "--name", "step-nope", "--json")
    assert p.returncode == 1 and "step-nope" in p.stderr and "Traceback" not in p.stderr
    last = summary(p.stdout)
    assert last["command"] == "pull" and last["exit_code"] == 1 and "step-nope" in last["error"]

    p = run_cli("pull", f"file://{tmp_path}/empty", str(tmp_path / "restore"), "--json",
                "--allow-empty")
    assert p.returncode == 5 and summary(p.stdout)["exit_code"] == 5


def test_gc_dry_run_writes_nothing(tmp_path: Path) -> None:
    """``gc --dry-run`` names what retention and the leftover sweep would delete, and the
    remote is byte for byte what it was."""
    local = LocalStore(tmp_path / "ckpts")
    ckpts = [make_local(local, s) for s in (1, 2, 3)]
    url = f"file://{tmp_path}/remote/run"
    assert run_cli("push", str(local.directory), url).returncode == 0
    root = tmp_path / "remote" / "run"
    leftover = make_name(9)
    (root / leftover).mkdir()
    (root / leftover / "model.pt").write_bytes(b"an upload that never committed")
    before = tree(root)
    p = run_cli("gc", url, "--keep-last", "1", "--grace", "0", "--dry-run", "--json")
    assert p.returncode == 0, p.stderr
    assert [(e["event"], e["name"]) for e in events(p.stdout)] == [
        ("would_delete", ckpts[0].name), ("would_delete", ckpts[1].name),
        ("would_delete", leftover), ("would_keep", ckpts[2].name)]
    assert events(p.stdout, "would_keep")[0]["reasons"] == ["newest (never deleted)",
                                                            "keep-last 1"]
    assert tree(root) == before
    p = run_cli("gc", url, "--keep-last", "1", "--grace", "0", "--dry-run")
    assert p.returncode == 0 and f"would delete {ckpts[0].name}" in p.stdout
    assert tree(root) == before
    assert run_cli("gc", url, "--keep-last", "1", "--grace", "0").returncode == 0
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step")) == [
        ckpts[2].name]


def test_status_json_is_one_object(tmp_path: Path) -> None:
    p = run_cli("status", str(tmp_path), "--json")
    assert p.returncode == 2, p.stderr  # no daemon ever ran there
    st = json.loads(p.stdout)
    assert isinstance(st, dict) and st["local_dir"] == str(tmp_path)


def test_watch_json_logs_json_lines_on_stderr(tmp_path: Path) -> None:
    """``watch --json`` keeps its log as JSON lines on stderr (stdout stays empty)."""
    local = LocalStore(tmp_path / "ckpts")
    ckpt = make_local(local, 1)
    p = cli("watch", str(local.directory), f"file://{tmp_path}/remote/run", "--once", "--json",
            "-v")
    assert p.returncode == 0, p.stderr
    logs = [json.loads(line) for line in p.stderr.splitlines()]
    assert logs and all(isinstance(o, dict) for o in logs)
    assert ckpt.name in p.stderr and p.stdout == ""
    assert fsspec.filesystem("file").exists(f"{tmp_path}/remote/run/{ckpt.name}/ckptsync.json")
