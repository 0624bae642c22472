"""The upload process (ckptsync/remote/process.py): a Checkpointer's pushes to an object store
run in a niced process of their own, as the daemon's do, so that their CPU does not compete
with the training loop; the queue, retries, status and retention stay in the trainer.

Against a real S3 (SeaweedFS): the bytes leave from the child (its own I/O counters), the
checkpoint restores exactly, a child killed mid-push is replaced and the push lands, the
child's errors arrive in the trainer with their type, a child that cannot start leaves the
uploads to a thread (said loudly), and a trainer killed with SIGKILL leaves no child behind.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from ckptsync import Checkpointer
from ckptsync.errors import ConfigError
from ckptsync.remote import RemoteStore
from tests.support import slowfs
from tests.support.paths import child_env
from tests.support.remotes import Remote
from tests.support.watchkit import pid_alive as alive

pytestmark = pytest.mark.core

MiB = 1024 * 1024


def process_io(pid: int) -> dict[str, int]:
    """The kernel's I/O counters of ``pid`` (``rchar``: bytes read by read calls)."""
    text = Path(f"/proc/{pid}/io").read_text()
    return {k: int(v) for k, v in (line.split(": ") for line in text.splitlines())}


def model(seed: int, out: int = 512) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(1024, out)


def restored(remote: Remote, directory: Path, out: int = 512) -> torch.nn.Module:
    m = model(99, out)
    with Checkpointer(directory, remote=remote.url,
                      storage_options=remote.storage_options) as c:
        info = c.restore(model=m)
    assert info is not None and info.pulled_from is not None
    return m


def test_pushes_to_s3_leave_from_a_niced_process_and_restore_exactly(
        s3_remote: Remote, tmp_path: Path) -> None:
    m = model(0, out=4096)  # 16 MiB of weights
    with Checkpointer(tmp_path / "ckpt", remote=s3_remote.url,
                      storage_options=s3_remote.storage_options) as c:
        c.save(1, model=m)
        assert c.wait(120)
        pid = c.status().upload_pid
        assert pid is not None and pid != os.getpid() and alive(pid)
        assert os.getpriority(os.PRIO_PROCESS, pid) == os.getpriority(os.PRIO_PROCESS, 0) + 10
        before = process_io(pid)["rchar"]
        with torch.no_grad():
            m.weight.add_(1.0)
        c.save(2, model=m)
        assert c.wait(120)
        assert c.status().upload_pid == pid  # one persistent child
        # The child read the second checkpoint's 16 MiB to send them (no imports left to do).
        assert process_io(pid)["rchar"] - before >= 16 * MiB
        assert c.status().newest_remote_step == 2
    assert not alive(pid)  # close() ended it
    assert torch.equal(restored(s3_remote, tmp_path / "fresh", out=4096).weight, m.weight)


