"""Support for the fault-rate tests: a remote reached through a :class:`FaultProxy`,
pushes retried as the daemon retries them, and the checks every run ends with.

Imported as ``tests.support.faultkit``, also by tests/support/soak/.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptsync.config import TransferConfig
from ckptsync.errors import CorruptCheckpointError, RemoteError
from ckptsync.local import LocalCheckpoint, LocalStore
from ckptsync.manifest import MANIFEST_NAME
from ckptsync.remote import RemoteStore
from tests.support.fault_proxy import Chaos, FaultProxy

# Client timeouts for runs through a proxy that black-holes requests: without them a black
# hole costs botocore's 60 s default read timeout per request (gcsfs: none at all).
CLIENT_TIMEOUT_S = 1.5
# Fast back-off: a fault-rate test retries hundreds of times; the defaults (0.5 s doubling)
# would make it minutes long without testing anything more.
FAST = TransferConfig(max_workers=4, retries=6, backoff_initial=0.02, backoff_max=0.3)
FAST_ENV = {"CKPTSYNC_RETRIES": "6", "CKPTSYNC_BACKOFF_INITIAL": "0.02",
            "CKPTSYNC_BACKOFF_MAX": "0.3"}


def seed_from_env(default: int) -> int:
    """``CKPTSYNC_FAULT_SEED`` when set (to replay a failure), else ``default``."""
    raw = os.environ.get("CKPTSYNC_FAULT_SEED", "").strip()
    return int(raw) if raw else default


def upstream_of(endpoint: str) -> tuple[str, int]:
    host, port = endpoint.rsplit("/", 1)[1].split(":")
    return host, int(port)


def proxy_for(backend: str, endpoint: str, rate: float, seed: int,
              lifetime: float = 600.0) -> FaultProxy:
    """A chaos proxy in front of ``endpoint`` (``backend`` "seaweedfs"/"s3" or "gcs")."""
    host, port = upstream_of(endpoint)
    dialect = "gcs" if backend == "gcs" else "s3"
    return FaultProxy(host, port, chaos=Chaos(rate=rate, seed=seed, dialect=dialect),
                      lifetime=lifetime, timeout=30.0)


def options_through(backend: str, storage_options: dict[str, Any], proxy: FaultProxy,
                    timeout: float = CLIENT_TIMEOUT_S) -> dict[str, Any]:
    """``storage_options`` with the endpoint pointing at ``proxy`` and short client timeouts."""
    opts: dict[str, Any] = json.loads(json.dumps(storage_options))
    if backend == "gcs":
        opts["endpoint_url"] = proxy.endpoint
        opts["requests_timeout"] = timeout
        return opts
    opts.setdefault("client_kwargs", {})["endpoint_url"] = proxy.endpoint
    opts["config_kwargs"] = {"connect_timeout": timeout, "read_timeout": timeout}
    return opts


@dataclass
class PushLog:
    """What retried pushes met: attempts per name and the errors they raised."""

    attempts: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def retried(self) -> int:
        return sum(n - 1 for n in self.attempts.values())


def push_until_committed(store: RemoteStore, ckpts: Sequence[LocalCheckpoint], *,
                         attempts: int = 8, deadline_s: float = 300.0) -> PushLog:
    """Push each checkpoint, retrying a failed push as the daemon does (bounded).

    Raises:
        AssertionError: a push raised an error that is not retryable (a false "different
            checkpoint of the same name", a corrupt local file), or one checkpoint was still
            not committed after ``attempts`` pushes or past the deadline.
    """
    logbook = PushLog()
    t0 = time.monotonic()
    for ck in ckpts:
        for n in range(1, attempts + 1):
            logbook.attempts[ck.name] = n
            try:
                m = store.push(ck)
            except RemoteError as e:
                logbook.errors.append(f"{ck.name} try {n}: {e}")
                assert e.retryable, f"push of {ck.name} failed for good: {e}"
                assert time.monotonic() - t0 < deadline_s, (
                    f"pushes past {deadline_s} s; errors: {logbook.errors[-5:]}")
                continue
            assert m.name == ck.name and m.files == ck.manifest.files
            break
        else:
            raise AssertionError(f"{ck.name} not committed after {attempts} pushes: "
                                 f"{logbook.errors[-3:]}")
    logbook.seconds = time.monotonic() - t0
    return logbook


def retry_remote(fn: Any, what: str, attempts: int = 4) -> Any:
    """``fn()``, retried on a retryable :class:`RemoteError` only: a corrupt verdict or any
    other error is never retried away."""
    for n in range(1, attempts + 1):
        try:
            return fn()
        except RemoteError as e:
            if not e.retryable or n == attempts:
                raise AssertionError(f"{what} failed after {n} tries: {e}") from e
    raise AssertionError("unreachable")


def committed_names(store: RemoteStore) -> list[str]:
    """Names under the remote root that hold a manifest, one entry per manifest object."""
    fs = store.fs
    fs.invalidate_cache()
    found = fs.find(store.root)
    return sorted(p[len(store.root) + 1:].split("/")[0] for p in found
                  if p.endswith("/" + MANIFEST_NAME) and p.count("/") == store.root.count("/") + 2)


def assert_each_committed_once(store: RemoteStore, names: Iterable[str]) -> None:
    """Each of ``names`` holds exactly one manifest, nothing else is committed, and every
    committed checkpoint verifies in full (sizes and digests, read without a proxy)."""
    want = sorted(names)
    assert committed_names(store) == want
    listed = [m.name for m in store.list()]
    assert sorted(listed) == want and len(set(listed)) == len(listed)
    for name in want:
        try:
            store.verify(name, full=True)
        except CorruptCheckpointError as e:
            raise AssertionError(f"committed checkpoint {name} is corrupt: {e}") from e


def tree_bytes(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def pull_newest_equal(store: RemoteStore, newest: LocalCheckpoint, into: Path) -> str:
    """Pull the newest valid checkpoint into ``into`` (retried on remote errors) and check it
    is ``newest``, byte for byte. Returns its name."""
    got: LocalCheckpoint = retry_remote(lambda: store.pull(None, LocalStore(into)),
                                        "pull of the newest checkpoint")
    assert got.name == newest.name, f"pulled {got.name}, newest committed is {newest.name}"
    mine = {k: v for k, v in tree_bytes(newest.path).items() if k != MANIFEST_NAME}
    theirs = {k: v for k, v in tree_bytes(got.path).items() if k != MANIFEST_NAME}
    assert mine == theirs, f"pulled {got.name} differs from what was saved"
    return got.name


def summary(label: str, seed: int, rate: float, proxy: FaultProxy, n: int,
            extra: str = "") -> str:
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(proxy.injected.items()))
    return (f"[faults] {label}: seed={seed} rate={rate:.0%} checkpoints={n} "
            f"requests={len(proxy.requests)} faults={sum(proxy.injected.values())} ({kinds})"
            f"{' ' + extra if extra else ''}")
