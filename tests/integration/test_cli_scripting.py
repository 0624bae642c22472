"""What scripts and aws-cli/rclone/s5cmd users rely on. ``--step N`` and
unique name prefixes wherever a name is taken; ``ls --since/--limit``; ``pull --dry-run``;
labels say "step 160"; ``-q``; one end-of-transfer summary line; a usage error prints the
subcommand's usage and exits 2; bare ``ckptsync`` prints the help; every subcommand's help
ends with its exit codes; ``gc --dry-run`` says what it keeps and why; ``pull`` warns when
the local directory holds a newer checkpoint; a push stopped part way says what it left and
that ``gc`` collects it. Real remotes (file://, SeaweedFS), the CLI's own entry point."""

from __future__ import annotations

import json
import os
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from ckptsync.cli import COMMANDS, build_parser
from ckptsync.local import LocalCheckpoint, LocalStore
from ckptsync.manifest import Manifest, make_name
from tests.support.cli import run_cli
from tests.support.jsonlines import events, summary
from tests.support.remotes import Remote

pytestmark = pytest.mark.core


def make_local(store: LocalStore, step: int, *, age_h: float = 0.0,
               loss: float | None = None) -> LocalCheckpoint:
    st = store.staging(make_name(step))
    st.write_file("model.pt", os.urandom(30_000))
    st.write_file("optim.pt", os.urandom(1000))
    created = datetime.now(timezone.utc) - timedelta(hours=age_h)
    return st.commit(Manifest.new(step=step, files=st.entries, name=st.name, created=created,
                                  metrics={"loss": loss if loss is not None else 1.0 / step}))


@pytest.fixture
def pushed(remote: Remote, tmp_path: Path) -> tuple[str, dict[str, str], list[LocalCheckpoint]]:
    local = LocalStore(tmp_path / "ckpts")
    ckpts = [make_local(local, 20, age_h=5), make_local(local, 160, age_h=3),
             make_local(local, 161, age_h=1), make_local(local, 1600)]
    env = {"CKPTSYNC_STORAGE_OPTIONS": json.dumps(remote.storage_options)}
    p = run_cli("push", str(local.directory), remote.url, **env)
    assert p.returncode == 0, p.stderr
    return remote.url, env, ckpts


@pytest.mark.parametrize("remote", ["file", "seaweedfs"], indirect=True)
def test_step_and_unique_prefixes_wherever_a_name_is_taken(
        pushed: tuple[str, dict[str, str], list[LocalCheckpoint]], tmp_path: Path) -> None:
    url, env, ckpts = pushed
    by_step = {c.step: c for c in ckpts}
    p = run_cli("pull", url, str(tmp_path / "a"), "--step", "160", **env)
    assert p.returncode == 0, p.stderr
    assert [c.name for c in LocalStore(tmp_path / "a").list()] == [by_step[160].name]
    assert f"pulled {by_step[160].name} (step 160)" in p.stdout
    p = run_cli("pull", url, str(tmp_path / "b"), "--name", "step-000000000160", **env)
    assert p.returncode == 0, p.stderr  # a unique prefix: 160, not 1600 (zero-padded)
    assert [c.name for c in LocalStore(tmp_path / "b").list()] == [by_step[160].name]
    p = run_cli("verify", url, "--step", "20", "--json", **env)
    assert p.returncode == 0 and [e["name"] for e in events(p.stdout)] == [by_step[20].name]
    p = run_cli("verify", url, "--name", by_step[161].name[:20], **env)
    assert p.returncode == 0 and by_step[161].name in p.stdout and "(step 161)" in p.stdout
    # Several match: a usage error naming them; none: a failure naming what there is.
    p = run_cli("pull", url, str(tmp_path / "c"), "--name", "step-0000000001", **env)
    assert p.returncode == 2 and "names 2 checkpoints" in p.stderr, p.stderr
    assert by_step[160].name in p.stderr and "--step N" in p.stderr
    p = run_cli("pull", url, str(tmp_path / "c"), "--step", "7", **env)
    assert p.returncode == 1 and "no committed checkpoint of step 7" in p.stderr
    assert "20, 160, 161, 1600" in p.stderr
    p = run_cli("pull", url, str(tmp_path / "c"), "--step", "7", "--name", "x", **env)
    assert p.returncode == 2 and "not both" in p.stderr
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("remote", ["file"], indirect=True)
def test_ls_since_and_limit(pushed: tuple[str, dict[str, str], list[LocalCheckpoint]]) -> None:
    url, env, ckpts = pushed
    p = run_cli("ls", url, "--since", "2h", "--json", **env)
    assert p.returncode == 0, p.stderr
    assert [e["step"] for e in events(p.stdout)] == [161, 1600]
    p = run_cli("ls", url, "--limit", "3", "--json", **env)
    assert [e["step"] for e in events(p.stdout)] == [160, 161, 1600]
    p = run_cli("ls", url, "--since", "4h", "--limit", "1", **env)
    assert p.returncode == 0 and p.stdout.count("step-") == 1 and ckpts[-1].name in p.stdout
    assert "2 files" in p.stdout  # what each checkpoint holds
    p = run_cli("ls", url, "--since", "yesterday", **env)
    assert p.returncode == 2 and "30m, 2h or 7d" in p.stderr


