"""The manifest's size bound grows with its file count: a zero-code version
of tens of thousands of files has a manifest readers accept; one over its bound is refused
with an error naming the file count and the bound, and a writer never writes it."""

from __future__ import annotations

import json

import pytest

from ckptsync.errors import ManifestError
from ckptsync.manifest import (
    MANIFEST_BASE_BYTES,
    MAX_MANIFEST_BYTES,
    FileEntry,
    Manifest,
    manifest_bound,
)
from tests.support.formats import seal

pytestmark = pytest.mark.core

B3 = "cd" * 32
WHERE = "/runs/a/step-x/ckptsync.json"


def _entries(n: int, width: int = 16) -> list[FileEntry]:
    return [FileEntry(f"shards/{i:0{width}d}.bin", 4096, "blake3", B3) for i in range(n)]


def _watched(files: list[FileEntry]) -> Manifest:
    return Manifest.new(step=None, files=files, source={
        "kind": "watched", "rule": "file:shards/*.bin", "paths": [f.path for f in files]})


def test_a_version_of_thirty_thousand_files_has_a_manifest_readers_accept() -> None:
    m = _watched(_entries(30_000))
    data = m.to_json()
    assert len(data) > MANIFEST_BASE_BYTES  # over the bound of old, which refused it
    back = Manifest.from_json(data, where=WHERE)
    assert len(back.files) == 30_000 and back.files[-1] == m.files[-1]


def test_the_bound_grows_with_the_file_count_up_to_the_most_a_reader_reads() -> None:
    assert manifest_bound(0) == MANIFEST_BASE_BYTES
    assert manifest_bound(10) - manifest_bound(9) > 300  # room for a long path, twice
    assert manifest_bound(10**7) == MAX_MANIFEST_BYTES


def test_padding_a_small_manifest_past_its_bound_is_refused_naming_count_and_bound() -> None:
    """Few files and megabytes of padding: refused after parsing, with the count."""
    d = json.loads(_watched(_entries(3)).to_json())
    d["extra"] = {"pad": "x" * (MANIFEST_BASE_BYTES + 10_000)}
    data = json.dumps(seal(d)).encode()
    assert len(data) < MAX_MANIFEST_BYTES
    with pytest.raises(ManifestError) as e:
        Manifest.from_json(data, where=WHERE)
    msg = str(e.value)
    assert WHERE in msg and f"{len(data):,} bytes" in msg and "3 files" in msg
    assert f"{manifest_bound(3):,}-byte bound" in msg


def test_a_writer_refuses_a_manifest_over_its_bound_naming_count_bound_and_what_to_do() -> None:
    """Paths so long that even the per-file room is exceeded: the writer says what happened
    and what to do, and never that something else wrote it."""
    files = _entries(2_000, width=1_500)
    with pytest.raises(ManifestError) as e:
        _watched(files)
    msg = str(e.value)
    assert "2,000 files" in msg and f"{manifest_bound(2_000):,}-byte bound" in msg
    assert "nothing was written" in msg and "one watch rule per subdirectory" in msg
    assert "check what wrote it" not in msg
