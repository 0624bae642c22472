"""ckptsync.remote without a backend: URL schemes, optional packages, torch-free imports, and
``translate_error`` (causes kept, secrets hidden, what is retryable)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import fsspec
import pytest

from ckptsync.errors import ConfigError, RemoteError
from ckptsync.remote import RemoteStore, translate_error
from tests.support.faults import FaultFS
from tests.support.paths import REPO
from tests.support.stores import FAST

pytestmark = pytest.mark.core


def test_unknown_scheme() -> None:
    with pytest.raises(ConfigError, match="unknown URL scheme 'nosuch'"):
        RemoteStore("nosuch://bucket/x")


@pytest.mark.parametrize(("scheme", "module", "extra"),
                         [("s3", "s3fs", "s3"), ("gs", "gcsfs", "gcs"),
                          ("gdrive", "gdrive_fsspec", "gdrive")])
def test_missing_optional_package_names_the_extra(scheme: str, module: str, extra: str) -> None:
    script = textwrap.dedent(f"""
        import sys
        sys.modules[{module!r}] = None
        from ckptsync.errors import ConfigError
        from ckptsync.remote import RemoteStore
        try:
            RemoteStore("{scheme}://bucket/run")
        except ConfigError as e:
            print(e)
            sys.exit(0)
        sys.exit(1)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"pip install 'ckptsync[{extra}]'" in proc.stdout


def test_imports_without_torch() -> None:
    script = ("import sys; sys.modules['torch'] = None; sys.modules['numpy'] = None\n"
              "import ckptsync.remote, ckptsync.cli, ckptsync.transfer, ckptsync.config\n"
              "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
              "print('ok')")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_translate_error_keeps_cause_and_hides_secrets() -> None:
    exc = PermissionError("denied for secret s3cr3t-KEY-value")
    err = translate_error(exc, "s3://AKIAXX:s3cr3t-KEY-value@bucket/run?token=abc",
                          "upload to", secrets=["s3cr3t-KEY-value"])
    assert isinstance(err, RemoteError) and not err.retryable
    assert "s3cr3t" not in str(err) and "AKIAXX" not in str(err) and "token" not in str(err)
    assert "s3://bucket/run" in str(err) and "access denied" in str(err)
    assert translate_error(ConnectionError("reset"), "s3://b/x").retryable  # type: ignore[attr-defined]
    assert isinstance(translate_error(ImportError("no s3fs"), "s3://b/x"), ConfigError)


def test_storage_options_never_in_messages(tmp_path: Path) -> None:
    secret = "very-secret-token-123"
    fs = FaultFS(fsspec.filesystem("memory"))
    fs.fail_on("ls", nth=1, exc=PermissionError(f"bad token {secret}"))
    store = RemoteStore("memory://sec/run", {"token": secret}, fs=fs, config=FAST)
    with pytest.raises(RemoteError) as ei:
        store.list()
    assert secret not in str(ei.value) and secret not in repr(store)
    assert isinstance(ei.value.__cause__, PermissionError)


@pytest.mark.parametrize("make", [
    lambda: _botocore("ResponseStreamingError", error=ConnectionResetError(104, "reset")),
    lambda: _botocore("IncompleteReadError", actual_bytes=10, expected_bytes=20),
    lambda: _botocore("FlexibleChecksumError", error_msg="crc32 mismatch"),
    lambda: __import__("http.client").client.IncompleteRead(b"abc", 10),
    lambda: __import__("urllib3").exceptions.ProtocolError(
        "Connection broken", __import__("urllib3").exceptions.IncompleteRead(3, 7)),
    lambda: __import__("aiohttp").ClientPayloadError("Response payload is not completed"),
])
def test_mid_body_errors_are_retryable(make: Any) -> None:
    err = translate_error(make(), "s3://bucket/run/x", "download from")
    assert isinstance(err, RemoteError) and err.retryable, err


def test_retryable_is_read_through_the_cause_chain() -> None:
    class WrapperError(Exception):
        pass

    try:
        try:
            raise ConnectionResetError(104, "Connection reset by peer")
        except ConnectionResetError as inner:
            raise WrapperError("read failed") from inner
    except WrapperError as e:
        err = translate_error(e, "s3://bucket/run/x", "download from")
    assert isinstance(err, RemoteError) and err.retryable
    assert not translate_error(WrapperError("bad request"), "s3://b/x").retryable  # type: ignore[attr-defined]


def _botocore(name: str, **kwargs: Any) -> BaseException:
    import botocore.exceptions

    exc: BaseException = getattr(botocore.exceptions, name)(**kwargs)
    return exc
