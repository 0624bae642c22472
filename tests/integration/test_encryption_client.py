"""Client-side encryption end to end: ``Checkpointer(encryption_key=...)``, key rotation, no
silent fall back on a wrong key, and the daemon (``ckptsync watch --key-file``, native and
zero-code) encrypting too. Remote objects are scanned for the tensors' plaintext bytes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch

from ckptsync import Checkpointer
from ckptsync.crypto import KeyRing
from ckptsync.errors import EncryptionKeyError
from ckptsync.remote import RemoteStore
from tests.support.cli import cli
from tests.support.remotes import Remote

pytestmark = pytest.mark.core

KEY_A, KEY_B = os.urandom(32), os.urandom(32)
ID_A, ID_B = KeyRing((KEY_A,)).current_id, KeyRing((KEY_B,)).current_id


@pytest.fixture(params=["file", "seaweedfs"])
def remote(request: pytest.FixtureRequest) -> Remote:
    r: Remote = request.getfixturevalue(f"{request.param}_remote")
    return r


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CKPTSYNC_KEY", raising=False)
    monkeypatch.delenv("CKPTSYNC_KEY_FILE", raising=False)


def model(seed: int) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(256, 256)


def tensor_bytes(m: torch.nn.Module) -> bytes:
    return m.weight.detach().numpy().tobytes()


def remote_blobs(remote: Remote) -> dict[str, bytes]:
    fs, root = fsspec.core.url_to_fs(remote.url, **remote.storage_options)
    fs.invalidate_cache()
    return {p: bytes(fs.cat_file(p)) for p in fs.find(root)}


def plaintext_in(blobs: dict[str, bytes], plain: bytes) -> list[str]:
    """Objects holding any 64-byte window of ``plain`` (a window every 1 KiB)."""
    windows = [plain[s:s + 64] for s in range(0, len(plain) - 64, 1024)]
    return [p for p, b in blobs.items() if any(w in b for w in windows)]


def ckpt(d: Path, remote: Remote, key: Any) -> Checkpointer:
    return Checkpointer(d, remote.url, storage_options=remote.storage_options,
                        encryption_key=key, on_remote_error="raise")


def test_checkpointer_round_trip_rotation_and_no_silent_fallback(
        tmp_path: Path, remote: Remote) -> None:
    m1 = model(1)
    with ckpt(tmp_path / "a", remote, KEY_A) as ck:
        ck.save(1, model=m1).wait()
    plain = tensor_bytes(m1)
    assert any(plain in p.read_bytes() for p in (tmp_path / "a").rglob("*.pt"))  # local: plain
    assert plaintext_in(remote_blobs(remote), plain) == []

    # A fresh machine, the key rotated: B encrypts from now on, A still decrypts.
    m = model(99)
    with ckpt(tmp_path / "b", remote, [KEY_B, KEY_A.hex()]) as ck:
        info = ck.restore(model=m)
        assert info is not None and info.step == 1
        assert torch.equal(m.weight, m1.weight) and torch.equal(m.bias, m1.bias)
        m2 = model(2)
        ck.save(2, model=m2).wait()
    ids = {f.encryption.key_id for x in RemoteStore(remote.url, remote.storage_options).list()
           for f in x.files if f.encryption}
    assert ids == {ID_A, ID_B}
    assert plaintext_in(remote_blobs(remote), tensor_bytes(m2)) == []

    m = model(98)
    with ckpt(tmp_path / "c", remote, [KEY_B, KEY_A]) as ck:
        info = ck.restore(model=m)
        assert info is not None and info.step == 2 and torch.equal(m.weight, m2.weight)

    # Only the old key at hand: the newest checkpoint is refused by name, and the older one
    # under that key is NOT restored in its place (that would resume from the wrong step).
    for key in (KEY_A, None):
        with ckpt(tmp_path / f"d{key is None}", remote, key) as ck:
            with pytest.raises(EncryptionKeyError) as ei:
                ck.restore(model=model(97))
            assert ID_B in str(ei.value) and "step-000000000002" in str(ei.value)
            assert ck.list() == []



def test_the_daemon_encrypts_native_and_zero_code_checkpoints(
        tmp_path: Path, file_remote: Remote) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY_A.hex() + "\n")
    native, zc = tmp_path / "native", tmp_path / "zc"
    m1 = model(1)
    with Checkpointer(native) as ck:  # no remote, no key: the daemon does the syncing
        ck.save(1, model=m1).wait()
    zc.mkdir()
    m2 = model(2)
    torch.save({"model": m2.state_dict()}, zc / "ckpt.pt")
    url_native, url_zc = f"{file_remote.url}-native", f"{file_remote.url}-zc"
    p = cli("watch", str(native), url_native, "--once", "--key-file", str(key_file))
    assert p.returncode == 0, p.stderr
    p = cli("watch", str(zc), url_zc, "--once", "--rule", "file:ckpt.pt", "--settle", "0",
             "--key-file", str(key_file))
    assert p.returncode == 0, p.stderr
    for url, m in ((url_native, m1), (url_zc, m2)):
        blobs = remote_blobs(Remote(url, {}, "file", missing_url=None))
        assert len(blobs) > 2 and plaintext_in(blobs, tensor_bytes(m)) == []

    # Without the key: a clear error naming the key id (exit 2), nothing restored.
    out = tmp_path / "restored"
    p = cli("pull", url_zc, str(out), "--rule", "file:ckpt.pt")
    assert p.returncode == 2 and ID_A in p.stderr and "--key-file" in p.stderr, p.stderr
    assert not (out / "ckpt.pt").exists()
    p = cli("pull", url_zc, str(out), "--rule", "file:ckpt.pt", "--key-file", str(key_file))
    assert p.returncode == 0, p.stderr
    assert (out / "ckpt.pt").read_bytes() == (zc / "ckpt.pt").read_bytes()
    p = cli("pull", url_native, str(tmp_path / "n2"), "--key-file", str(key_file))
    assert p.returncode == 0, p.stderr
    with Checkpointer(tmp_path / "n2") as ck:
        m = model(9)
        assert ck.restore(model=m) is not None and torch.equal(m.weight, m1.weight)
