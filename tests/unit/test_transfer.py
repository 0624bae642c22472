"""ckptsync.transfer on an in-memory filesystem: downloads refuse bytes past a listed size;
an aborted transfer is not retried."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import blake3
import fsspec
import pytest

from ckptsync.config import TransferConfig
from ckptsync.errors import CorruptCheckpointError
from ckptsync.local import LocalStore
from ckptsync.manifest import FileEntry, make_name
from ckptsync.remote import translate_error
from ckptsync.transfer import Retrier, TransferAborted, download_file, download_file_ranged
from tests.support.stores import FAST

pytestmark = pytest.mark.core


def test_download_refuses_bytes_past_listed_size(tmp_path: Path) -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/dl-test/big", b"y" * 10_000)
    writer_store = LocalStore(tmp_path)
    st = writer_store.staging(make_name(1))
    w = st.open("big")
    entry = FileEntry("big", 100, "blake3", "0" * 64)
    retrier = Retrier(FAST, lambda e, url, action: translate_error(e, url, action))
    with pytest.raises(CorruptCheckpointError, match="larger than"):
        download_file(fs, "/dl-test/big", w, entry, url="memory://dl-test/big", config=FAST,
                      retrier=retrier)
    assert w.size <= 100
    st.abort()
    fs.rm("/dl-test", recursive=True)
    assert list(tmp_path.iterdir()) == []


def test_ranged_download_refuses_bytes_past_listed_size(tmp_path: Path) -> None:
    mib = 1024 * 1024
    cfg = TransferConfig(max_workers=3, block_size=5 * mib, ranged_min_size=5 * mib,
                         retries=1)
    fs = fsspec.filesystem("memory")
    body = os.urandom(12 * mib)
    fs.pipe_file("/dl-ranged/big", body + b"extra")
    st = LocalStore(tmp_path).staging(make_name(1))
    w = st.open("big")
    entry = FileEntry("big", len(body), "blake3", blake3.blake3(body).hexdigest())
    retrier = Retrier(cfg, lambda e, url, action: translate_error(e, url, action))
    slots = threading.BoundedSemaphore(2)
    with pytest.raises(CorruptCheckpointError, match="larger than"):
        download_file_ranged(fs, "/dl-ranged/big", w, entry, url="memory://dl-ranged/big",
                             config=cfg, retrier=retrier, slots=slots)
    assert w.size == len(body)
    assert slots.acquire(blocking=False) and slots.acquire(blocking=False)  # all given back
    st.abort()
    fs.rm("/dl-ranged", recursive=True)


def test_transfer_aborted_is_not_retryable() -> None:
    assert not TransferAborted("x").retryable
