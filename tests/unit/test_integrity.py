"""The integrity rules, pure: keyed manifests, the encryption policy, the root marker's keys,
``requires``, the order of step-less versions, and the log scrubber of a training process."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
from datetime import datetime, timedelta, timezone

import pytest

from ckptsync.crypto import KeyRing
from ckptsync.errors import (
    CorruptCheckpointError,
    EncryptionKeyError,
    UnknownKeyError,
    UnsupportedFormatError,
)
from ckptsync.integrity import check_checkpoint, sign_manifest
from ckptsync.manifest import ENC_FIELD, FileEntry, Manifest, make_name, pending_sort_key
from ckptsync.redact import install_scrubber
from ckptsync.remote.marker import RootMarker

pytestmark = pytest.mark.core

A, B = KeyRing((os.urandom(32),)), KeyRing((os.urandom(32),))
DIGEST = "ab" * 32


def encrypted(step: int, ring: KeyRing = A) -> Manifest:
    enc = {"alg": "aes-256-gcm-chunked/1", "key_id": ring.current_id, "size": 10}
    files = [FileEntry("model.pt", 60, "blake3", DIGEST, {ENC_FIELD: enc})]
    return sign_manifest(Manifest.new(step=step, files=files, metrics={"loss": 1.0}), ring)


def test_a_keyed_manifest_verifies_and_lists_what_a_reader_must_know() -> None:
    m = encrypted(3)
    assert m.requires == ("encryption/1",)
    again = Manifest.from_json(m.to_json(), where="x")
    check_checkpoint(again, A, vouched=None, where="x")  # passes
    # run and seq, added by a push, are outside the MAC (a pusher without the key adds them).
    pushed = dataclasses.replace(again, unknown={**again.unknown, "run": "r" * 32, "seq": 7})
    check_checkpoint(Manifest.from_json(pushed.to_json(), where="x"), A, vouched=None, where="x")


@pytest.mark.parametrize("edit", [
    lambda m: dataclasses.replace(m, metrics={"loss": 0.0}),
    lambda m: dataclasses.replace(m, extra={"lr": 9.0}),
    lambda m: dataclasses.replace(m, unknown={**m.unknown, "requires": []}),
])
def test_an_altered_keyed_manifest_is_refused(edit: object) -> None:
    bad = edit(encrypted(3))  # type: ignore[operator]
    with pytest.raises(CorruptCheckpointError, match="keyed MAC does not match"):
        check_checkpoint(Manifest.from_json(bad.to_json(), where="x"), A, vouched=None,
                         where="x")


def test_key_ids_no_key_vouches_for_are_skipped_those_of_the_run_are_missing_keys() -> None:
    m = encrypted(3, B)
    with pytest.raises(UnknownKeyError):  # a CorruptCheckpointError: restore moves on
        check_checkpoint(m, A, vouched=None, where="x")
    with pytest.raises(EncryptionKeyError, match=B.current_id):
        check_checkpoint(m, A, vouched={B.current_id}, where="x")
    with pytest.raises(EncryptionKeyError):  # no key at all: the run's key is missing
        check_checkpoint(m, None, vouched=None, where="x")


def test_plaintext_is_refused_under_a_key_or_on_an_encrypted_root_unless_allowed() -> None:
    plain = Manifest.new(step=1, files=[FileEntry("model.pt", 5, "blake3", DIGEST)])
    for keys, root in ((A, False), (None, True)):
        with pytest.raises(CorruptCheckpointError, match="not encrypted"):
            check_checkpoint(plain, keys, vouched=None, encrypted_root=root, where="x")
        check_checkpoint(plain, keys, vouched=None, encrypted_root=root, allow_plaintext=True,
                         where="x")
    check_checkpoint(plain, None, vouched=None, where="x")  # no key, plaintext run: as ever


def test_the_root_marker_vouches_for_its_key_ids_to_any_of_its_keys() -> None:
    ring = KeyRing((B.keys[0], A.keys[0]))
    marker = RootMarker.new("r" * 32, A).updated(ring)
    parsed = RootMarker.parse(marker.to_json(ring), "m")
    assert parsed.encrypted and parsed.run == "r" * 32
    assert parsed.vouched(A) == {A.current_id, B.current_id}
    assert parsed.vouched(KeyRing((os.urandom(32),))) is None
    forged = json.loads(marker.to_json(ring))
    forged["key_ids"].append("0123456789abcdef")
    assert RootMarker.parse(json.dumps(forged).encode(), "m").vouched(A) is None


def test_an_unknown_feature_is_unsupported_never_corrupt() -> None:
    obj = json.loads(Manifest.new(step=1, files=[]).to_json())
    obj.pop("manifest_digest")
    obj.update(requires=["zstd/1"], written_by="ckptsync 9.9")
    from tests.support.formats import seal

    with pytest.raises(UnsupportedFormatError, match=r"'zstd/1'.*ckptsync 9\.9"):
        Manifest.from_json(json.dumps(seal(obj)), where="x")


def test_step_less_versions_order_by_seq_not_by_their_clock() -> None:
    now = datetime.now(timezone.utc)

    def version(created: datetime, seq: int | None) -> Manifest:
        m = Manifest.new(step=None, files=[], name=make_name(None, created), created=created)
        return m if seq is None else dataclasses.replace(m, unknown={"seq": seq})

    ahead, later = version(now + timedelta(hours=1), 1), version(now, 2)
    assert later.sort_key() > ahead.sort_key()
    assert ahead == dataclasses.replace(ahead, unknown={})  # seq is where, not what
    legacy, pending = version(now + timedelta(hours=2), None), version(now, None)
    assert legacy.sort_key() < ahead.sort_key() < pending_sort_key(pending)


def test_library_records_are_scrubbed_as_they_are_made() -> None:
    install_scrubber()
    out = io.StringIO()
    handler = logging.StreamHandler(out)  # a trainer's own handler: no filter of ours
    logger = logging.getLogger("botocore.endpoint")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        logger.debug("headers={'X-Amz-Security-Token': b'SESSION123456789'} url=%s",
                     "https://user:hunter2pw@host/x")
        logging.getLogger("someone.else").addHandler(handler)
        logging.getLogger("someone.else").warning("token=not-ours-to-touch")
    finally:
        logger.removeHandler(handler)
        logging.getLogger("someone.else").removeHandler(handler)
        logger.setLevel(old)
    text = out.getvalue()
    assert "SESSION123456789" not in text and "hunter2pw" not in text
    assert "token=not-ours-to-touch" in text  # other loggers' records are left alone
