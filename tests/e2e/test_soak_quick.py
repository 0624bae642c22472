"""The quick form of ``make soak``: 20 randomized SIGKILL trials of the trainer and
the daemon, on file:// remotes and one SeaweedFS run; see tests/support/soak/soak.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import servers
from tests.support.faultkit import seed_from_env
from tests.support.soak import soak

pytestmark = [pytest.mark.full, pytest.mark.serial]


def test_randomized_sigkills_never_lose_or_corrupt_a_committed_checkpoint(
        tmp_path: Path, seaweedfs_server: servers.SeaweedFS) -> None:
    seed = seed_from_env(16)
    m = soak.run(20, seed, tmp_path, s3_every=4, s3=seaweedfs_server, max_seconds=240)
    print(m.report(seed))
    assert m.trials == 20 and not m.violations, m.report(seed)
    assert sum(m.kills.values()) >= 15 and m.restores >= 20 and m.committed >= 20
    assert m.max_final_lag == 0