@pytest.mark.parametrize("remote", ["file", "seaweedfs"], indirect=True)
def test_pull_dry_run_prints_what_it_would_restore_and_writes_nothing(
        pushed: tuple[str, dict[str, str], list[LocalCheckpoint]], tmp_path: Path) -> None:
    url, env, ckpts = pushed
    out = tmp_path / "restore"
    p = run_cli("pull", url, str(out), "--dry-run", **env)
    assert p.returncode == 0, p.stderr
    assert (f"would pull {ckpts[-1].name} (step 1600, " in p.stdout
            and "2 files: model.pt, optim.pt" in p.stdout), p.stdout
    p = run_cli("pull", url, str(out), "--dry-run", "--step", "20", "--json", **env)
    (would,) = events(p.stdout, "would_pull")
    assert (would["name"], would["step"], would["size"], would["paths"]) == (
        ckpts[0].name, 20, 31_000, ["model.pt", "optim.pt"])
    assert summary(p.stdout) == {"event": "summary", "command": "pull", "dry_run": True,
                                 "would_pull": 1, "exit_code": 0}
    assert not out.exists()


@pytest.mark.parametrize("remote", ["file"], indirect=True)
def test_quiet_summary_lines_and_labels(remote: Remote, tmp_path: Path) -> None:
    local = LocalStore(tmp_path / "ckpts")
    ckpts = [make_local(local, 160), make_local(local, 180)]
    p = run_cli("push", str(local.directory), remote.url)
    assert p.returncode == 0, p.stderr
    assert f"pushed {ckpts[0].name} (step 160, 30.3 KiB)" in p.stdout
    last = p.stdout.strip().splitlines()[-1]
    assert re.fullmatch(rf"2 pushed, 0 already in {re.escape(remote.url)} \(60\.5 KiB in "
                        r"[\d.]+ s, [\d.]+ MB/s\)", last), last
    p = run_cli("pull", remote.url, str(tmp_path / "out"))
    assert re.search(r"pulled \S+ \(step 180\) .*\(30\.3 KiB in [\d.]+ s, [\d.]+ MB/s\)",
                     p.stdout), p.stdout
    for argv in (["push", str(local.directory), remote.url], ["ls", remote.url],
                 ["verify", remote.url], ["pull", remote.url, str(tmp_path / "q")],
                 ["gc", remote.url, "--keep-last", "5"]):
        p = run_cli(*argv, "-q")
        assert p.returncode == 0 and p.stdout == "" and p.stderr == "", (argv, p)
    p = run_cli("ls", remote.url, "-q", "--json")  # -q never silences --json
    assert summary(p.stdout)["checkpoints"] == 2
    p = run_cli("pull", f"{remote.url}-typo", str(tmp_path / "q2"), "-q")
    assert p.returncode == 1 and "holds nothing at all" in p.stderr  # errors still said
    make_local(local, 200)
    p = run_cli("watch", str(local.directory), remote.url, "--once", "-q")  # the daemon's log:
    assert p.returncode == 0 and p.stdout == "" and p.stderr == "", p  # warnings and errors


def test_usage_errors_exit_2_with_the_subcommands_usage(tmp_path: Path) -> None:
    p = run_cli()
    assert p.returncode == 2 and p.stdout.startswith("usage: ckptsync") and "exit codes:" in \
        p.stdout  # bare ckptsync: the help (on stdout), exit 2 as aws does
    p = run_cli("ls", "file:///x", "--bogus")
    assert p.returncode == 2 and p.stderr.startswith("usage: ckptsync ls "), p.stderr
    assert "unrecognized arguments: --bogus" in p.stderr
    p = run_cli("push", str(tmp_path / "no-such-dir"), f"file://{tmp_path}/r")
    assert p.returncode == 2 and "no-such-dir does not exist" in p.stderr
    p = run_cli("ls", "file:///x", "--limit", "many")
    assert p.returncode == 2 and p.stderr.startswith("usage: ckptsync ls ")


