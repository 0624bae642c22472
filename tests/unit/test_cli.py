"""The ``ckptsync`` command line: what each command prints and its exit code, through its
entry point in this process (tests/support/cli.py ``run_cli``); a subprocess where the test is
about the process (a missing package, torch-free help, peak memory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import fsspec
import pytest

from ckptsync.local import LocalCheckpoint, LocalStore
from ckptsync.manifest import MAX_MANIFEST_BYTES, Manifest, make_name
from tests.support.cli import run_cli
from tests.support.formats import put_tree, rewrite_as_v1
from tests.support.jsonlines import events, json_lines, summary
from tests.support.paths import REPO

pytestmark = pytest.mark.core


def ckptsync(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env=env)


def make_local(store: LocalStore, step: int, metrics: dict[str, float]) -> LocalCheckpoint:
    st = store.staging(make_name(step))
    st.write_file("model.pt", os.urandom(50_000))
    st.write_file("rng.pt", step.to_bytes(8, "little"))
    return st.commit(Manifest.new(step=step, files=st.entries, name=st.name, metrics=metrics))


@pytest.fixture
def setup(tmp_path: Path) -> tuple[LocalStore, list[LocalCheckpoint], str]:
    local = LocalStore(tmp_path / "ckpts")
    ckpts = [make_local(local, s, {"val_loss": 1.0 / s}) for s in (1, 2, 3)]
    return local, ckpts, f"file://{tmp_path}/remote/run"


def no_traceback(p: subprocess.CompletedProcess[str]) -> bool:
    return "Traceback" not in p.stderr and "Traceback" not in p.stdout


def test_push_ls_pull_verify_gc(setup: Any, tmp_path: Path) -> None:
    local, ckpts, url = setup
    p = ckptsync("push", str(local.directory), url, "--json")
    assert p.returncode == 0, p.stderr
    assert [(e["event"], e["name"], e["step"]) for e in events(p.stdout)] == [
        ("pushed", c.name, c.step) for c in ckpts]
    assert summary(p.stdout) == {"event": "summary", "command": "push", "dry_run": False,
                                 "pushed": 3, "skipped": 0, "bytes": 3 * 50_008,
                                 "exit_code": 0}
    p = ckptsync("push", str(local.directory), url)
    assert p.returncode == 0 and "0 pushed, 3 already" in p.stdout
    p = ckptsync("push", str(local.directory), url, "--json")
    assert [(e["event"], e["name"]) for e in events(p.stdout)] == [
        ("skipped", c.name) for c in ckpts]
    assert summary(p.stdout)["pushed"] == 0 and summary(p.stdout)["skipped"] == 3

    p = ckptsync("ls", url, "--json")
    rows = events(p.stdout, "checkpoint")
    assert [(r["name"], r["step"], r["status"]) for r in rows] == [
        (c.name, c.step, "valid") for c in ckpts]
    assert summary(p.stdout) == {"event": "summary", "command": "ls", "checkpoints": 3,
                                 "valid": 3, "partial": 0, "corrupt": 0, "uncommitted": 0,
                                 "exit_code": 0}
    assert rows[0]["metrics"] == {"val_loss": 1.0} and rows[0]["size"] == 50_008
    p = ckptsync("ls", url)
    assert p.returncode == 0
    header, *lines = p.stdout.splitlines()
    assert header.split() == ["NAME", "STEP", "CREATED", "(UTC)", "SIZE", "FILES", "METRICS",
                              "STATUS"]
    assert len(lines) == 3 and lines[-1].startswith(ckpts[-1].name)
    assert "val_loss=0.3333" in p.stdout

    p = ckptsync("pull", url, str(tmp_path / "restore"), "--json")
    assert p.returncode == 0, p.stderr
    assert [e["name"] for e in events(p.stdout, "pulled")] == [ckpts[-1].name]
    assert summary(p.stdout)["pulled"] == 1 and summary(p.stdout)["exit_code"] == 0
    got = LocalStore(tmp_path / "restore").get(ckpts[-1].name)
    assert got.file("model.pt").read_bytes() == ckpts[-1].file("model.pt").read_bytes()
    p = ckptsync("pull", url, str(tmp_path / "restore1"), "--name", ckpts[0].name)
    assert p.returncode == 0 and ckpts[0].name in p.stdout

    p = ckptsync("verify", url)
    assert p.returncode == 0 and p.stdout.count("ok ") == 3
    p = ckptsync("verify", url, "--json")
    assert [(e["name"], e["ok"]) for e in events(p.stdout, "verified")] == [
        (c.name, True) for c in ckpts]
    assert summary(p.stdout) == {"event": "summary", "command": "verify", "verified": 3,
                                 "ok": 3, "corrupt": 0, "exit_code": 0}

    p = ckptsync("gc", url, "--keep-last", "1", "--keep-best", "val_loss:max:1", "--dry-run",
                 "--json")
    assert p.returncode == 0, p.stderr
    assert [(e["event"], e["name"], e.get("kind")) for e in events(p.stdout)] == [
        ("would_delete", ckpts[1].name, "checkpoint"), ("would_keep", ckpts[0].name, None),
        ("would_keep", ckpts[2].name, None)]
    assert [e["reasons"] for e in events(p.stdout, "would_keep")] == [
        ["keep-best val_loss:max:1 (1)"], ["newest (never deleted)", "keep-last 1"]]
    assert summary(p.stdout) == {"event": "summary", "command": "gc", "dry_run": True,
                                 "deleted": 1, "leftovers": 0, "exit_code": 0}
    p = ckptsync("gc", url, "--keep-last", "1", "--keep-best", "val_loss:max:1")
    assert p.returncode == 0 and f"deleted {ckpts[1].name}" in p.stdout
    rows = events(ckptsync("ls", url, "--json").stdout)
    assert [r["name"] for r in rows] == [ckpts[0].name, ckpts[2].name]


def test_verify_reports_corruption_with_nonzero_exit(setup: Any, tmp_path: Path) -> None:
    local, ckpts, url = setup
    assert ckptsync("push", str(local.directory), url).returncode == 0
    path = tmp_path / "remote" / "run" / ckpts[-1].name / "model.pt"
    data = bytearray(path.read_bytes())
    data[10] ^= 1
    path.write_bytes(bytes(data))
    p = ckptsync("verify", url)
    assert p.returncode == 1 and no_traceback(p)
    assert f"CORRUPT  {ckpts[-1].name}" in p.stdout and "blake3 digest" in p.stdout
    p = ckptsync("verify", url, "--name", ckpts[-1].name, "--json")
    assert p.returncode == 1 and events(p.stdout, "verified")[0]["ok"] is False
    assert summary(p.stdout)["corrupt"] == 1 and summary(p.stdout)["exit_code"] == 1
    assert ckptsync("verify", url, "--name", ckpts[0].name).returncode == 0
    assert ckptsync("verify", url, "--quick").returncode == 0  # sizes still match
    (path.parent / "ckptsync.json").write_text("{not json")
    p = ckptsync("verify", url, "--quick")
    assert p.returncode == 1 and "not valid JSON" in p.stdout and no_traceback(p)
    p = ckptsync("ls", url, "--json")
    assert events(p.stdout)[-1]["status"] == "corrupt" and summary(p.stdout)["corrupt"] == 1
    path.parent.joinpath("ckptsync.json").write_bytes(ckpts[-1].manifest.to_json())
    # Pull falls back to the previous valid checkpoint, and says so: on stderr, in the JSON,
    # and with exit code 4, so that a resume script knows it lost training.
    p = ckptsync("pull", url, str(tmp_path / "restore"), "--json")
    assert p.returncode == 4 and no_traceback(p), p.stderr
    lines = json_lines(p.stdout)
    assert [(o["event"], o.get("name")) for o in lines] == [
        ("skipped", ckpts[-1].name), ("pulled", ckpts[1].name), ("summary", None)]
    assert "digest does not match" in lines[0]["problem"]
    assert summary(p.stdout) == {"event": "summary", "command": "pull", "pulled": 1,
                                 "skipped": 1, "fell_back": True, "bytes": 50_008,
                                 "exit_code": 4}
    assert (f"pulled {ckpts[1].name}, not the newest committed checkpoint {ckpts[-1].name}"
            in p.stderr) and "--allow-fallback" in p.stderr
    p = ckptsync("pull", url, str(tmp_path / "restore2"), "--allow-fallback")
    assert p.returncode == 0 and ckpts[1].name in p.stdout
    assert "not the newest committed checkpoint" in p.stderr
    p = ckptsync("pull", url, str(tmp_path / "restore3"), "--name", ckpts[1].name)
    assert p.returncode == 0 and "not the newest" not in p.stderr


def test_pull_help_documents_the_fallback_exit_code() -> None:
    p = ckptsync("pull", "--help")
    assert p.returncode == 0
    assert "--allow-fallback" in p.stdout
    assert "4    pull fell back to an older checkpoint" in p.stdout


def test_truncated_file_shows_partial(setup: Any, tmp_path: Path) -> None:
    local, ckpts, url = setup
    assert ckptsync("push", str(local.directory), url).returncode == 0
    path = tmp_path / "remote" / "run" / ckpts[-1].name / "model.pt"
    path.write_bytes(path.read_bytes()[:100])
    rows = events(ckptsync("ls", url, "--json").stdout)
    assert rows[-1]["status"] == "partial" and "truncated" in rows[-1]["problem"]
    assert "partial" in ckptsync("ls", url).stdout


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["ls", "nosuch://bucket/run"], 2, "unknown URL scheme"),
        (["pull", "{url}", "{tmp}/out"], 1, "holds nothing at all"),  # a typo, not a fresh run
        (["pull", "{url}", "{tmp}/out", "--allow-empty"], 5, "nothing to pull"),
        (["verify", "{url}", "--name", "step-000000000001-20260101T000000000000Z-abcdef"], 1,
         "no committed checkpoint"),
        (["push", "{tmp}/does-not-exist", "{url}"], 2, "does not exist"),
        (["gc", "{url}", "--keep-best", "nonsense"], 2, "invalid keep-best rule"),
        (["ls", "{url}", "-o", "novalue"], 2, "KEY=VALUE"),
    ],
)
def test_errors_exit_codes_without_traceback(tmp_path: Path, args: list[str], code: int,
                                             message: str) -> None:
    url = f"file://{tmp_path}/remote/run"
    p = ckptsync(*[a.format(url=url, tmp=tmp_path) for a in args])
    assert p.returncode == code, (p.stdout, p.stderr)
    assert message in p.stderr
    assert p.stderr.startswith("ckptsync: nothing" if code == 5 else "ckptsync: error:")
    assert no_traceback(p)


def test_usage_errors_exit_2() -> None:
    assert ckptsync().returncode == 2
    assert ckptsync("frobnicate").returncode == 2
    p = ckptsync("pull")
    assert p.returncode == 2 and "usage" in p.stderr


def test_missing_backend_package_exit_2(tmp_path: Path) -> None:
    script = ("import sys; sys.modules['s3fs'] = None\n"
              "from ckptsync.cli import main\n"
              "sys.exit(main(['ls', 's3://bucket/run']))")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=60, cwd=REPO)
    assert p.returncode == 2 and "pip install 'ckptsync[s3]'" in p.stderr and no_traceback(p)


def test_help_without_torch() -> None:
    script = ("import sys; sys.modules['torch'] = None\n"
              "from ckptsync.cli import main\n"
              "main(['--help'])")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=60, cwd=REPO)
    assert p.returncode == 0, p.stderr
    for cmd in ("push", "pull", "ls", "verify", "gc"):
        assert cmd in p.stdout


def test_empty_remote_ls(tmp_path: Path) -> None:
    """A prefix that holds nothing is not an empty run (a typo), unless the user
    says a new run is expected there."""
    p = ckptsync("ls", f"file://{tmp_path}/nothing", "--json")
    assert p.returncode == 1 and "holds nothing at all" in p.stderr
    assert summary(p.stdout)["exit_code"] == 1
    p = ckptsync("ls", f"file://{tmp_path}/nothing", "--allow-empty", "--json")
    assert p.returncode == 0 and events(p.stdout) == []
    assert summary(p.stdout)["checkpoints"] == 0
    p = ckptsync("ls", f"file://{tmp_path}/nothing", env={"CKPTSYNC_ALLOW_EMPTY": "1"})
    assert p.returncode == 0 and "no checkpoints" in p.stdout


def test_env_config_is_validated(tmp_path: Path) -> None:
    p = ckptsync("ls", f"file://{tmp_path}/x", env={"CKPTSYNC_MAX_WORKERS": "lots"})
    assert p.returncode == 2 and "CKPTSYNC_MAX_WORKERS" in p.stderr


def test_tqdm_progress_from_threads() -> None:
    import threading

    from ckptsync.progress import TqdmProgress

    bar = TqdmProgress()
    bar.start(4000, "push step-1")
    threads = [threading.Thread(target=lambda: [bar.update(10) for _ in range(100)])
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert bar._bar is not None and bar._bar.n == 4000
    bar.close()
    assert bar._bar is None


def test_storage_options_from_env_and_flags(s3_remote: Any, tmp_path: Path) -> None:
    """Credentials can come from CKPTSYNC_STORAGE_OPTIONS (as for the sidecar); -o wins per key."""
    local = LocalStore(tmp_path / "ckpts")
    ckpt = make_local(local, 5, {})
    opts = dict(s3_remote.storage_options)
    env = {"CKPTSYNC_STORAGE_OPTIONS": json.dumps(opts)}
    p = ckptsync("push", str(local.directory), s3_remote.url, "--no-progress", env=env)
    assert p.returncode == 0, p.stderr
    bad = {**opts, "secret": "wrong-secret"}
    p = ckptsync("ls", s3_remote.url, "--json",
                 env={"CKPTSYNC_STORAGE_OPTIONS": json.dumps(bad)})
    assert p.returncode != 0 and no_traceback(p) and "wrong-secret" not in p.stderr
    p = ckptsync("ls", s3_remote.url, "--json", "-o", f"secret={opts['secret']}",
                 env={"CKPTSYNC_STORAGE_OPTIONS": json.dumps(bad)})
    assert p.returncode == 0, p.stderr
    assert [row["name"] for row in events(p.stdout)] == [ckpt.name]
    p = ckptsync("ls", s3_remote.url, env={"CKPTSYNC_STORAGE_OPTIONS": "[1, 2]"})
    assert p.returncode == 2 and "CKPTSYNC_STORAGE_OPTIONS" in p.stderr


def _remote_for(kind: str, tmp_path: Path, request: pytest.FixtureRequest
                ) -> tuple[str, dict[str, str], Any, str]:
    """(url, env, fsspec filesystem, remote root path) of a file:// or an S3 remote."""
    if kind == "file":
        root = tmp_path / "remote" / "run"
        root.mkdir(parents=True)
        return f"file://{root}", {}, fsspec.filesystem("file"), str(root)
    remote = request.getfixturevalue("s3_remote")
    env = {"CKPTSYNC_STORAGE_OPTIONS": json.dumps(remote.storage_options)}
    return remote.url, env, remote.fs(), remote.path


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_v1_checkpoint_written_the_old_way(kind: str, tmp_path: Path,
                                           request: pytest.FixtureRequest) -> None:
    """``ls``, ``verify`` and ``pull`` read a ``ckptsync/1`` checkpoint (sha256
    entries, no self-digest) next to format 2 ones."""
    url, env, fs, root = _remote_for(kind, tmp_path, request)
    local = LocalStore(tmp_path / "ckpts")
    old = make_local(local, 1, {"val_loss": 1.0})
    rewrite_as_v1(old.path)
    put_tree(fs, old.path, f"{root}/{old.name}")
    new = make_local(local, 2, {"val_loss": 0.5})
    assert ckptsync("push", str(local.directory), url, env=env).returncode == 0
    rows = events(ckptsync("ls", url, "--json", env=env).stdout)
    assert [(r["name"], r["step"], r["status"]) for r in rows] == [
        (old.name, 1, "valid"), (new.name, 2, "valid")]
    p = ckptsync("verify", url, env=env)
    assert p.returncode == 0 and p.stdout.count("ok ") == 2, p.stdout + p.stderr
    p = ckptsync("pull", url, str(tmp_path / "restore"), "--name", old.name, env=env)
    assert p.returncode == 0, p.stderr
    got = LocalStore(tmp_path / "restore").get(old.name)
    assert got.manifest.format == "ckptsync/1"
    assert got.file("model.pt").read_bytes() == old.file("model.pt").read_bytes()
    fs.pipe_file(f"{root}/{old.name}/model.pt", b"x" * old.manifest.files[0].size)
    fs.invalidate_cache()
    p = ckptsync("verify", url, "--name", old.name, env=env)
    assert p.returncode == 1 and "sha256 digest does not match" in p.stdout and no_traceback(p)


