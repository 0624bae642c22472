"""docs/backends.md: an S3-compatible endpoint given the way botocore reads it,
``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) in the environment, with no storage option:
the command line pushes to it, lists it and pulls from it (SeaweedFS on 127.0.0.1)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ckptsync.config import TransferConfig
from ckptsync.local import LocalStore
from ckptsync.manifest import Manifest, make_name
from ckptsync.remote import RemoteStore
from tests.support.cli import cli
from tests.support.remotes import Remote
from tests.support.servers import ACCESS_KEY, REGION, SECRET_KEY

pytestmark = pytest.mark.core


@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"])
def test_aws_endpoint_url_in_the_environment_is_the_s3_endpoint(
        variable: str, s3_remote: Remote, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [k for k in os.environ if k.startswith(("AWS_", "CKPTSYNC_"))]:
        monkeypatch.delenv(name)
    env = {variable: s3_remote.extra["endpoint"], "AWS_ACCESS_KEY_ID": ACCESS_KEY,
           "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": REGION,
           # No profile or credentials file of this machine's user takes part.
           "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
           # Were the endpoint ignored, requests would go to AWS: through a closed local port
           # instead, so that the test fails here without leaving the machine.
           "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "NO_PROXY": "127.0.0.1,localhost"}
    local = LocalStore(tmp_path / "ckpts")
    st = local.staging(make_name(3))
    st.write_file("model.pt", b"weights" * 1000)
    ckpt = st.commit(Manifest.new(step=3, files=st.entries, name=st.name))

    pushed = cli("push", str(local.directory), s3_remote.url, "--no-progress", **env)
    assert pushed.returncode == 0, pushed.stderr
    listed = cli("ls", s3_remote.url, **env)
    assert listed.returncode == 0 and ckpt.name in listed.stdout and "valid" in listed.stdout, (
        listed.stdout + listed.stderr)
    # It is in the bucket of that server (read with explicit options, not the environment).
    (m,) = RemoteStore(s3_remote.url, s3_remote.storage_options).list()
    assert m.name == ckpt.name
    pulled = cli("pull", s3_remote.url, str(tmp_path / "fresh"), "--no-progress", **env)
    assert pulled.returncode == 0, pulled.stderr
    (back,) = LocalStore(tmp_path / "fresh").list()
    assert back.file("model.pt").read_bytes() == b"weights" * 1000


@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"])
def test_an_http_endpoint_from_the_environment_keeps_bodies_signed(
        variable: str, s3_remote: Remote, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DESIGN.md: over plain http an upload body stays signed (nothing else guards it). The
    endpoint is the one botocore uses, here given only by the environment: every data request
    (each part of a multipart upload and a small file's PUT) carries a sha256 of its body."""
    import json

    from tests.support.fault_proxy import FaultProxy

    for name in [k for k in os.environ if k.startswith(("AWS_", "CKPTSYNC_"))]:
        monkeypatch.delenv(name)
    MiB = 1024 * 1024
    files = {"big.bin": os.urandom(13 * MiB + 5), "small.bin": os.urandom(300_000)}
    local = LocalStore(tmp_path / "ckpts")
    st = local.staging(make_name(4))
    for rel, data in files.items():
        st.write_file(rel, data)
    ckpt = st.commit(Manifest.new(step=4, files=st.entries, name=st.name))
    host, port = s3_remote.extra["endpoint"].rsplit("/", 1)[1].split(":")
    with FaultProxy(host, int(port), lifetime=120) as proxy:
        for k, v in {variable: proxy.endpoint, "AWS_CONFIG_FILE": os.devnull,
                     "AWS_SHARED_CREDENTIALS_FILE": os.devnull}.items():
            monkeypatch.setenv(k, v)
        options = json.loads(json.dumps(s3_remote.storage_options))
        del options["client_kwargs"]["endpoint_url"]
        config = TransferConfig(block_size=5 * MiB, part_size=5 * MiB, parts_in_flight=2)
        RemoteStore(s3_remote.url, options, config=config).push(ckpt)
        puts = [(t, h) for m, t, h in proxy.heads
                if m == "PUT" and ("/big.bin?" in t or t.endswith("/small.bin"))]
    assert len(puts) == 4, [t for t, _ in puts]  # 3 parts of big.bin, small.bin's PUT
    for target, h in puts:
        signed = h.get("x-amz-content-sha256", "")
        assert len(signed) == 64 and int(signed, 16) >= 0, (target, h)
