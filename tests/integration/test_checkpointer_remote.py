"""``Checkpointer(remote=...)``: the training loop never dies for the remote's sake.

Real remotes (file://, SeaweedFS) behind a fault wrapper (tests/faults.py FaultFS) that can
take the network down, bring it back, or slow every call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

from ckptsync import Checkpointer
from ckptsync.config import TransferConfig
from ckptsync.errors import ConfigError, RemoteError
from ckptsync.local import LocalStore
from ckptsync.manifest import Manifest
from ckptsync.remote import RemoteStore
from tests.support.faults import FaultFS
from tests.support.remotes import Remote

pytestmark = pytest.mark.core

MiB = 1024 * 1024
QUICK = TransferConfig(max_workers=2, retries=2, backoff_initial=0.05, backoff_max=0.5)
T = TypeVar("T")


def faulty_store(remote: Remote, config: TransferConfig = QUICK) -> tuple[FaultFS, RemoteStore]:
    fs = FaultFS(remote.fs())
    return fs, RemoteStore(remote.url, remote.storage_options, fs=fs, config=config)


def newest_remote(remote: Remote) -> Manifest | None:
    """The newest valid checkpoint as a fresh reader of the remote sees it."""
    store = RemoteStore(remote.url, remote.storage_options)
    store.fs.invalidate_cache()
    return store.newest_valid()


def eventually(get: Callable[[], T], ok: Callable[[T], bool], within: float = 30.0) -> T:
    deadline = time.monotonic() + within
    value = get()
    while not ok(value):
        assert time.monotonic() < deadline, f"still {value!r} after {within}s"
        time.sleep(0.05)
        value = get()
    return value


def train(model: torch.nn.Module, step: int) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * step)


@pytest.mark.parametrize("backend", ["file", "seaweedfs"])
def test_an_outage_never_stops_training_and_the_newest_checkpoint_lands_after_it(
        backend: str, request: pytest.FixtureRequest, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    remote: Remote = request.getfixturevalue(f"{backend}_remote")
    fs, store = faulty_store(remote)
    model = torch.nn.Linear(16, 16)
    ck = Checkpointer(tmp_path / "ck", remote_store=store, keep_last=2)
    ck.save(0, model=model)
    assert ck.wait()  # a healthy remote is waited for
    newest = newest_remote(remote)
    assert newest is not None and newest.step == 0

    fs.set_outage(ConnectionError("injected outage"))
    with caplog.at_level(logging.WARNING, logger="ckptsync"):
        for step in range(1, 9):
            train(model, step)
            ck.save(step, model=model).wait()  # never raises: the loop goes on
            assert len(ck.list()) <= 2 + 2  # the backlog never fills the disk
        status = eventually(ck.status, lambda s: s.consecutive_failures > 0)
        assert status.behind and status.newest_local_step == 8
        assert status.newest_remote_step == 0
        assert status.last_error is not None and "injected outage" in status.last_error
        train(model, 9)
        ck.save(9, model=model).wait()  # a save while behind says how far
    assert any("is behind" in r.getMessage() and "(8 steps behind)" in r.getMessage()
               and "injected outage" in r.getMessage() for r in caplog.records)
    still = newest_remote(remote)
    assert still is not None and still.step == 0

    fs.set_outage(None)
    eventually(lambda: newest_remote(remote), lambda m: m is not None and m.step == 9)
    status = ck.close()
    assert not status.behind and status.not_remote == () and status.consecutive_failures == 0
    assert status.superseded > 0  # steps 1..8 were not all uploaded one by one
    assert len(LocalStore(tmp_path / "ck").list()) == 2

    expected = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = torch.nn.Linear(16, 16)
    with Checkpointer(tmp_path / "fresh", remote=remote.url,
                      storage_options=remote.storage_options) as ck2:
        info = ck2.restore(model=fresh)
    assert info is not None and info.step == 9
    assert all(torch.equal(v, expected[k]) for k, v in fresh.state_dict().items())


def test_a_slow_remote_never_fills_the_disk(file_remote: Remote, tmp_path: Path) -> None:
    fs, store = faulty_store(file_remote)
    fs.set_delay(0.3)
    model = torch.nn.Linear(16, 16)
    ck = Checkpointer(tmp_path / "ck", remote_store=store, keep_last=2)
    for step in range(20):
        train(model, step)
        handle = ck.save(step, model=model)
        assert len(ck.list()) <= 2 + 2
        handle.wait()
        assert len(ck.list()) <= 2 + 2
    status = ck.close()
    assert status.not_remote == () and status.newest_remote_step == 19
    assert status.superseded > 0
    newest = newest_remote(file_remote)
    assert newest is not None and newest.step == 19
    assert [m.step for m in LocalStore(tmp_path / "ck").list()] == [18, 19]


def test_on_remote_error_raise_keeps_the_error_in_the_training_loop(
        file_remote: Remote, tmp_path: Path) -> None:
    fs, store = faulty_store(file_remote)
    with pytest.raises(ConfigError, match=r"on_remote_error.*'ignore'"):
        Checkpointer(tmp_path / "bad", remote_store=store, on_remote_error="ignore")
    with pytest.raises(ConfigError, match="close timeout"):
        Checkpointer(tmp_path / "bad", remote_store=store, close_timeout=-1)
    model = torch.nn.Linear(16, 16)
    fs.set_outage(ConnectionError("injected outage"))
    ck = Checkpointer(tmp_path / "ck", remote_store=store, on_remote_error="raise")
    ck.save(1, model=model)
    with pytest.raises(RemoteError, match="injected outage"):
        ck.wait()
    fs.set_outage(None)
    ck.save(2, model=model)  # raised once: the next call goes on
    assert ck.close().newest_remote_step == 2


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_close_with_the_remote_down_returns_within_its_bound_and_names_what_is_not_remote(
        how: str, file_remote: Remote, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Slow back-off: without a stop that cuts it short, one push would retry for ~30 s.
    fs, store = faulty_store(file_remote, TransferConfig(retries=5, backoff_initial=2.0))
    fs.set_outage(ConnectionError("injected outage"))
    kwargs: dict[str, Any] = {}
    if how == "environment":
        monkeypatch.setenv("CKPTSYNC_CLOSE_TIMEOUT", "1")
    else:
        kwargs["timeout"] = 1.0
    model = torch.nn.Linear(16, 16)
    ck = Checkpointer(tmp_path / "ck", remote_store=store, keep_last=1)
    ck.save(1, model=model)
    ck.save(2, model=model).wait()
    newest = ck.list()[-1].name
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="ckptsync"):
        status = ck.close(**kwargs)
    assert time.monotonic() - t0 < 1.0 + 5.0
    assert status.not_remote and status.not_remote[-1] == newest
    assert any(r.levelno >= logging.ERROR and newest in r.getMessage()
               and "ckptsync push" in r.getMessage() for r in caplog.records)
    assert newest in [m.name for m in LocalStore(tmp_path / "ck").list()]  # kept locally
    fs.set_outage(None)
    assert newest_remote(file_remote) is None  # nothing abandoned was committed


def test_an_abandoned_streamed_upload_leaves_nothing_partial(s3_remote: Remote,
                                                             tmp_path: Path) -> None:
    config = TransferConfig(max_workers=2, block_size=5 * MiB, part_size=5 * MiB,
                            parts_in_flight=2)
    store = RemoteStore(s3_remote.url, s3_remote.storage_options, config=config)
    model = torch.nn.Linear(2048, 1024)  # 8 MiB of weights: sent in parts while written
    ck = Checkpointer(tmp_path / "ck", remote_store=store)
    ck.save(1, model=model).wait()
    status = ck.close(timeout=0)  # abandon whatever is not done
    bucket = s3_remote.extra["bucket"]
    store.fs.invalidate_cache()
    assert not [u for u in store.fs.list_multipart_uploads(bucket) if "run/" in u.get("Key", "")]
    committed = newest_remote(s3_remote)
    if committed is None:
        assert status.not_remote == (ck.list()[-1].name,)
    else:  # it won the race: then it is whole
        assert status.not_remote == () and committed.name == ck.list()[-1].name
