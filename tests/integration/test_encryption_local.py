"""Encryption at rest (``Checkpointer(encrypt_local=True)``) and the daemon under a key
recognising its own upload after a restart. Local files and remote objects are scanned for
the tensors' plaintext bytes; tampering is done the way an attacker with write access to the
directory would (the file and its manifest's digest both rewritten).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from ckptsync import Checkpointer
from ckptsync.crypto import KeyRing
from ckptsync.errors import CorruptCheckpointError, EncryptionKeyError
from ckptsync.integrity import sign_manifest
from ckptsync.local import LocalStore
from ckptsync.manifest import MANIFEST_NAME, Manifest
from ckptsync.remote import RemoteStore
from tests.integration.test_encryption_client import (
    ID_A,
    KEY_A,
    KEY_B,
    _no_env_key,  # noqa: F401 (autouse fixture)
    model,
    plaintext_in,
    remote_blobs,
    tensor_bytes,
)
from tests.support.cli import cli
from tests.support.remotes import Remote

pytestmark = pytest.mark.full


@pytest.fixture(params=["file", "seaweedfs"])
def remote(request: pytest.FixtureRequest) -> Remote:
    r: Remote = request.getfixturevalue(f"{request.param}_remote")
    return r


def local_blobs(d: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in d.rglob("*") if p.is_file()}


def sparse_windows(plain: bytes, every: int = 1 << 20) -> bytes:
    """Every ``every``-th 64-byte window of a large plaintext, for :func:`plaintext_in`."""
    return b"".join(plain[s:s + 1024] for s in range(0, len(plain) - 1024, every))


def test_encrypt_local_round_trip_local_and_fresh_machine(tmp_path: Path, remote: Remote) -> None:
    m1 = model(1)
    # 24 MB: many chunks, and on S3 a multipart upload of the stored bytes
    big = {"w": torch.randn(6_000_000, generator=torch.Generator().manual_seed(5))}
    with Checkpointer(tmp_path / "a", remote.url, storage_options=remote.storage_options,
                      encryption_key=KEY_A, encrypt_local=True, on_remote_error="raise") as ck:
        ck.save(1, model=m1, big=big).wait()
    plain = tensor_bytes(m1)
    big_plain = sparse_windows(big["w"].numpy().tobytes())
    for blobs in (local_blobs(tmp_path / "a"), remote_blobs(remote)):
        assert plaintext_in(blobs, plain) == [] and plaintext_in(blobs, big_plain) == []
    # verify of the local directory needs no key: the digests cover the stored bytes
    store = LocalStore(tmp_path / "a")
    (local,) = store.list()
    store.verify(local, full=True)
    p = cli("verify", str(tmp_path / "a"))  # the CLI too, with no key anywhere
    assert p.returncode == 0 and local.name in p.stdout, p.stderr
    assert all(f.encryption and f.encryption.key_id == ID_A for f in local.manifest.files)
    # sent as stored, not encrypted again: the remote manifest is the local one
    (rm,) = RemoteStore(remote.url, remote.storage_options).list()
    assert rm.files == local.manifest.files

    m, b = model(99), {}
    with Checkpointer(tmp_path / "a", encryption_key=KEY_A, encrypt_local=True) as ck:
        info = ck.restore(model=m, big=b)
    assert info is not None and info.step == 1 and not info.fell_back
    assert torch.equal(m.weight, m1.weight) and torch.equal(m.bias, m1.bias)
    assert torch.equal(b["w"], big["w"])

    # a fresh machine: pulled as stored (still no plaintext on its disk), loaded bit-exact
    m, b = model(98), {}
    with Checkpointer(tmp_path / "b", remote.url, storage_options=remote.storage_options,
                      encryption_key=KEY_A, encrypt_local=True) as ck:
        info = ck.restore(model=m, big=b)
    assert info is not None and info.step == 1
    assert torch.equal(m.weight, m1.weight) and torch.equal(m.bias, m1.bias)
    assert torch.equal(b["w"], big["w"])
    blobs = local_blobs(tmp_path / "b")
    assert plaintext_in(blobs, plain) == [] and plaintext_in(blobs, big_plain) == []


def _forge(ckpt_dir: Path, relpath: str, at: int) -> None:
    """Flip one byte of a stored file and rewrite its manifest to match (digest and all, and
    its keyed MAC, as only a holder of the key could): only the chunks' authentication can
    tell. (Without the key the manifest's MAC tells first: test_security.py.)"""
    f = ckpt_dir / relpath
    data = bytearray(f.read_bytes())
    data[at] ^= 0x01
    f.write_bytes(bytes(data))
    m = Manifest.from_json((ckpt_dir / MANIFEST_NAME).read_bytes(), where=str(ckpt_dir))
    from ckptsync.hashing import hash_file

    size, digest = hash_file(f)
    files = tuple(e if e.path != relpath else type(e)(e.path, size, e.algo, digest, e.unknown)
                  for e in m.files)
    (ckpt_dir / MANIFEST_NAME).write_bytes(sign_manifest(Manifest.new(
        step=m.step, files=files, name=m.name, metrics=m.metrics, meta=m.meta),
        KeyRing.of(KEY_A)).to_json())


@pytest.mark.core
def test_encrypt_local_wrong_or_missing_key_and_tampering(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "run"
    m1, m2 = model(1), model(2)
    with Checkpointer(d, encryption_key=KEY_A, encrypt_local=True) as ck:
        ck.save(1, model=m1).wait()
        newest = ck.save(2, model=m2).wait()
    assert newest is not None

    # No key, or the wrong one: an error naming the key id and the checkpoint; nothing is
    # loaded, and step 1 (same key) is NOT restored in its place.
    for key in (None, KEY_B):
        m = model(97)
        before = m.weight.detach().clone()
        with Checkpointer(d, encryption_key=key) as ck, \
                pytest.raises(EncryptionKeyError) as ei:
            ck.restore(model=m)
        assert ID_A in str(ei.value) and newest.name in str(ei.value)
        assert torch.equal(m.weight, before)
    monkeypatch.setenv("CKPTSYNC_KEY", KEY_A.hex())  # the key from the environment reads it
    m = model(94)
    with Checkpointer(d) as ck:
        info = ck.restore(model=m)
    assert info is not None and info.step == 2 and torch.equal(m.weight, m2.weight)
    monkeypatch.delenv("CKPTSYNC_KEY")
    with pytest.raises(Exception, match="encrypt_local=True needs a key"):
        Checkpointer(tmp_path / "nokey", encrypt_local=True)

    # Tampered (file and manifest rewritten alike): refused by authentication, by name...
    _forge(d / newest.name, "model.pt", 5000)
    with Checkpointer(d, encryption_key=KEY_A, encrypt_local=True) as ck:
        with pytest.raises(CorruptCheckpointError, match="chunk 0 fails authentication"):
            ck.restore(model=model(96), name=newest.name)
        # ... and the newest-first restore says it fell back, and why
        m = model(95)
        info = ck.restore(model=m)
    assert info is not None and info.step == 1 and info.fell_back
    assert "fails authentication" in info.skipped[0][1]
    assert torch.equal(m.weight, m1.weight)


def test_the_daemon_under_a_key_does_not_upload_its_version_again_after_a_restart(
        tmp_path: Path, file_remote: Remote) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY_A.hex() + "\n")
    zc = tmp_path / "zc"
    zc.mkdir()
    torch.save({"model": model(3).state_dict()}, zc / "ckpt.pt")
    args = ("watch", str(zc), file_remote.url, "--once", "--rule", "file:ckpt.pt",
            "--settle", "0", "--key-file", str(key_file))
    for restart in range(3):
        if restart == 2:  # the spool lost too (a new disk): the remote manifest alone tells
            shutil.rmtree(zc / ".ckptsync-watch" / "spool")
        p = cli(*args)
        assert p.returncode == 0, p.stderr
        listed = RemoteStore(file_remote.url).list()
        assert len(listed) == 1, (restart, [x.name for x in listed])
    (m,) = listed
    assert all(f.encryption and f.encryption.mac for f in m.files)
    # a changed file is a new version, uploaded
    torch.save({"model": model(4).state_dict()}, zc / "ckpt.pt")
    p = cli(*args)
    assert p.returncode == 0, p.stderr
    assert len(RemoteStore(file_remote.url).list()) == 2