def test_nosuch_storage_option_is_a_usage_error(seaweedfs_remote: Remote) -> None:
    env = {"CKPTSYNC_STORAGE_OPTIONS": json.dumps(seaweedfs_remote.storage_options)}
    p = run_cli("ls", seaweedfs_remote.url, "-o", "nosuch=1", "--allow-empty", **env)
    assert p.returncode == 2, p.stderr
    assert "storage option" in p.stderr and "nosuch" in p.stderr


@pytest.mark.parametrize("name", [*COMMANDS, "watch", "status"])
def test_every_subcommands_help_ends_with_its_exit_codes(name: str) -> None:
    p = run_cli(name, "--help")
    assert p.returncode == 0
    codes = p.stdout.split("exit codes:", 1)[1]
    listed = [int(c) for c in re.findall(r"^  (\d+) ", codes, flags=re.M)]
    assert {0, 1, 2, 130, 141} <= set(listed), (name, listed)
    assert (4 in listed) == (5 in listed) == (name == "pull")
    if name == "status":
        assert "1    checkpoints are pending" in codes and "3    the last upload attempt" in \
            codes
    assert build_parser()  # the one parser


@pytest.mark.parametrize("remote", ["file"], indirect=True)
def test_gc_dry_run_says_what_it_keeps_and_why(remote: Remote, tmp_path: Path) -> None:
    local = LocalStore(tmp_path / "ckpts")
    ckpts = [make_local(local, s, loss=loss)
             for s, loss in ((100, 0.5), (200, 0.1), (300, 0.4), (400, 0.3), (500, 0.2))]
    assert run_cli("push", str(local.directory), remote.url).returncode == 0
    p = run_cli("gc", remote.url, "--keep-last", "2", "--keep-best", "loss:min:1",
                "--keep-every", "300", "--dry-run", "--json")
    assert p.returncode == 0, p.stderr
    assert [e["name"] for e in events(p.stdout, "would_delete")] == [ckpts[0].name]
    kept = {e["name"]: e["reasons"] for e in events(p.stdout, "would_keep")}
    assert kept == {ckpts[1].name: ["keep-best loss:min:1 (0.1)"],
                    ckpts[2].name: ["keep-every 300"],
                    ckpts[3].name: ["keep-last 2"],
                    ckpts[4].name: ["newest (never deleted)", "keep-last 2"]}
    p = run_cli("gc", remote.url, "--keep-last", "2", "--dry-run")
    assert f"would keep {ckpts[4].name} (step 500): newest (never deleted); keep-last 2" in \
        p.stdout
    assert len(LocalStore(tmp_path / "ckpts").list()) == 5


@pytest.mark.parametrize("remote", ["file"], indirect=True)
def test_pull_warns_when_the_local_directory_holds_a_newer_checkpoint(
        remote: Remote, tmp_path: Path) -> None:
    local = LocalStore(tmp_path / "ckpts")
    old = make_local(local, 100)
    assert run_cli("push", str(local.directory), remote.url).returncode == 0
    newer = make_local(local, 200)  # saved after the push: not in the remote
    p = run_cli("pull", remote.url, str(local.directory), "--json")
    assert p.returncode == 0, p.stderr
    assert (f"already holds step 200 ({newer.name}), newer than step 100" in p.stderr
            and "takes that one, not the pulled one" in p.stderr), p.stderr
    assert events(p.stdout, "pulled")[0]["name"] == old.name


@pytest.mark.parametrize("remote", ["file"], indirect=True)
def test_a_push_stopped_part_way_says_what_it_left(remote: Remote, tmp_path: Path) -> None:
    """A local file changed after its checkpoint was committed: the upload stops part way."""
    local = LocalStore(tmp_path / "ckpts")
    ckpt = make_local(local, 160)
    model = ckpt.file("model.pt")
    model.write_bytes(b"x" * model.stat().st_size)
    p = run_cli("push", str(local.directory), remote.url)
    assert p.returncode == 1, p.stdout
    assert f"stopped on an error while pushing step 160 ({ckpt.name})" in p.stderr, p.stderr
    assert "nothing partial is visible" in p.stderr and f"ckptsync gc {remote.url}" in p.stderr
    assert "content no longer matches its manifest" in p.stderr
