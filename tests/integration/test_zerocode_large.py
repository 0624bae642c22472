"""A large zero-code version uploads: ``watch --once`` of a version whose
manifest is over the 4 MiB that bounded every manifest before, and its log lines stay short
(a file list is summarised: a count, the first few paths, the bytes)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from ckptsync.manifest import MANIFEST_NAME
from ckptsync.remote import RemoteStore
from tests.support.remotes import Remote
from tests.support.watchkit import run_cli

pytestmark = pytest.mark.full

FILES = 8_000
#: The fixed bound every manifest had before it grew with the file count.
OLD_BOUND = 4 * 1024 * 1024
#: Long paths, so that 8,000 files make a manifest over 4 MiB (as 22,000 short ones do).
STEM = "p" * 200


def test_watch_once_uploads_a_version_whose_manifest_is_over_4_mib(
        tmp_path: Path, file_remote: Remote) -> None:
    out = tmp_path / "run"
    (out / "shards").mkdir(parents=True)
    old = time.time() - 600  # written long ago: quiet
    for i in range(FILES):
        p = out / "shards" / f"{STEM}{i:05d}.bin"
        p.write_bytes(i.to_bytes(4, "little") * 64)
        os.utime(p, (old, old))
    done = run_cli("watch", str(out), file_remote.url, "--once", "--json",
                   "--rule", "file:shards/*.bin", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    [m] = RemoteStore(file_remote.url).list()
    assert len(m.files) == FILES and m.total_size == FILES * 256
    assert len((Path(file_remote.path) / m.name / MANIFEST_NAME).read_bytes()) \
        > OLD_BOUND
    lines = done.stderr.splitlines()
    assert max(len(line) for line in lines) < 2_000, max(lines, key=len)[:500]
    taken = [json.loads(line) for line in lines if '"version_taken"' in line]
    assert taken and taken[0]["files"] == FILES and taken[0]["bytes"] == FILES * 256
    assert len(taken[0]["paths"]) < 10 and taken[0]["more_paths"] == FILES - len(taken[0]["paths"])