def _peak_rss_kib(*args: str, env: dict[str, str]) -> tuple[int, str, int]:
    """Run ``ckptsync ARGS`` as the only child of a small wrapper that reports the child's
    peak RSS: (exit code, stdout, peak RSS in KiB)."""
    wrapper = ("import resource, subprocess, sys\n"
               "p = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, text=True)\n"
               "sys.stdout.write(p.stdout)\n"
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
               "sys.exit(p.returncode)\n")
    p = subprocess.run([sys.executable, "-c", wrapper, sys.executable, "-m", "ckptsync.cli", *args],
                       capture_output=True, text=True, timeout=120, cwd=REPO,
                       env={**os.environ, "CKPTSYNC_RETRIES": "2", **env})
    return p.returncode, p.stdout, int(p.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["file", pytest.param("s3", marks=pytest.mark.full)])
def test_an_oversized_manifest_is_refused_without_being_read(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A manifest four times the read bound is reported (path, size, bound) by ``ls`` and
    ``verify``, skipped by ``pull``, and none of them grows by what reading it would take (at
    most the bound is read of it)."""
    url, env, fs, root = _remote_for(kind, tmp_path, request)
    local = LocalStore(tmp_path / "ckpts")
    good = make_local(local, 1, {})
    assert ckptsync("push", str(local.directory), url, env=env).returncode == 0
    base = {cmd: _peak_rss_kib(*args, env=env)[2] for cmd, args in {
        "ls": ("ls", url, "--json"), "verify": ("verify", url),
        "pull": ("pull", url, str(tmp_path / "base")),
    }.items()}
    big, size = make_name(2), 4 * MAX_MANIFEST_BYTES
    fs.makedirs(f"{root}/{big}", exist_ok=True)
    fs.pipe_file(f"{root}/{big}/model.pt", b"m")
    fs.pipe_file(f"{root}/{big}/ckptsync.json", b" " * size)
    fs.invalidate_cache()

    code, out, ls_rss = _peak_rss_kib("ls", url, "--json", env=env)
    rows = {r["name"]: r for r in events(out)}
    assert code == 0 and rows[good.name]["status"] == "valid"
    problem = rows[big]["problem"]
    assert rows[big]["status"] == "corrupt" and f"{big}/ckptsync.json" in problem
    assert f"{size:,} bytes" in problem and f"{MAX_MANIFEST_BYTES:,}-byte bound" in problem
    code, out, verify_rss = _peak_rss_kib("verify", url, env=env)
    assert code == 1 and f"CORRUPT  {big}" in out and "bound" in out
    code, out, pull_rss = _peak_rss_kib("pull", url, str(tmp_path / "restore"), env=env)
    assert code == 4 and good.name in out  # it fell back past the refused one, and says so
    grown = {"ls": ls_rss - base["ls"], "verify": verify_rss - base["verify"],
             "pull": pull_rss - base["pull"]}
    assert max(grown.values()) < size // 1024 * 3 // 4, f"peak RSS grew (KiB): {grown}"
