"""GCS's refusal of an upload whose declared CRC32C does not match the bytes it
received reads as a retryable error that says what happened, to which path."""

from __future__ import annotations

import pytest

from ckptsync.errors import RemoteError
from ckptsync.remote import translate_error

pytestmark = pytest.mark.core


def test_a_gcs_refusal_of_damaged_bytes_is_retryable_and_says_so() -> None:
    # What gcsfs raises for GCS's 400 (reason "invalid"): gcsfs/retry.py validate_response.
    url = "gs://bucket/run/step-7/model.bin"
    exc = ValueError('Bad Request: https://storage.googleapis.com/upload/storage/v1/b/bucket/o'
                     '?uploadType=resumable&upload_id=x\nProvided CRC32C "AAAAAA==" doesn\'t '
                     'match calculated CRC32C "2HvlZg==".')
    err = translate_error(exc, url, "upload to")
    assert isinstance(err, RemoteError) and err.retryable
    assert "damaged in transit" in str(err) and url in str(err)


def test_another_gcs_bad_request_is_not_retried() -> None:
    exc = ValueError("Bad Request: https://storage.googleapis.com/x\nInvalid bucket name")
    err = translate_error(exc, "gs://Bad_Bucket/run", "upload to")
    assert isinstance(err, RemoteError) and not err.retryable
