"""The checkpoint format: ``ckptsync.json`` parsing, validation, round trips, and names."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import blake3
import pytest

from ckptsync.errors import CorruptCheckpointError, ManifestError, UnsupportedFormatError
from ckptsync.manifest import (
    FORMAT,
    MAX_MANIFEST_BYTES,
    FileEntry,
    Manifest,
    check_relpath,
    make_name,
    manifest_bound,
    name_sort_key,
    new_hasher,
    parse_name,
)
from tests.support.formats import seal

pytestmark = pytest.mark.core

SHA = "ab" * 32
B3 = "cd" * 32
WHERE = "/runs/a/step-x/ckptsync.json"


def good(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "format": FORMAT,
        "name": "step-000000000007-20260101T000000000000Z-abcdef",
        "step": 7,
        "created": "2026-01-01T00:00:00Z",
        "files": [{"path": "model.pt", "size": 10, "blake3": B3},
                  {"path": "sub/dir/opt.pt", "size": 0, "sha256": "0" * 64}],
        "metrics": {"loss": 1.5, "acc": 1},
        "meta": {"world_size": 1},
        "source": {"kind": "native"},
        "extra": {"lr": 0.1, "tags": ["a"]},
    }
    d.update(over)
    return d


def parse(d: Any, *, sealed: bool = True) -> Manifest:
    """Parse ``d``; a format 2 object is first given its correct ``manifest_digest``, so that a
    test about another rule is not refused for the digest."""
    if sealed and isinstance(d, dict) and str(d.get("format", "")).startswith("ckptsync/2"):
        d = seal(d)
    return Manifest.from_json(json.dumps(d), where=WHERE)


# --------------------------------------------------------------------------- round trips
def test_new_round_trips_through_json() -> None:
    m = Manifest.new(step=3, files=[FileEntry("model.pt", 5, "blake3", B3)], metrics={"loss": 2},
                     meta={"host": "h"}, extra={"args": {"lr": 0.1}})
    again = Manifest.from_json(m.to_json(), where=WHERE)
    assert again == m
    assert again.format == FORMAT and again.step == 3 and again.metrics == {"loss": 2.0}
    assert parse_name(m.name) == (3, m.name.split("-")[2])
    assert m.created.endswith("Z") and m.created_dt.tzinfo is not None
    assert m.total_size == 5


def test_parsed_fields() -> None:
    m = parse(good())
    assert m.files[0] == FileEntry("model.pt", 10, "blake3", B3)
    assert m.files[1] == FileEntry("sub/dir/opt.pt", 0, "sha256", "0" * 64)
    assert m.metrics == {"loss": 1.5, "acc": 1.0} and isinstance(m.metrics["acc"], float)
    assert m.extra == {"lr": 0.1, "tags": ["a"]} and m.meta == {"world_size": 1}


@pytest.mark.parametrize("fmt", ["ckptsync/1.4", "ckptsync/2.4"])
def test_unknown_top_level_fields_are_preserved(fmt: str) -> None:
    d = good(future_field={"x": [1, 2]}, format=fmt)
    m = parse(d)
    assert m.unknown == {"future_field": {"x": [1, 2]}}
    out = json.loads(m.to_json())
    assert out["future_field"] == {"x": [1, 2]} and out["format"] == fmt
    assert Manifest.from_json(m.to_json(), where=WHERE) == m


def test_unknown_fields_of_a_file_entry_are_preserved() -> None:
    """A newer 2.x writer may describe files more richly; rewriting must not drop it."""
    d = good()
    d["files"][0]["compression"] = "zstd"
    out = json.loads(parse(d).to_json())
    assert out["files"][0].get("compression") == "zstd"


def test_optional_fields_default() -> None:
    d = good()
    for k in ("metrics", "meta", "source", "extra"):
        del d[k]
    m = parse(d)
    assert m.metrics == {} and m.meta == {} and m.extra == {}
    assert m.source == {"kind": "native"}


def test_null_step() -> None:
    m = parse(good(step=None, name="nostep-20260101T000000000000Z-abcdef"))
    assert m.step is None


# --------------------------------------------------------------------------- validation
def _refused(d: Any, match: str, exc: type[Exception] = ManifestError, *,
             sealed: bool = True) -> ManifestError:
    with pytest.raises(exc, match=match) as e:
        parse(d, sealed=sealed)
    assert WHERE in str(e.value), f"error does not name the manifest: {e.value}"
    assert isinstance(e.value, CorruptCheckpointError)
    return e.value  # type: ignore[return-value]


def test_not_json() -> None:
    with pytest.raises(ManifestError, match="not valid JSON") as e:
        Manifest.from_json(b'{"format": "ckptsync/1", ', where=WHERE)
    assert WHERE in str(e.value)
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.from_json(b"\xff\xfe\x00garbage", where=WHERE)


@pytest.mark.parametrize("obj", [[], "x", 3, None])
def test_not_an_object(obj: Any) -> None:
    _refused(obj, "JSON object")


@pytest.mark.parametrize("fmt", [None, "", "torch", "ckptsync", 1])
def test_not_a_ckptsync_manifest(fmt: Any) -> None:
    _refused(good(format=fmt), "not a ckptsync manifest")


@pytest.mark.parametrize("fmt", ["ckptsync/3", "ckptsync/10", "ckptsync/0", "ckptsync/3.0"])
def test_unknown_major_format_is_refused_clearly(fmt: str) -> None:
    e = _refused(good(format=fmt), "upgrade ckptsync", UnsupportedFormatError)
    assert repr(fmt) in str(e)


@pytest.mark.parametrize("name", [None, "", "a/b", ".staging-x", "..", 5])
def test_bad_names(name: Any) -> None:
    _refused(good(name=name), "invalid checkpoint name")


@pytest.mark.parametrize("step", [-1, 1.5, "7", True])
def test_bad_steps(step: Any) -> None:
    _refused(good(step=step), "invalid step")


@pytest.mark.parametrize("created", [None, "yesterday", "2026-13-01T00:00:00Z", 5])
def test_bad_created(created: Any) -> None:
    _refused(good(created=created), "created")


@pytest.mark.parametrize("files", [None, {}, "model.pt"])
def test_files_must_be_a_list(files: Any) -> None:
    _refused(good(files=files), "'files' must be a list")


@pytest.mark.parametrize(
    "path",
    ["../x.pt", "a/../../x", "/abs/x.pt", "a//b", "./x", "a/.", "", "dir/", "a\\b",
     "C:/x", "c:x", "x\x00y", "ckptsync.json"],
)
def test_unsafe_paths_are_refused(path: str) -> None:
    d = good()
    d["files"][0]["path"] = path
    _refused(d, "file path|may not be named")


@pytest.mark.parametrize("path", [None, 3, ["a"]])
def test_path_must_be_a_string(path: Any) -> None:
    d = good()
    d["files"][0]["path"] = path
    _refused(d, "non-empty string")


@pytest.mark.parametrize("size", [-1, 1.0, "10", None, True])
def test_bad_sizes(size: Any) -> None:
    d = good()
    d["files"][0]["size"] = size
    _refused(d, "invalid size")


@pytest.mark.parametrize("algo", ["blake3", "sha256"])
@pytest.mark.parametrize("digest", [None, "", "ab" * 31, "AB" * 32, "zz" * 32, "ab" * 33])
def test_bad_digests(algo: str, digest: Any) -> None:
    d = good()
    d["files"][0] = {"path": "model.pt", "size": 10, algo: digest}
    _refused(d, f"invalid {algo} digest")


def test_file_entry_must_be_an_object() -> None:
    _refused(good(files=["model.pt"]), "must be an object")


def test_duplicate_paths() -> None:
    d = good()
    d["files"].append(dict(d["files"][0], size=3))
    _refused(d, "listed twice")


@pytest.mark.parametrize("metrics", [[], {"loss": "1.0"}, {"ok": True}, {"m": None}])
def test_bad_metrics(metrics: Any) -> None:
    _refused(good(metrics=metrics), "metrics")


@pytest.mark.parametrize("key", ["meta", "source", "extra"])
def test_object_fields_must_be_objects(key: str) -> None:
    _refused(good(**{key: [1]}), repr(key))


def test_new_refuses_what_the_parser_refuses() -> None:
    with pytest.raises(ManifestError, match="unsafe file path"):
        Manifest.new(step=1, files=[FileEntry("../x", 1, "blake3", B3)])
    with pytest.raises(ManifestError, match="listed twice"):
        Manifest.new(step=1, files=[FileEntry("a", 1, "blake3", B3),
                                    FileEntry("a", 1, "sha256", SHA)])


def test_check_relpath_accepts_nested_posix_paths() -> None:
    assert check_relpath("a/b/c.pt", where="w") == "a/b/c.pt"
    assert check_relpath("sub/ckptsync.json", where="w") == "sub/ckptsync.json"


# --------------------------------------------------------------------------- names, order
def test_names_are_unique_and_sort_by_step_then_time() -> None:
    t = datetime(2026, 1, 1, tzinfo=timezone.utc)
    names = [make_name(s, t + timedelta(seconds=i)) for i, s in enumerate([2, 10, 2, 100])]
    assert len({make_name(5, t) for _ in range(50)}) == 50  # same step, same instant
    ordered = sorted(names, key=name_sort_key)
    assert ordered == [names[0], names[2], names[1], names[3]]
    assert sorted(names) == ordered  # plain string order agrees (zero padding)


def test_name_format() -> None:
    t = datetime(2026, 11, 28, 10, 15, 0, 123456, tzinfo=timezone.utc)
    n = make_name(42, t)
    assert n.startswith("step-000000000042-20261128T101500123456Z-")
    assert parse_name(n) == (42, "20261128T101500123456Z")
    s = make_name(None, t)
    assert s.startswith("nostep-20261128T101500123456Z-") and parse_name(s) == (None, s[7:29])


def test_name_times_are_utc() -> None:
    local = datetime(2026, 1, 1, 5, 0, tzinfo=timezone(timedelta(hours=5)))
    assert parse_name(make_name(1, local)) == (1, "20260101T000000000000Z")


@pytest.mark.parametrize("step", [-1, True, 1.0, 10**12])
def test_make_name_refuses_bad_steps(step: Any) -> None:
    with pytest.raises(ManifestError):
        make_name(step)


def test_foreign_names_sort_oldest_and_stepless_before_stepped() -> None:
    stepless = make_name(None)
    stepped = make_name(0)
    assert parse_name("my-backup") is None
    assert sorted([stepped, stepless, "my-backup"], key=name_sort_key) == [
        "my-backup", stepless, stepped]


def test_manifest_sort_key_uses_step_then_creation_time() -> None:
    t = datetime(2026, 1, 1, tzinfo=timezone.utc)
    a = Manifest.new(step=5, files=[], created=t + timedelta(hours=1))
    b = Manifest.new(step=5, files=[], created=t + timedelta(hours=2))
    c = Manifest.new(step=6, files=[], created=t)
    assert sorted([c, b, a], key=Manifest.sort_key) == [a, b, c]


def test_manifest_sort_key_compares_instants_not_strings() -> None:
    """Two writers with different UTC offsets: 01:00Z is later than 05:00+05:00 (00:00Z)."""
    early = parse(good(created="2026-01-01T05:00:00+05:00", name="a"))
    late = parse(good(created="2026-01-01T01:00:00Z", name="b"))
    assert early.sort_key() < late.sort_key()


# --------------------------------------------------------------------------- ckptsync/2
def v1(**over: Any) -> dict[str, Any]:
    """A manifest as ``ckptsync/1`` wrote it: sha256 entries and no ``manifest_digest``."""
    d = good(format="ckptsync/1", **over)
    d["files"] = [{"path": "model.pt", "size": 10, "sha256": SHA}]
    return d


def test_writes_format_2_with_blake3_and_a_self_digest() -> None:
    m = Manifest.new(step=3, files=[FileEntry("model.pt", 5, "blake3", B3)])
    out = json.loads(m.to_json())
    assert out["format"] == "ckptsync/2" == FORMAT
    assert out["files"] == [{"path": "model.pt", "size": 5, "blake3": B3}]
    assert out == seal(out), "manifest_digest is not the documented canonical digest"


def test_format_1_manifests_stay_readable() -> None:
    m = parse(v1())
    assert m.format == "ckptsync/1" and m.files == (FileEntry("model.pt", 10, "sha256", SHA),)
    out = json.loads(m.to_json())  # rewritten as it was: still format 1, no self-digest
    assert out["format"] == "ckptsync/1" and "manifest_digest" not in out
    assert out["files"] == [{"path": "model.pt", "size": 10, "sha256": SHA}]


def test_format_2_without_its_digest_is_refused() -> None:
    _refused(good(), "no valid 'manifest_digest'.*altered", sealed=False)
    _refused(dict(good(), manifest_digest="ab"), "no valid 'manifest_digest'", sealed=False)


def test_format_2_whose_content_changed_is_refused() -> None:
    d = seal(good())
    d["step"] = 9
    d["name"] = "step-000000000009-20260101T000000000000Z-abcdef"  # step and name agree
    _refused(d, "does not match its 'manifest_digest'.*altered", sealed=False)


def test_the_digest_covers_unknown_fields() -> None:
    d = seal(good(future={"keep": 1}))
    assert parse(d, sealed=False).unknown == {"future": {"keep": 1}}
    d["future"] = {"keep": 2}
    _refused(d, "altered", sealed=False)
    _refused(dict(seal(good()), added=1), "altered", sealed=False)


def test_format_1_carrying_a_self_digest_was_altered() -> None:
    """Only format 2 writes ``manifest_digest``: a "/1" that has one was downgraded."""
    _refused(dict(seal(good()), format="ckptsync/1"), "altered", sealed=False)


def test_unknown_self_digest_algorithm_is_unsupported() -> None:
    d = dict(good(), manifest_digest={"sha3_512": "00"})
    _refused(d, "upgrade ckptsync", UnsupportedFormatError, sealed=False)


@pytest.mark.parametrize("make", [good, v1])
def test_an_entry_without_a_known_digest_is_unsupported(make: Any) -> None:
    d = make()
    d["files"][0] = {"path": "model.pt", "size": 10, "xxh3": "00" * 16}
    e = _refused(d, "model.pt.*no digest this ckptsync can verify", UnsupportedFormatError)
    assert "xxh3" in str(e) and "upgrade ckptsync" in str(e)
    d["files"][0] = {"path": "model.pt", "size": 10}
    _refused(d, "model.pt.*no digest", UnsupportedFormatError)


@pytest.mark.parametrize("make", [good, v1])
@pytest.mark.parametrize(("name", "step"), [
    ("step-000000000007-20260101T000000000000Z-abcdef", 8),
    ("step-000000000007-20260101T000000000000Z-abcdef", None),
    ("nostep-20260101T000000000000Z-abcdef", 7),
])
def test_step_must_equal_the_step_in_the_name(make: Any, name: str, step: int | None) -> None:
    e = _refused(make(name=name, step=step), "differs from the step in the checkpoint's name")
    assert name in str(e)


def test_foreign_names_carry_no_step_to_check() -> None:
    assert parse(good(name="my-backup", step=123)).step == 123


def test_hashers() -> None:
    assert new_hasher("blake3").hexdigest() == blake3.blake3().hexdigest()
    h = new_hasher("sha256")
    h.update(b"abc")
    assert h.hexdigest().startswith("ba7816bf")
    with pytest.raises(UnsupportedFormatError, match="'md5'"):
        new_hasher("md5")


def test_every_single_bit_flip_of_a_manifest_is_refused() -> None:
    """A single flipped bit anywhere in a format 2 manifest never parses."""
    m = Manifest.new(step=101, files=[FileEntry("model.pt", 10, "blake3", B3)],
                     metrics={"loss": 1.5})
    data = m.to_json()
    assert Manifest.from_json(data, where=WHERE) == m
    accepted = []
    for i in range(len(data)):
        for bit in range(8):
            flipped = bytearray(data)
            flipped[i] ^= 1 << bit
            try:
                got = Manifest.from_json(bytes(flipped), where=WHERE)
            except ManifestError as e:
                assert WHERE in str(e)
                continue
            accepted.append((i, bit, got.step))
    assert len(data) * 8 > 3000 and accepted == []


# --------------------------------------------------------------------------- size bound
def test_an_oversized_manifest_is_refused_naming_path_size_and_bound() -> None:
    d = seal(good(extra={"pad": "x" * MAX_MANIFEST_BYTES}))
    data = json.dumps(d).encode()
    with pytest.raises(ManifestError) as e:
        Manifest.from_json(data, where=WHERE)
    msg = str(e.value)
    assert WHERE in msg and f"{len(data):,} bytes" in msg and f"{MAX_MANIFEST_BYTES:,}" in msg


def test_a_writer_cannot_make_a_manifest_readers_refuse() -> None:
    with pytest.raises(ManifestError, match="bound"):
        Manifest.new(step=1, files=[], extra={"pad": "x" * MAX_MANIFEST_BYTES})


def test_a_manifest_at_the_bound_is_read() -> None:
    d = good(extra={"pad": ""})
    bound = manifest_bound(len(d["files"]))
    room = bound - len(json.dumps(seal(d)).encode())
    d = seal(good(extra={"pad": "x" * room}))
    data = json.dumps(d).encode()
    assert len(data) == bound
    assert parse(d, sealed=False).extra["pad"] == "x" * room
