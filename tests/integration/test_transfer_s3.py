"""When s3fs or botocore change the private API that S3's fast paths use, transfers go on.

``ChangedS3`` is s3fs as a later version might be: its own requests work, but
``_get_s3_method_kwargs`` is gone for callers outside s3fs (ckptsync's blocking client). An
upload, a ranged download and a streamed upload through it still move exact bytes, through
the public fsspec API, and the log holds one warning naming what is missing.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import s3fs
from fsspec.asyn import sync_wrapper

from ckptsync.config import TransferConfig
from ckptsync.crypto import KeyRing
from ckptsync.local import LocalStore
from ckptsync.remote import RemoteStore
from ckptsync.transfer import backoff
from tests.support.remotes import Remote
from tests.support.stores import make_local, read_tree

pytestmark = pytest.mark.core

MiB = 1024 * 1024
# 5 MiB parts and ranges (S3's minimum): a 13 MiB file is a 3-part upload, a 3-range download.
FAST = TransferConfig(max_workers=4, block_size=5 * MiB, part_size=5 * MiB, parts_in_flight=3,
                      ranged_min_size=5 * MiB, retries=2, backoff_initial=0.0)
MISSING = "_get_s3_method_kwargs"

_IN_S3FS: contextvars.ContextVar[bool] = contextvars.ContextVar("in_s3fs", default=False)


class ChangedS3(s3fs.S3FileSystem):  # type: ignore[misc]
    """An s3fs whose ``_get_s3_method_kwargs`` only its own requests can still use."""

    async def _call_s3(self, *args: Any, **kwargs: Any) -> Any:
        token = _IN_S3FS.set(True)
        try:
            return await super()._call_s3(*args, **kwargs)
        finally:
            _IN_S3FS.reset(token)

    call_s3 = sync_wrapper(_call_s3)  # s3fs's files call its sync twin

    def _get_s3_method_kwargs(self, *args: Any, **kwargs: Any) -> Any:
        if not _IN_S3FS.get():
            raise AttributeError(f"'S3FileSystem' object has no attribute '{MISSING}'")
        return super()._get_s3_method_kwargs(*args, **kwargs)


def changed_store(remote: Remote, config: TransferConfig = FAST,
                  keys: KeyRing | None = None) -> RemoteStore:
    fs = ChangedS3(skip_instance_cache=True, **remote.storage_options)
    store = RemoteStore(remote.url, fs=fs, config=config, keys=keys)
    assert store.backend.parallel_parts  # it looks like s3fs: the fast paths are tried
    return store






def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and r.name.startswith("ckptsync")]


def assert_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    warned = warnings_of(caplog)
    assert len(warned) == 1, warned
    assert MISSING in warned[0] and f"s3fs {s3fs.__version__}" in warned[0], warned[0]


def no_multipart_left(store: RemoteStore, remote: Remote) -> bool:
    uploads = store.fs.list_multipart_uploads(remote.extra["bucket"])
    return not [u for u in uploads if "run/" in u.get("Key", "")]


def test_push_and_pull_go_on_through_the_public_api(s3_remote: Remote, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    files = {"big.bin": os.urandom(13 * MiB + 7), "other.bin": os.urandom(6 * MiB),
             "small.bin": os.urandom(1000)}
    ck = make_local(LocalStore(tmp_path / "src"), 1, files)
    store = changed_store(s3_remote)
    with caplog.at_level(logging.WARNING):
        store.push(ck)
        got = store.pull(None, LocalStore(tmp_path / "dst"))
    assert read_tree(got.path) == files
    assert store.stats["bytes_uploaded"] == sum(len(b) for b in files.values())
    assert no_multipart_left(store, s3_remote)  # the multipart uploads tried were aborted
    assert_one_warning(caplog)  # once for the filesystem, not once per file or part


def test_a_ranged_download_goes_on_through_the_public_api(s3_remote: Remote, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    files = {"big.bin": os.urandom(12 * MiB + 3)}
    ck = make_local(LocalStore(tmp_path / "src"), 1, files)
    RemoteStore(s3_remote.url, s3_remote.storage_options, config=FAST).push(ck)
    with caplog.at_level(logging.WARNING):
        got = changed_store(s3_remote).pull(None, LocalStore(tmp_path / "dst"))
    assert read_tree(got.path) == files
    assert_one_warning(caplog)


def test_a_streamed_upload_gives_way_to_a_plain_one(s3_remote: Remote, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    data = os.urandom(11 * MiB)
    ck = make_local(LocalStore(tmp_path / "src"), 1, {"big.bin": data})
    store = changed_store(s3_remote)
    stream = store.stream_file(ck.name, "big.bin")
    assert stream is not None
    with caplog.at_level(logging.WARNING):
        stream.write(memoryview(data))  # never raises: a failed stream is left to the push
        manifest = store.push(ck, streams={"big.bin": stream})
        assert store.stream_file(ck.name, "other.bin").error is not None  # type: ignore[union-attr]
    assert manifest.name == ck.name
    got = RemoteStore(s3_remote.url, s3_remote.storage_options, config=FAST).pull(
        None, LocalStore(tmp_path / "dst"))
    assert read_tree(got.path) == {"big.bin": data}
    assert no_multipart_left(store, s3_remote)
    assert_one_warning(caplog)


def test_backoff_grows_to_its_cap_with_jitter() -> None:
    for attempt, full in ((1, 1.0), (2, 2.0), (3, 4.0), (6, 30.0), (10_000, 30.0)):
        waits = [backoff(attempt, 1.0, 30.0) for _ in range(200)]
        assert all(full / 2 <= w <= full for w in waits), (attempt, min(waits), max(waits))
        assert len(set(waits)) > 1  # jittered
    assert backoff(0, 1.0, 30.0) <= 1.0  # attempt 0 counts as the first
    assert backoff(10**9, 0.0, 30.0) == 0.0  # no overflow, no back-off asked for


def test_encrypted_uploads_use_parallel_parts_and_go_on_through_the_public_api(
        s3_remote: Remote, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An encrypted file larger than a part goes up as a parallel multipart upload of its
    ciphertext (transfer/sealed.py); with s3fs's private API gone, through s3fs's file."""
    from ckptsync.crypto import KeyRing

    keys = KeyRing((os.urandom(32),))
    files = {"big.bin": os.urandom(13 * MiB + 7), "small.bin": os.urandom(1000)}
    ck = make_local(LocalStore(tmp_path / "src"), 1, files)
    # s3fs's own file would send block_size (7 MiB) parts: two; ours are part_size: three.
    config = dataclasses.replace(FAST, block_size=7 * MiB)
    fast = RemoteStore(s3_remote.url, s3_remote.storage_options, config=config, keys=keys)
    m = fast.push(ck)
    big = next(f for f in m.files if f.path == "big.bin")
    info = fast.fs.info(f"{fast.root}/{m.name}/big.bin")
    assert str(info.get("ETag", "")).strip('"').endswith("-3")  # 5 + 5 + 3 MiB parts
    stored = fast.fs.cat_file(f"{fast.root}/{m.name}/big.bin")
    assert len(stored) == big.size and files["big.bin"][4096:4160] not in stored
    got = fast.pull(None, LocalStore(tmp_path / "dst"))
    assert read_tree(got.path) == files

    ck2 = make_local(LocalStore(tmp_path / "src"), 2, files)
    changed = changed_store(s3_remote, keys=keys)
    with caplog.at_level(logging.WARNING):
        changed.push(ck2)
    got = fast.pull(ck2.name, LocalStore(tmp_path / "dst2"))
    assert read_tree(got.path) == files
    assert no_multipart_left(changed, s3_remote)


def test_an_encrypted_multipart_upload_of_a_changed_file_is_aborted(
        s3_remote: Remote, tmp_path: Path) -> None:
    from ckptsync.crypto import KeyRing
    from ckptsync.errors import CorruptCheckpointError

    files = {"big.bin": os.urandom(11 * MiB)}
    ck = make_local(LocalStore(tmp_path / "src"), 1, files)
    (ck.path / "big.bin").write_bytes(os.urandom(11 * MiB))  # changed after its commit
    store = RemoteStore(s3_remote.url, s3_remote.storage_options, config=FAST,
                        keys=KeyRing((os.urandom(32),)))
    with pytest.raises(CorruptCheckpointError, match="no longer matches its manifest"):
        store.push(ck)
    assert no_multipart_left(store, s3_remote)
    assert store.list() == []
    assert not store.fs.exists(f"{store.root}/{ck.name}/big.bin")
