"""Push, pull and the daemon through a fault-injecting proxy.

A :class:`fault_proxy.FaultProxy` with a seeded :class:`fault_proxy.Chaos` plan sits between
ckptsync and a real server (SeaweedFS, fake-gcs-server) and faults 10% or 30% of all requests:
connection resets and closes, 500, 503 SlowDown, latency, bodies cut short, replies dropped
after the server acted, black holes. Every checkpoint must end committed exactly once, none
corrupt, the newest pulled byte for byte, within a time bound.

The quick form (20 checkpoints) runs in ``make test``; ``make soak`` sets
``CKPTSYNC_FAULT_CHECKPOINTS=50`` (or more). ``CKPTSYNC_FAULT_SEED`` replays a seed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from ckptsync.local import LocalStore
from ckptsync.remote import RemoteStore
from tests.support.faultkit import (
    FAST,
    FAST_ENV,
    assert_each_committed_once,
    options_through,
    proxy_for,
    pull_newest_equal,
    push_until_committed,
    retry_remote,
    seed_from_env,
    summary,
)
from tests.support.remotes import Remote
from tests.support.watchkit import make_checkpoints, run_cli

pytestmark = pytest.mark.full

# The quick form (make test) pushes 20 checkpoints to SeaweedFS and 10 to fake-gcs-server:
# gcsfs retries each failed request itself, 6 times, sleeping 1, 2, 4, 8, 16 s (fixed in gcsfs),
# so at 30% faults one GCS checkpoint can take ~10 s. make soak sets 50 (or more) for both.
FULL_N = os.environ.get("CKPTSYNC_FAULT_CHECKPOINTS", "")
N = {"seaweedfs": int(FULL_N or 20), "gcs": int(FULL_N or 10)}
# Seconds per checkpoint for a whole test, pushes, verifies and pull included.
PER_CKPT_S = {"seaweedfs": 6.0, "gcs": 15.0}
RATES = [0.1, 0.3]


def bound_s(backend: str) -> float:
    return 60.0 + PER_CKPT_S[backend] * N[backend]


def _remote(request: pytest.FixtureRequest, backend: str) -> Remote:
    r: Remote = request.getfixturevalue(f"{backend}_remote")
    return r


@pytest.mark.parametrize("rate", RATES, ids=lambda r: f"{r:.0%}")
@pytest.mark.parametrize("backend", ["seaweedfs", "gcs"])
def test_push_and_pull_through_faults_commit_each_checkpoint_once(
        request: pytest.FixtureRequest, tmp_path: Path, backend: str, rate: float) -> None:
    remote = _remote(request, backend)
    seed = seed_from_env(int(rate * 1000) + (1 if backend == "gcs" else 0))
    n, bound = N[backend], bound_s(backend)
    local = LocalStore(tmp_path / "local")
    names = make_checkpoints(local.directory, list(range(1, n + 1)), size=3000)
    ckpts = {c.name: c for c in local.list()}
    ordered = [ckpts[n] for n in names]
    t0 = time.monotonic()
    with proxy_for(backend, remote.extra["endpoint"], rate, seed) as proxy:
        store = RemoteStore(remote.url, options_through(backend, remote.storage_options, proxy),
                            config=FAST)
        try:
            pushes = push_until_committed(store, ordered, deadline_s=bound)
        finally:
            (tmp_path / "faults.log").write_text("\n".join(proxy.fired) + "\n")
        for name in names:  # verify through the faults: a fault is never a corrupt verdict
            retry_remote(lambda n=name: store.verify(n, full=True), f"verify {name}")
        pulled = pull_newest_equal(store, ordered[-1], tmp_path / "pulled")
    elapsed = time.monotonic() - t0
    print(summary(f"push+verify+pull {backend}", seed, rate, proxy, n,
                  f"push_retries={pushes.retried} seconds={elapsed:.1f}"))
    assert sum(proxy.injected.values()) > 0, "no fault fired: the proxy is not in the path"
    assert pulled == names[-1]
    truth = RemoteStore(remote.url, remote.storage_options)  # no proxy
    assert_each_committed_once(truth, names)
    assert elapsed < bound, f"took {elapsed:.0f} s (bound {bound:.0f} s)"


@pytest.mark.parametrize("backend", ["seaweedfs", "gcs"])
def test_watch_once_through_30pct_faults_commits_every_checkpoint(
        request: pytest.FixtureRequest, tmp_path: Path, backend: str) -> None:
    import json

    remote = _remote(request, backend)
    rate, seed = 0.3, seed_from_env(16_10 + (1 if backend == "gcs" else 0))
    n, bound = N[backend], bound_s(backend)
    local = tmp_path / "local"
    names = make_checkpoints(local, list(range(1, n + 1)), size=3000)
    t0 = time.monotonic()
    with proxy_for(backend, remote.extra["endpoint"], rate, seed) as proxy:
        opts = options_through(backend, remote.storage_options, proxy)
        env = {**FAST_ENV, "CKPTSYNC_STORAGE_OPTIONS": json.dumps(opts)}
        runs = []
        # --once exits non-zero when something stayed unsynced: run it again, as cron would.
        for _ in range(3):
            r = run_cli("watch", str(local), remote.url, "--once", timeout=bound, **env)
            runs.append(r)
            if r.returncode == 0:
                break
    elapsed = time.monotonic() - t0
    print(summary(f"watch --once {backend}", seed, rate, proxy, n,
                  f"runs={len(runs)} seconds={elapsed:.1f}"))
    assert runs[0].returncode == 0, (
        f"watch --once exited {runs[0].returncode} through {rate:.0%} faults:\n"
        f"{runs[0].stderr[-3000:]}")
    assert_each_committed_once(RemoteStore(remote.url, remote.storage_options), names)
    assert elapsed < bound




@pytest.mark.core
def test_an_upload_whose_reply_was_cut_after_the_server_acted_commits(
        gcs_remote: Remote, tmp_path: Path) -> None:
    """gcsfs's resumable upload: the last request completes the object, its reply is cut
    short, gcsfs sends the request again and the finished session answers 404. The bucket is
    there (the push just read its marker): that is an ambiguous outcome, so the push is
    retryable, and its retry commits."""
    from tests.support.fault_proxy import Fault, FaultProxy
    from tests.support.faultkit import upstream_of

    local = LocalStore(tmp_path / "local")
    make_checkpoints(local.directory, [1], size=3000)
    (ck,) = local.list()
    cut = Fault(method="POST", path_contains="upload_id=", how="close")
    with FaultProxy(*upstream_of(gcs_remote.extra["endpoint"]), plan=[cut]) as proxy:
        store = RemoteStore(gcs_remote.url,
                            options_through("gcs", gcs_remote.storage_options, proxy),
                            config=FAST)
        log = push_until_committed(store, [ck], attempts=3)
    assert proxy.fired, proxy.requests
    print(f"[faults] lost upload reply: {proxy.fired} push errors: {log.errors}")
    assert_each_committed_once(RemoteStore(gcs_remote.url, gcs_remote.storage_options),
                               [ck.name])
