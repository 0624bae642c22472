"""The blocking S3 client that sends parts and reads ranges is one per filesystem, with its
connection pool, reused across files, pushes and pulls: a save on a cloud
link no longer pays new TCP (and TLS) connections for every file. It signs every request with
s3fs's current credentials, so credentials that expire and change during a long run do not
break it. Ranged downloads read into reused buffers, not a fresh ``bytes`` per range.

A fault proxy in front of the server counts the connections a client opens, sees the access
key each request is signed with, and refuses a revoked key as a server refuses a deleted one.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from ckptsync.config import TransferConfig
from ckptsync.local import HashingWriter, LocalStore
from ckptsync.remote import RemoteStore, translate_error
from ckptsync.transfer import Retrier, Slots, download_file_ranged
from tests.support.fault_proxy import FaultProxy
from tests.support.remotes import Remote
from tests.support.stores import make_local, read_tree

pytestmark = pytest.mark.core

MiB = 1024 * 1024
# One file at a time, one part at a time: each client needs one connection, so a client that
# keeps its connections opens none for a later file.
ONE_BY_ONE = TransferConfig(max_workers=1, block_size=5 * MiB, part_size=5 * MiB,
                            parts_in_flight=1, ranged_min_size=5 * MiB, retries=2,
                            backoff_initial=0.0)


def _proxy(remote: Remote) -> FaultProxy:
    host, port = remote.extra["endpoint"].rsplit("/", 1)[1].split(":")
    return FaultProxy(host, int(port), lifetime=120)


def _through(remote: Remote, proxy: FaultProxy, *, keys: bool = True) -> dict[str, Any]:
    opts: dict[str, Any] = json.loads(json.dumps(remote.storage_options))
    opts["client_kwargs"]["endpoint_url"] = proxy.endpoint
    if not keys:
        opts.pop("key", None)
        opts.pop("secret", None)
    return opts


def _files(n: int = 2) -> dict[str, bytes]:
    return {f"f{i}.bin": os.urandom(11 * MiB + i) for i in range(n)}


def test_later_files_pushes_and_pulls_open_no_new_connection(s3_remote: Remote,
                                                             tmp_path: Path) -> None:
    with _proxy(s3_remote) as proxy:
        store = RemoteStore(s3_remote.url, _through(s3_remote, proxy), config=ONE_BY_ONE)
        first = make_local(LocalStore(tmp_path / "a"), 1, _files())
        store.push(first)
        opened = proxy.connections
        assert opened >= 2, opened  # s3fs's own, and the blocking client's
        second_files = _files(3)
        second = make_local(LocalStore(tmp_path / "b"), 2, second_files)
        store.push(second)  # three more multipart uploads
        back = store.pull(second.name, LocalStore(tmp_path / "back"))  # ranged reads
        assert proxy.connections == opened, (opened, proxy.connections)
    assert read_tree(back.path) == second_files


def test_credentials_that_change_between_pushes_are_followed(
        moto_remote: Remote, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Temporary credentials from the environment (``AWS_CREDENTIAL_EXPIRATION``: a role's,
    an SSO session's look the same to botocore) are replaced by new ones between two pushes
    and the old key is revoked: the second push signs every request with the new key, and
    succeeds. (moto accepts any key; the proxy refuses the revoked one.)"""
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    soon = (datetime.now(timezone.utc) + timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    env = {"AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
           "AWS_CREDENTIAL_EXPIRATION": soon, "AWS_ACCESS_KEY_ID": "AKIDOLDOLDOLD",
           "AWS_SECRET_ACCESS_KEY": "old-secret", "AWS_SESSION_TOKEN": "old-token"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with _proxy(moto_remote) as proxy:
        store = RemoteStore(moto_remote.url, _through(moto_remote, proxy, keys=False),
                            config=ONE_BY_ONE)
        store.push(make_local(LocalStore(tmp_path / "a"), 1, _files(1)))
        before = len(proxy.heads)
        assert any("Credential=AKIDOLDOLDOLD/" in h.get("authorization", "")
                   for _, _, h in proxy.heads)
        # The credentials are renewed (a new key, a new expiry) and the old key deleted.
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDNEWNEWNEW")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "new-secret")
        monkeypatch.setenv("AWS_SESSION_TOKEN", "new-token")
        proxy.revoke("AKIDOLDOLDOLD")
        files = _files(2)
        second = make_local(LocalStore(tmp_path / "b"), 2, files)
        store.push(second)
        sent = proxy.heads[before:]
        assert not proxy.fired, proxy.fired  # no request went with the revoked key
    parts = [t for m, t, _ in sent if m == "PUT" and "partNumber=" in t]
    assert len(parts) >= 6, [t for _, t, _ in sent]  # the blocking client's requests
    keys = {h.get("authorization", "").split("Credential=")[1].split("/")[0]
            for _, _, h in sent if "authorization" in h}
    assert keys == {"AKIDNEWNEWNEW"}, keys
    back = RemoteStore(moto_remote.url, moto_remote.storage_options).pull(
        second.name, LocalStore(tmp_path / "back"))
    assert read_tree(back.path) == files


def test_ranges_are_read_into_the_transfers_reused_buffers(s3_remote: Remote,
                                                           tmp_path: Path) -> None:
    """One block at a time: every range of the file is read into the one buffer the
    transfer's slots keep (seeded here), which ends holding the last range."""
    data = os.urandom(3 * 5 * MiB + 12345)  # four ranges, the last one short
    files = {"big.bin": data}
    ck = make_local(LocalStore(tmp_path / "src"), 1, files)
    store = RemoteStore(s3_remote.url, s3_remote.storage_options, config=ONE_BY_ONE)
    store.push(ck)
    entry = ck.manifest.files[0]
    slots = Slots(1)
    seeded = bytearray(b"\xa5" * ONE_BY_ONE.block_size)
    slots.give(seeded)
    with HashingWriter(tmp_path / "out.bin") as w:
        download_file_ranged(store.fs, f"{store.root}/{ck.name}/big.bin", w, entry,
                             url=f"{s3_remote.url}/{ck.name}/big.bin", config=ONE_BY_ONE,
                             retrier=Retrier(ONE_BY_ONE, translate_error), slots=slots,
                             open_ranges=store.backend.open_ranges)
    assert (tmp_path / "out.bin").read_bytes() == data
    reused = slots.take(ONE_BY_ONE.block_size)
    assert reused is seeded
    last = data[3 * 5 * MiB:]
    assert bytes(reused[:len(last)]) == last
    assert slots.acquire(blocking=False)  # its one slot given back
