"""ckptsync.redact: URL passwords, credential headers and storage-option secrets are blanked in
text and in log records (the places ckptsync shows them: tests/integration/test_secrets.py)."""

from __future__ import annotations

import io
import logging

import pytest

from ckptsync.redact import SecretFilter, redact_url, scrub

pytestmark = pytest.mark.core

PASSWORD = "SECRETPW"
SECRET = "s3cr3t-storage-option-value"
TOKEN = "FwoGZXIvYXdzSESSIONTOKEN0123456789"


def test_redact_url_and_scrub() -> None:
    assert redact_url(f"s3://user:{PASSWORD}@bucket/run?x=1") == "s3://bucket/run"
    assert redact_url("gs://bucket/run") == "gs://bucket/run"
    lines = {
        "headers={'X-Amz-Security-Token': b'AbC/123+xyz==', 'Host': 'h'}": "AbC/123+xyz==",
        "x-amz-security-token:AbCdEf123\nhost:h": "AbCdEf123",
        "Authorization: AWS4-HMAC-SHA256 Credential=AKIAEXAMPLE/2026, Signature=deadbeef":
            "deadbeef",
        "{'Bucket': 'b', 'SSECustomerKey': 'k3y-material-here'}": "k3y-material-here",
        "GET /b/k?X-Amz-Security-Token=tok123456&X-Amz-Signature=sig987654": "tok123456",
        f"see https://user:{PASSWORD}@host/path": PASSWORD,
    }
    for line, secret in lines.items():
        assert secret not in scrub(line), line
    assert "AKIAEXAMPLE" not in scrub("Credential=AKIAEXAMPLE/2026/us-east-1/s3/aws4_request")
    assert scrub("Key='run/ckpt/model.pt', ContinuationToken=abc") == \
        "Key='run/ckpt/model.pt', ContinuationToken=abc"  # ordinary fields stay readable


def test_log_filter_scrubs_messages_args_and_tracebacks() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(SecretFilter([SECRET]))
    logger = logging.getLogger("test_secrets.filter")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("call with %s", {"aws_session_token": TOKEN, "secret": SECRET})
        try:
            raise ValueError(f"boom {SECRET}")
        except ValueError:
            logger.exception("failed for %s", f"s3://user:{PASSWORD}@b/run")
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-access-key-value")
            logger.debug("x")
            logger.error("key is env-secret-access-key-value")
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    assert "boom" in out and "ValueError" in out
    for secret in (TOKEN, SECRET, PASSWORD, "env-secret-access-key-value"):
        assert secret not in out


def test_storage_options_secrets_chosen_by_key() -> None:
    from ckptsync.redact import secrets_of

    found = secrets_of({"key": "AKIAEXAMPLE", "secret": "abcdef123", "anon": False,
                        "client_kwargs": {"endpoint_url": "https://minio:9000",
                                          "region_name": "us-east-1",
                                          "aws_session_token": "tok-123456"},
                        "token": "anon"}, f"s3://user:{PASSWORD}@b/run")
    assert {"AKIAEXAMPLE", "abcdef123", "tok-123456", PASSWORD} <= set(found)
    assert not {"https://minio:9000", "us-east-1", "anon"} & set(found)
