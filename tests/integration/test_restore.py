"""Restore picks the newest *usable* checkpoint, local or remote, and says so loudly when that
is not the newest committed one; one directory has one writing Checkpointer.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptsync import Checkpointer, ConfigError
from ckptsync.local import LocalCheckpoint, LocalStore
from ckptsync.manifest import MANIFEST_NAME, Manifest, make_name
from ckptsync.remote import RemoteStore
from tests.support.helpers import child_env
from tests.support.remotes import Remote

pytestmark = pytest.mark.core


def _state(seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    return {"model": torch.nn.Linear(4, 3), "table": {"w": torch.randn(5), "step": seed}}


def _assert_loaded(state: dict[str, Any], expected: dict[str, Any]) -> None:
    assert torch.equal(state["model"].weight, expected["model"].weight)
    assert torch.equal(state["table"]["w"], expected["table"]["w"])
    assert state["table"]["step"] == expected["table"]["step"]


def _save(d: Path, *steps: int, **kwargs: Any) -> list[Manifest]:
    """Save ``_state(step)`` at each step; the manifests, oldest first."""
    with Checkpointer(d, **kwargs) as ck:
        for s in steps:
            ck.save(s, **_state(s)).wait()
        return ck.list()


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


def _commit(d: Path, step: int, files: dict[str, bytes]) -> LocalCheckpoint:
    """A committed checkpoint holding exactly ``files`` (hashes true to the bytes)."""
    st = LocalStore(d).staging(make_name(step))
    for rel, data in files.items():
        st.write_file(rel, data)
    return st.commit(Manifest.new(step=step, files=st.entries, name=st.name))


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


class NeedsUnsafePickle:
    """Loadable only with weights_only=False: ckptsync never does that."""


# --------------------------------------------------------------------------- fallback, loudly
def test_a_fallback_is_reported_in_the_result_the_log_and_on_stderr(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    d = tmp_path / "ck"
    old, new = _save(d, 1, 2)
    bad = d / new.name / "model.pt"
    _flip(bad)
    fresh = _state(9)
    with Checkpointer(d) as ck:
        info = ck.restore(**fresh)
    assert info is not None and info.name == old.name
    _assert_loaded(fresh, _state(1))
    assert info.fell_back
    assert [n for n, _ in info.skipped] == [new.name] and str(bad) in info.skipped[0][1]
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if "not the newest" in ln)
    assert old.name in line and new.name in line and str(bad) in line, err
    assert "WARNING" in caplog.text and new.name in caplog.text


def test_restoring_the_newest_is_not_a_fallback(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "ck"
    _, new = _save(d, 1, 2)
    with Checkpointer(d) as ck:
        info = ck.restore(**_state(9))
    assert info is not None and info.name == new.name
    assert not info.fell_back and info.skipped == ()
    assert "not the newest" not in capsys.readouterr().err


# --------------------------------------------------------------------------- local and remote
@pytest.mark.parametrize("damaged", ["model.pt", MANIFEST_NAME])
def test_a_corrupt_local_copy_loses_to_the_remote_copy_of_the_same_step(
        tmp_path: Path, file_remote: Remote, damaged: str) -> None:
    d = tmp_path / "ck"
    _, new = _save(d, 1, 2, remote=file_remote.url)
    bad = d / new.name / damaged
    if damaged == MANIFEST_NAME:
        bad.write_bytes(bad.read_bytes()[:40])  # a torn manifest: the copy is not committed
    else:
        _flip(bad)
    fresh = _state(9)
    with Checkpointer(d, remote=file_remote.url) as ck:
        info = ck.restore(**fresh)
    assert info is not None and info.name == new.name, "restored an older local checkpoint"
    _assert_loaded(fresh, _state(2))
    # The same checkpoint, from another copy: not a fallback, but the bad copy is named.
    assert not info.fell_back
    assert [n for n, _ in info.skipped] == [new.name] and str(bad) in info.skipped[0][1]
    store = LocalStore(d)
    store.verify(store.get(new.name))  # the local copy was replaced by the good one


def test_a_fresh_machine_falls_back_to_an_older_remote_checkpoint_and_says_so(
        tmp_path: Path, file_remote: Remote) -> None:
    old, new = _save(tmp_path / "gone", 1, 2, remote=file_remote.url)
    store = RemoteStore(file_remote.url)
    remote_file = Path(store.root) / new.name / "model.pt"
    _flip(remote_file)
    fresh = _state(9)
    with Checkpointer(tmp_path / "fresh", remote=file_remote.url) as ck:
        info = ck.restore(**fresh)
    assert info is not None and info.name == old.name and info.fell_back
    _assert_loaded(fresh, _state(1))
    assert [n for n, _ in info.skipped] == [new.name]
    assert "digest does not match" in info.skipped[0][1]


# --------------------------------------------------------------------------- usable
def test_a_newest_checkpoint_listing_no_files_is_passed_over(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    old, = _save(d, 1)
    empty = _commit(d, 2, {})
    fresh = _state(9)
    with Checkpointer(d) as ck:
        info = ck.restore(**fresh)
    assert info is not None and info.name == old.name and info.fell_back
    _assert_loaded(fresh, _state(1))
    assert info.skipped[0][0] == empty.name and "no files" in info.skipped[0][1]


def test_a_newest_checkpoint_without_a_requested_object_is_passed_over(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    old, = _save(d, 1)
    with Checkpointer(d) as ck:
        ck.save(2, model=_state(2)["model"]).wait()  # no "table"
        new = ck.list()[-1]
    fresh = _state(9)
    with Checkpointer(d) as ck:
        info = ck.restore(**fresh)
    assert info is not None and info.name == old.name and info.fell_back
    _assert_loaded(fresh, _state(1))
    assert info.skipped[0][0] == new.name and "table" in info.skipped[0][1]


def test_an_object_no_checkpoint_has_is_still_a_usage_error(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    _save(d, 1, 2)
    with Checkpointer(d) as ck, pytest.raises(ConfigError, match="'ema'") as e:
        ck.restore(ema={"x": torch.zeros(1)}, **_state(9))
    assert "model" in str(e.value) and "table" in str(e.value)


def test_a_newest_file_that_weights_only_refuses_is_passed_over(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    old, = _save(d, 1)
    evil = _commit(d, 2, {"model.pt": _torch_bytes({"w": NeedsUnsafePickle()}),
                          "table.pt": _torch_bytes({"w": torch.zeros(5), "step": 2})})
    fresh = _state(9)
    with Checkpointer(d) as ck:
        info = ck.restore(**fresh)
    assert info is not None and info.name == old.name and info.fell_back
    _assert_loaded(fresh, _state(1))
    assert info.skipped[0][0] == evil.name and "model.pt" in info.skipped[0][1]


def test_local_retention_counts_only_usable_checkpoints(tmp_path: Path) -> None:
    """keep_last=2 keeps the last two *good* checkpoints: one listing no files neither
    protects itself nor pushes a good one out."""
    d = tmp_path / "ck"
    good1, = _save(d, 1)
    empty = _commit(d, 2, {})
    with Checkpointer(d, keep_last=2) as ck:
        ck.save(3, **_state(3)).wait()
        kept = [m.name for m in ck.list()]
    assert good1.name in kept, "retention deleted the last good checkpoint but one"
    assert empty.name in kept  # invalid ones are left for a human, like remote ones


# --------------------------------------------------------------------------- one writer
def test_a_second_checkpointer_on_one_directory_is_refused_naming_the_holder(
        tmp_path: Path) -> None:
    d = tmp_path / "ck"
    first = Checkpointer(d)
    try:
        with pytest.raises(ConfigError) as e:
            Checkpointer(d)
        msg = str(e.value)
        assert str(d) in msg and f"pid {os.getpid()}" in msg and socket.gethostname() in msg
        first.save(1, **_state(1)).wait()  # the first one is untouched
    finally:
        first.close()
    with Checkpointer(d) as again:  # close() released the directory
        assert [m.step for m in again.list()] == [1]
    Checkpointer(d).list()  # one never closed releases it when it is collected
    with Checkpointer(d) as again:
        assert again.restore(**_state(9)) is not None


def test_a_checkpointer_in_another_process_is_named(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys\nfrom ckptsync import Checkpointer\n"
         "ck = Checkpointer(sys.argv[1])\nprint('ready', flush=True)\nsys.stdin.read()\n"
         "ck.close()\n", str(d)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env())
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        with pytest.raises(ConfigError, match=f"pid {holder.pid} on {socket.gethostname()}"):
            Checkpointer(d)
    finally:
        holder.communicate("", timeout=60)
    assert holder.returncode == 0
    with Checkpointer(d):  # its process closed it
        pass


def test_the_daemon_watches_a_directory_a_checkpointer_writes(
        tmp_path: Path, file_remote: Remote) -> None:
    d = tmp_path / "ck"
    with Checkpointer(d) as ck:
        ck.save(1, **_state(1)).wait()
        p = subprocess.run([sys.executable, "-m", "ckptsync.cli", "watch", str(d),
                            file_remote.url, "--once"],
                           capture_output=True, text=True, timeout=120, env=child_env())
        assert p.returncode == 0, p.stderr
        ck.save(2, **_state(2)).wait()  # the trainer goes on writing
        local = [m.name for m in ck.list()]
    assert [m.name for m in RemoteStore(file_remote.url).list()] == local[:1]