@pytest.mark.full
@pytest.mark.parametrize("backend", ["gcs", "gdrive"])
def test_gcs_and_drive_pushes_leave_from_the_upload_process_too(
        backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    # The other backends whose pushes default to the process (Backend.upload_process): the
    # child opens them from the same URL and options (an emulator's endpoint, a Drive login).
    remote: Remote = request.getfixturevalue(f"{backend}_remote")
    m = model(3)
    with Checkpointer(tmp_path / "ckpt", remote=remote.url,
                      storage_options=remote.storage_options) as c:
        c.save(4, model=m)
        assert c.wait(120)
        pid = c.status().upload_pid
        assert pid is not None and alive(pid)
        assert c.status().newest_remote_step == 4
    assert torch.equal(restored(remote, tmp_path / "fresh").weight, m.weight)


def test_a_killed_upload_process_is_replaced_and_the_checkpoint_lands(
        s3_remote: Remote, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "ckptsync")
    m = model(1, out=32 * 1024)  # 128 MiB: a push that takes a while
    with Checkpointer(tmp_path / "ckpt", remote=s3_remote.url,
                      storage_options=s3_remote.storage_options) as c:
        c.save(7, model=m)
        fs, bucket = s3_remote.fs(), s3_remote.extra["bucket"]
        deadline = time.monotonic() + 60
        while True:  # until the bucket holds the child's multipart upload, unfinished
            pid = c.status().upload_pid
            if pid is not None and fs.list_multipart_uploads(bucket):
                break
            assert time.monotonic() < deadline, "the upload process never started sending"
            time.sleep(0.005)
        os.kill(pid, signal.SIGKILL)
        assert c.wait(120)
        assert c.status().upload_pid not in (None, pid)  # a new child pushed it
        assert c.status().newest_remote_step == 7
    assert any("exited mid-push" in r.getMessage() and "retried" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    store = RemoteStore(s3_remote.url, s3_remote.storage_options)
    assert [v.step for v in store.list()] == [7]  # nothing partial beside it
    assert torch.equal(restored(s3_remote, tmp_path / "fresh", out=32 * 1024).weight, m.weight)


def test_the_childs_refusal_reaches_the_trainer_with_its_type(
        s3_remote: Remote, tmp_path: Path) -> None:
    with Checkpointer(tmp_path / "run-a", remote=s3_remote.url,
                      storage_options=s3_remote.storage_options) as a:
        a.save(1, model=model(0))
        assert a.wait(60)
    # A second directory writing into run-a's prefix is a second run: refused in the child,
    # raised here as the ConfigError it is, naming the prefix and what to do.
    b = Checkpointer(tmp_path / "run-b", remote=s3_remote.url,
                     storage_options=s3_remote.storage_options, on_remote_error="raise",
                     close_timeout=120)
    try:
        b.save(1, model=model(1))
        with pytest.raises(ConfigError, match=r"holds run .*restore from it first"):
            b.wait(60)
        assert b.status().upload_pid is not None  # the refusal came from the child
    finally:
        started = time.monotonic()
        status = b.close()
    # Nothing will be retried, so close() does not wait out close_timeout for it (it did:
    # 60 s with the default).
    assert time.monotonic() - started < 30
    assert status.newest_remote is None and "holds run" in (status.last_error or "")


def test_an_upload_process_that_cannot_start_leaves_the_uploads_to_a_thread_loudly(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # slowfile:// is registered in this process only: the child cannot open it.
    slowfs.register()
    url = f"slowfile://{tmp_path}/remote/run"
    m = model(2)
    with Checkpointer(tmp_path / "ckpt", remote=url, upload_process=True) as c:
        c.save(3, model=m)
        assert c.wait(60)
        assert c.status().newest_remote_step == 3
    starts = [r for r in caplog.records if "could not start" in r.getMessage()]
    assert len(starts) == 1 and starts[0].levelno == logging.WARNING
    assert "slowfile://" in starts[0].getMessage()
    assert "in a thread of this process" in starts[0].getMessage()
    store = RemoteStore(url)
    assert [v.step for v in store.list()] == [3]


def test_upload_process_settings_that_cannot_work_are_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    remote = RemoteStore(f"file://{tmp_path}/remote/run")
    with pytest.raises(ConfigError, match="upload_process=True needs remote="):
        Checkpointer(tmp_path / "a", remote_store=remote, upload_process=True)
    monkeypatch.setenv("CKPTSYNC_UPLOAD_NICE", "-5")
    with pytest.raises(ConfigError, match="CKPTSYNC_UPLOAD_NICE must be an integer from 0 "
                                          "to 19, got '-5'"):
        Checkpointer(tmp_path / "b", remote=f"file://{tmp_path}/remote/b", upload_process=True)
    # Storage options that cannot reach another process: refused when asked for, a thread
    # otherwise.
    options = {"lock": __import__("threading").Lock()}
    monkeypatch.delenv("CKPTSYNC_UPLOAD_NICE")
    with pytest.raises(ConfigError, match="cannot be sent to another process"):
        Checkpointer(tmp_path / "c", remote="s3://bucket/run", storage_options=options,
                     upload_process=True)


def test_a_trainer_killed_with_sigkill_leaves_no_upload_process(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import sys, time, torch
        from ckptsync import Checkpointer
        c = Checkpointer({str(tmp_path / 'ckpt')!r},
                         remote={f'file://{tmp_path}/remote/run'!r}, upload_process=True)
        c.save(1, model=torch.nn.Linear(64, 64))
        assert c.wait(60)
        print(c.status().upload_pid, flush=True)
        time.sleep(600)
    """)
    trainer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                               env=child_env(), text=True)
    try:
        line = trainer.stdout.readline() if trainer.stdout else ""
        assert line.strip().isdigit(), f"trainer printed {line!r}, exit {trainer.poll()}"
        child = int(line)
        assert alive(child)
        trainer.kill()
        trainer.wait(30)
        deadline = time.monotonic() + 20
        while alive(child):  # its socket closed with the trainer: it ends
            assert time.monotonic() < deadline, f"upload process {child} outlived its trainer"
            time.sleep(0.05)
    finally:
        trainer.kill()
        trainer.wait()
