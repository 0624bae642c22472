"""The CLI in pipes and when it fails.

- Every command's ``--json`` piped into ``head -1`` ends quietly: no traceback, no "internal
  error", the conventional status of a closed pipe (141, 128 + SIGPIPE) where the pipe closed
  before the command was done. Real subprocesses, real pipes (a shell's, and one whose reader
  closes at once, so that the closed pipe is certain).
- A missing optional package (``cryptography`` for ``--key-file``) is named with its extra,
  exit 2, before anything is uploaded.
- A push that fails mid-upload on S3 (the fault proxy resets the upload) exits within seconds:
  no writer is left open to hang the interpreter's exit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest

from ckptsync.local import LocalCheckpoint, LocalStore
from ckptsync.manifest import Manifest, make_name
from tests.support.cli import cli_env, run_cli
from tests.support.fault_proxy import Fault, FaultProxy
from tests.support.faultkit import upstream_of
from tests.support.paths import REPO
from tests.support.remotes import Remote

pytestmark = [pytest.mark.core, pytest.mark.usefixtures("no_process_leak")]


def make_local(store: LocalStore, step: int, size: int = 20_000) -> LocalCheckpoint:
    st = store.staging(make_name(step))
    st.write_file("model.pt", os.urandom(size))
    return st.commit(Manifest.new(step=step, files=st.entries, name=st.name))


@pytest.fixture
def commands(tmp_path: Path) -> dict[str, list[str]]:
    """Each command, with --json, on a remote that holds three checkpoints."""
    local = LocalStore(tmp_path / "ckpts")
    for s in (1, 2, 3):
        make_local(local, s)
    url = f"file://{tmp_path}/remote/run"
    assert run_cli("push", str(local.directory), url).returncode == 0
    watched = tmp_path / "watched"
    watched.mkdir()
    make_local(LocalStore(watched), 1)
    assert run_cli("watch", str(watched), f"file://{tmp_path}/remote/w", "--once").returncode == 0
    more = LocalStore(tmp_path / "more")
    for s in (4, 5, 6):
        make_local(more, s)
    return {
        "push": ["push", str(more.directory), f"file://{tmp_path}/remote/other"],
        "pull": ["pull", url, str(tmp_path / "restore")],
        "ls": ["ls", url],
        "verify": ["verify", url],
        "gc": ["gc", url, "--keep-last", "1", "--dry-run"],
        "status": ["status", str(watched)],
    }


def _cmd(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "ckptsync.cli", *argv, "--json"]


def test_every_json_command_piped_into_head_ends_quietly(commands: dict[str, list[str]]) -> None:
    for name, argv in commands.items():
        line = " ".join(f"'{a}'" for a in _cmd(argv))
        p = subprocess.run(["bash", "-o", "pipefail", "-c", f"{line} | head -1"],
                           capture_output=True, text=True, timeout=120, cwd=REPO, env=cli_env())
        assert p.returncode in (0, 141), (name, p.returncode, p.stderr)
        assert "Traceback" not in p.stderr and "internal error" not in p.stderr, (name, p.stderr)
        first = p.stdout.splitlines()
        assert len(first) == 1 and first[0].startswith("{"), (name, p.stdout)
        if name != "status":  # status --json is one (indented) document
            assert isinstance(json.loads(first[0]), dict)


def test_a_reader_that_closes_at_once_ends_every_command_with_141(
        commands: dict[str, list[str]]) -> None:
    for name, argv in [*commands.items(), ("help", ["ls", "--help"])]:
        cmd = _cmd(argv) if name != "help" else [sys.executable, "-m", "ckptsync.cli", *argv]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
                                env=cli_env())
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # the reader is gone before the first line is written
        err = proc.stderr.read().decode()
        proc.stderr.close()
        # (argparse writes --help itself and ignores the closed pipe: it exits 0, quietly.)
        assert proc.wait(timeout=120) in ((141,) if name != "help" else (0, 141)), (
            name, proc.returncode, err)
        assert err == "", (name, err)


# --------------------------------------------------------------------------- item 5


def test_key_file_without_cryptography_names_the_extra_before_any_upload(
        seaweedfs_remote: Remote, tmp_path: Path) -> None:
    local = LocalStore(tmp_path / "ckpts")
    make_local(local, 1)
    key = tmp_path / "key"
    key.write_text(os.urandom(32).hex())
    script = ("import sys; sys.modules['cryptography'] = None\n"
              "from ckptsync.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    env = cli_env(CKPTSYNC_STORAGE_OPTIONS=json.dumps(seaweedfs_remote.storage_options))
    start = time.monotonic()
    p = subprocess.run([sys.executable, "-c", script, "push", str(local.directory),
                        seaweedfs_remote.url, "--key-file", str(key)],
                       capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert p.returncode == 2, p.stderr
    assert "pip install 'ckptsync[encrypt]'" in p.stderr and "ckptsync[s3]" not in p.stderr
    assert "Traceback" not in p.stderr and time.monotonic() - start < 30
    fs = seaweedfs_remote.fs()
    fs.invalidate_cache()
    assert not fs.exists(seaweedfs_remote.path)  # nothing uploaded, not even the marker


def test_a_push_that_fails_mid_upload_on_s3_exits_at_once(seaweedfs_remote: Remote,
                                                          tmp_path: Path) -> None:
    local = LocalStore(tmp_path / "ckpts")
    ckpt = make_local(local, 1, size=3 * 1024 * 1024)
    opts = json.loads(json.dumps(seaweedfs_remote.storage_options))
    with FaultProxy(*upstream_of(seaweedfs_remote.extra["endpoint"]), lifetime=120,
                    plan=[Fault(method="PUT", path_contains=f"{ckpt.name}/model.pt",
                                how="flip")]) as proxy:
        opts["client_kwargs"]["endpoint_url"] = proxy.endpoint
        start = time.monotonic()
        p = subprocess.run(
            [sys.executable, "-m", "ckptsync.cli", "push", str(local.directory),
             seaweedfs_remote.url], capture_output=True, text=True, timeout=60, cwd=REPO,
            env=cli_env(CKPTSYNC_RETRIES="1", CKPTSYNC_STORAGE_OPTIONS=json.dumps(opts)))
        took = time.monotonic() - start
    assert proxy.fired, "the upload was never cut"
    assert p.returncode == 1, p.stderr
    assert took < 20, f"the failed push took {took:.1f} s to exit"
    assert "Traceback" not in p.stderr and f"while pushing step 1 ({ckpt.name})" in p.stderr
    fs = fsspec.core.url_to_fs(seaweedfs_remote.url, **seaweedfs_remote.storage_options)[0]
    fs.invalidate_cache()
    assert not fs.exists(f"{seaweedfs_remote.path}/{ckpt.name}/ckptsync.json")


def test_ctrl_c_during_a_push_says_what_it_left_and_gc_collects_it(tmp_path: Path) -> None:
    """A Ctrl-C'd push says which checkpoint it abandoned (not committed), where
    its bytes are, and that gc collects them; gc --grace 0 then does."""
    import signal

    from ckptsync.remote import RemoteStore
    from tests.support.paths import PY, SCRIPTS, child_env

    local = LocalStore(tmp_path / "ckpts")
    ckpt = make_local(local, 160, size=4 * 1024 * 1024)
    remote = tmp_path / "remote" / "run"
    proc = subprocess.Popen([PY, str(SCRIPTS / "run_daemon.py"), "push", str(local.directory),
                             f"slowfile://{remote}"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=child_env(CKPTSYNC_TEST_SLOW_WRITE_S="0.2",
                                          CKPTSYNC_CHUNK_SIZE="65536"))
    deadline = time.monotonic() + 60
    while not any((remote / ckpt.name).glob("*")):  # its upload is under way
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert f"interrupted while pushing step 160 ({ckpt.name}): it was not committed" in err
    assert f"stay under slowfile://{remote}/{ckpt.name}/ as an uncommitted upload" in err
    assert "the next push sends it again from the start" in err and "ckptsync gc" in err
    assert "Traceback" not in err
    store = RemoteStore(f"file://{remote}")
    assert store.list() == []  # nothing committed
    p = run_cli("gc", f"file://{remote}", "--grace", "0")
    assert p.returncode == 0 and f"deleted leftover {ckpt.name}" in p.stdout, p.stderr
