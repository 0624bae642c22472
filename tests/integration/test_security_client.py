"""What a bucket writer or a second run can do, seen from the user's side: a training
process's own logs, an ``encrypt_local`` directory with a planted plaintext checkpoint, and a
zero-code ``ckptsync pull`` that never takes its rule from the bucket.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptsync import Checkpointer
from ckptsync.cli import main
from ckptsync.errors import RemoteError
from ckptsync.local import LocalStore
from ckptsync.manifest import Manifest, make_name
from ckptsync.remote import RemoteStore
from ckptsync.zerocode.presets import PRESETS
from tests.support.helpers import REPO
from tests.support.remotes import Remote

pytestmark = pytest.mark.full

KEY = os.urandom(32)


def model(seed: int) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 3)


# --------------------------------------------------------------------------- secrets in logs
@pytest.fixture
def trainer_log() -> Iterator[io.StringIO]:
    """A training script's own logging: everything at DEBUG to a handler ckptsync never saw."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield out
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def test_a_trainers_own_debug_log_holds_no_secret(trainer_log: io.StringIO, s3_remote: Remote,
                                                  tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CKPTSYNC_RETRIES", "1")
    token = "FwoGZXIvYXdzEXAMPLESESSIONTOKEN0123456789"
    options = {**s3_remote.storage_options, "token": token}
    secret = str(s3_remote.storage_options["secret"])
    # The upload may be refused (the server knows no such token): only its log matters here.
    with Checkpointer(tmp_path / "ckpts", s3_remote.url, storage_options=options,
                      close_timeout=1) as ck:
        ck.save(1, model=model(1)).wait()
        with contextlib.suppress(RemoteError):  # refused or not, its request is logged
            ck.latest()  # a request of the training process itself, at DEBUG
    url = "memory://trainer:hunter2-url-password@bucket/run"
    logging.getLogger("ckptsync.remote").warning("could not reach %s", url)
    text = trainer_log.getvalue()
    assert "botocore" in text  # the libraries' DEBUG records were there to leak it
    for leaked in (token, secret, "hunter2-url-password"):
        assert leaked not in text
    store = RemoteStore(url)
    assert store.url == "memory://bucket/run" and "hunter2" not in repr(store)
    with Checkpointer(tmp_path / "other", url) as ck:
        assert ck.remote is not None and ck.remote.url == "memory://bucket/run"


# --------------------------------------------------------------------------- encrypt_local
def test_an_encrypt_local_directory_refuses_a_planted_plaintext_checkpoint(
        tmp_path: Path) -> None:
    d = tmp_path / "run"
    m1 = model(1)
    with Checkpointer(d, encryption_key=KEY, encrypt_local=True) as ck:
        ck.save(1, model=m1).wait()
    with Checkpointer(tmp_path / "evil") as ck:  # someone's plaintext checkpoint, newer
        planted = ck.save(2, model=model(66)).result()
    assert planted is not None
    shutil.move(str(tmp_path / "evil" / planted.name), str(d / planted.name))

    m = model(9)
    with Checkpointer(d, encryption_key=KEY, encrypt_local=True) as ck:
        info = ck.restore(model=m)
    assert info is not None and info.step == 1 and info.fell_back
    assert info.skipped[0][0] == planted.name and "not encrypted" in info.skipped[0][1]
    assert torch.equal(m.weight, m1.weight)
    with Checkpointer(d, encryption_key=KEY, encrypt_local=True, allow_plaintext=True) as ck:
        info = ck.restore(model=model(9))  # migrating: allowed when asked
    assert info is not None and info.step == 2


# --------------------------------------------------------------------------- pull's rule
def push_watched(remote: Remote, rule: str, files: dict[str, bytes], step: int,
                 spool: Path) -> Manifest:
    st = LocalStore(spool).staging(make_name(step))
    for rel, data in files.items():
        st.write_file(rel, data)
    m = Manifest.new(step=step, files=st.entries, name=st.name,
                     source={"kind": "watched", "rule": rule, "paths": list(files)})
    return RemoteStore(remote.url, remote.storage_options).push(st.commit(m))


@pytest.fixture
def bucket(file_remote: Remote, tmp_path: Path) -> Remote:
    """A bucket whose writer added a version of ``file:train.py`` next to the real ones."""
    push_watched(file_remote, "file:ckpt.pt", {"ckpt.pt": b"weights"}, 1, tmp_path / "s")
    push_watched(file_remote, PRESETS["lightning"], {"last.ckpt": b"lightning"}, 1,
                 tmp_path / "s")
    push_watched(file_remote, "file:train.py", {"train.py": b"import os; os.system('x')\n"}, 2,
                 tmp_path / "s")
    return file_remote


def work_dir(tmp_path: Path, name: str = "work") -> Path:
    work = tmp_path / name
    work.mkdir()
    (work / "train.py").write_bytes(b"print('train')\n")
    return work


def test_a_zero_code_pull_never_takes_its_rule_from_the_bucket(
        bucket: Remote, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    work = work_dir(tmp_path)
    monkeypatch.delenv("CKPTSYNC_RULES", raising=False)
    monkeypatch.delenv("CKPTSYNC_PRESETS", raising=False)
    assert main(["pull", bucket.url, str(work)]) == 2
    err = capsys.readouterr().err
    assert "never takes that rule from the bucket" in err
    assert "--rule 'file:train.py'" in err and "--rule 'file:ckpt.pt'" in err  # proposed
    assert (work / "train.py").read_bytes() == b"print('train')\n"
    assert not (work / "ckpt.pt").exists()

    assert main(["pull", bucket.url, str(work), "--rule", "file:ckpt.pt"]) == 0
    assert (work / "ckpt.pt").read_bytes() == b"weights"
    assert (work / "train.py").read_bytes() == b"print('train')\n"
    lit = work_dir(tmp_path, "lightning")
    assert main(["pull", bucket.url, str(lit), "--preset", "lightning"]) == 0
    assert (lit / "last.ckpt").read_bytes() == b"lightning"
    assert (lit / "train.py").read_bytes() == b"print('train')\n"
    env = work_dir(tmp_path, "env")
    monkeypatch.setenv("CKPTSYNC_RULES", "file:ckpt.pt")  # as the sidecar's watch reads it
    assert main(["pull", bucket.url, str(env)]) == 0
    assert (env / "ckpt.pt").read_bytes() == b"weights"
    assert (env / "train.py").read_bytes() == b"print('train')\n"


def test_a_zero_code_pull_takes_the_rule_a_watch_of_its_directory_used(
        bucket: Remote, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CKPTSYNC_RULES", raising=False)
    monkeypatch.delenv("CKPTSYNC_PRESETS", raising=False)
    work = work_dir(tmp_path)
    assert main(["pull", bucket.url, str(work), "--rule", "file:ckpt.pt"]) == 0
    env: Any = {**os.environ, "CKPTSYNC_RETRIES": "2"}
    watch = subprocess.run([sys.executable, "-m", "ckptsync", "watch", str(work), bucket.url,
                            "--rule", "file:ckpt.pt", "--once", "--settle", "0"],
                           capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert watch.returncode == 0, watch.stderr
    (work / "ckpt.pt").unlink()  # a later session in the same directory: pull, no flags
    assert main(["pull", bucket.url, str(work)]) == 0
    assert (work / "ckpt.pt").read_bytes() == b"weights"
    assert (work / "train.py").read_bytes() == b"print('train')\n"
