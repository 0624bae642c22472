"""Credentials never appear in messages, logs or tracebacks (DESIGN.md, "Remote side").

A URL's password, storage option values (a secret key, a session token, an SSE-C key) and
credential headers are blanked wherever ckptsync shows something: the CLI's output at every
verbosity (botocore's and s3fs's DEBUG records at ``-vv`` included), ``str``/``repr`` of the
errors it raises and their chained tracebacks, the daemon's event log, ``WatchConfig``'s repr.
The redaction functions themselves: tests/unit/test_redact.py.
"""

from __future__ import annotations

import io
import json
import traceback
from pathlib import Path

import fsspec
import pytest

from ckptsync.config import TransferConfig
from ckptsync.daemon import EventLog, WatchConfig
from ckptsync.errors import CkptSyncError, RemoteError
from ckptsync.local import LocalStore
from ckptsync.manifest import Manifest, make_name
from ckptsync.remote import RemoteStore, translate_error
from tests.support.cli import cli
from tests.support.faults import FaultFS
from tests.support.remotes import Remote

pytestmark = pytest.mark.core

FAST = TransferConfig(retries=1, backoff_initial=0.0, backoff_max=0.0)
PASSWORD = "SECRETPW"
SECRET = "s3cr3t-storage-option-value"
TOKEN = "FwoGZXIvYXdzSESSIONTOKEN0123456789"



def _local_checkpoint(tmp_path: Path) -> Path:
    store = LocalStore(tmp_path / "ckpts")
    st = store.staging(make_name(1))
    st.write_file("w.bin", b"weights")
    st.commit(Manifest.new(step=1, files=st.entries, name=st.name))
    return store.directory


@pytest.mark.parametrize("verbosity", ["", "-v", "-vv"])
@pytest.mark.parametrize("command", ["ls", "push", "pull"])
def test_failing_cli_never_prints_secrets(s3_remote: Remote, tmp_path: Path, command: str,
                                          verbosity: str) -> None:
    bucket = s3_remote.extra["bucket"]
    url = f"s3://user:{PASSWORD}@{bucket}/run"  # a bucket name s3fs refuses: the command fails
    local = str(_local_checkpoint(tmp_path))
    argv = {"ls": ["ls", url], "push": ["push", local, url],
            "pull": ["pull", url, str(tmp_path / "out")]}[command]
    opts = dict(s3_remote.storage_options, secret=SECRET)
    r = cli(*argv, "--no-progress", *([verbosity] if verbosity else []), "-o", f"token={TOKEN}",
            env={"CKPTSYNC_STORAGE_OPTIONS": json.dumps(opts), "CKPTSYNC_RETRIES": "1"})
    assert r.returncode == 1, r.stderr
    assert "ckptsync: error: cannot" in r.stderr and f"s3://{bucket}/run" in r.stderr
    out = r.stdout + r.stderr
    for secret in (PASSWORD, SECRET, TOKEN):
        assert secret not in out, f"{secret} printed by {command} {verbosity}"


def test_debug_log_hides_session_token_and_keys(s3_remote: Remote, tmp_path: Path) -> None:
    """-vv prints botocore's requests (headers, canonical requests): the token is blanked."""
    opts = dict(s3_remote.storage_options, token=TOKEN)
    r = cli("push", str(_local_checkpoint(tmp_path)), s3_remote.url, "-vv", "--no-progress",
            env={"CKPTSYNC_STORAGE_OPTIONS": json.dumps(opts), "CKPTSYNC_RETRIES": "1",
                 "AWS_SESSION_TOKEN": TOKEN})
    out = r.stdout + r.stderr
    assert "Sending http request" in out  # botocore's DEBUG records were printed...
    assert "x-amz-security-token" in out.lower()  # ...with the token header, its value blanked
    assert TOKEN not in out
    assert s3_remote.storage_options["secret"] not in out


def test_debug_log_hides_sse_c_key(s3_remote: Remote, tmp_path: Path) -> None:
    """s3fs logs every call's arguments at DEBUG: an SSE-C key among them is blanked."""
    key = "0123456789abcdef0123456789abcdef"  # 32 bytes, as SSE-C wants
    opts = dict(s3_remote.storage_options,
                s3_additional_kwargs={"SSECustomerAlgorithm": "AES256", "SSECustomerKey": key})
    r = cli("push", str(_local_checkpoint(tmp_path)), s3_remote.url, "-vv", "--no-progress",
            env={"CKPTSYNC_STORAGE_OPTIONS": json.dumps(opts), "CKPTSYNC_RETRIES": "1"})
    out = r.stdout + r.stderr
    assert "SSECustomerKey" in out or "customer-key" in out.lower(), out[-2000:]
    assert key not in out
    import base64

    assert base64.b64encode(key.encode()).decode() not in out


def test_storage_option_typo_is_not_echoed() -> None:
    r = cli("ls", "memory://typo/run", "-o", "anon=true", "-o", "secretkeyvalue-typed-alone")
    assert r.returncode == 2
    assert "storage option #2" in r.stderr and "KEY=VALUE" in r.stderr
    assert "secretkeyvalue" not in r.stderr + r.stdout
    r = cli("watch", "/nonexistent-dir", "memory://typo/run", "-o", "secretkeyvalue-alone")
    assert r.returncode == 2
    assert "storage option #1" in r.stderr and "secretkeyvalue" not in r.stderr + r.stdout


def _all_text(exc: BaseException) -> str:
    return "\n".join([str(exc), repr(exc), *traceback.format_exception(exc)])


def test_raised_errors_and_their_chains_hide_secrets(s3_remote: Remote) -> None:
    bucket = s3_remote.extra["bucket"]
    url = f"s3://user:{PASSWORD}@{bucket}/run"
    store = RemoteStore(url, dict(s3_remote.storage_options, token=TOKEN), config=FAST)
    assert PASSWORD not in repr(store)
    with pytest.raises(RemoteError) as ei:
        store.list()
    text = _all_text(ei.value)
    assert "ParamValidationError" in text  # the backend's exception is still there, as cause
    assert ei.value.__cause__ is not None
    for secret in (PASSWORD, TOKEN):
        assert secret not in text


class _CustomStrError(Exception):
    """A backend exception whose text does not come from its arguments."""

    def __init__(self, token: str) -> None:
        super().__init__()
        self.token = token

    def __str__(self) -> str:
        return f"request with token {self.token} refused"


def test_cause_whose_text_cannot_be_scrubbed_is_replaced(tmp_path: Path) -> None:
    fs = FaultFS(fsspec.filesystem("memory"))
    inner = PermissionError(f"denied: token={TOKEN}")
    outer = _CustomStrError(SECRET)
    outer.__cause__ = inner
    fs.fail_on("ls", nth=1, exc=outer)
    store = RemoteStore("memory://sec-chain/run", {"password": SECRET}, fs=fs, config=FAST)
    with pytest.raises(RemoteError) as ei:
        store.list()
    text = _all_text(ei.value)
    assert SECRET not in text and TOKEN not in text
    assert "_CustomStrError" in text and "refused" in text  # what failed is still said
    assert isinstance(ei.value.__cause__.__cause__, PermissionError)  # type: ignore[union-attr]


def test_translate_error_scrubs_url_password_and_cause() -> None:
    exc = FileNotFoundError(f"no bucket user:{PASSWORD}@bucket")
    err = translate_error(exc, f"s3://user:{PASSWORD}@bucket/run", "list")
    assert isinstance(err, CkptSyncError) and err.__cause__ is exc
    assert PASSWORD not in _all_text(err) and PASSWORD not in str(exc)
    assert isinstance(exc, FileNotFoundError)


def test_watch_config_repr_hides_storage_options_and_url_password(tmp_path: Path) -> None:
    cfg = WatchConfig(local_dir=tmp_path, remote=f"s3://user:{PASSWORD}@bucket/run",
                      storage_options={"secret": SECRET, "client_kwargs": {"region_name": "x"}})
    text = repr(cfg)
    assert SECRET not in text and PASSWORD not in text
    assert "client_kwargs" in text and "secret" in text  # the keys, not the values
    assert "s3://bucket/run" in text


def test_daemon_event_log_hides_secrets(tmp_path: Path) -> None:
    from ckptsync.redact import remember

    remember([SECRET])
    stream = io.StringIO()
    for fmt in ("kv", "json"):
        EventLog(stream, fmt=fmt)("error", "failed", error=f"bad {SECRET} token={TOKEN}",
                                  remote=f"s3://user:{PASSWORD}@b/run")
    out = stream.getvalue()
    assert "event=failed" in out and '"event": "failed"' in out
    for secret in (SECRET, TOKEN, PASSWORD):
        assert secret not in out
