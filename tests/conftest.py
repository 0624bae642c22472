"""Shared fixtures: real storage servers on 127.0.0.1 and one ``remote`` per backend.

Session-scoped servers (started on first use, stopped at session end, logs under pytest's tmp
dir): ``seaweedfs_server``, ``moto_server``, ``gcs_server``, ``drive_server``.

Function-scoped remotes, each a fresh bucket/folder with fsspec's instance caches cleared:
``file_remote``, ``memory_remote``, ``seaweedfs_remote`` (also ``s3_remote``), ``moto_remote``,
``gcs_remote``, ``gdrive_remote``, ``mounted_drive_remote``; and ``remote``, parametrized over all
of them, for suites written once::

    def test_roundtrip(remote):
        fs, root = fsspec.core.url_to_fs(remote.url, **remote.storage_options)
        ...

Every test also fails if it leaves a thread running (``allow_thread_leak`` marker to opt out);
a module that starts processes opts in to failing when one outlives a test with
``pytestmark = pytest.mark.usefixtures("no_process_leak")``.

The layout of tests/ is in tests/__init__.py; ``Remote`` lives in tests/support/remotes.py.
"""

from __future__ import annotations

import os

# Must be set before gcsfs is imported, or every gcsfs call against the emulator hangs ~60 s.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest

from tests.support import servers
from tests.support.daemon import InProcessDaemon
from tests.support.drive_double import THREAD_PREFIX as DRIVE_THREAD_PREFIX
from tests.support.drive_double import DriveDouble
from tests.support.remotes import BACKENDS, Remote, backend_params, clear_fsspec_caches
from tests.support.tiers import SELECTS, SERIAL, TIERS, tier_of
from tests.support.watchkit import live_children, wait_for

# gdrive-fsspec's transport (httplib2) only uses a proxy when PySocks is installed; the Drive
# tests need it, so it is a pinned dev requirement and its absence is a broken set-up, not a skip.
try:
    import socks  # noqa: F401
except ImportError as e:
    raise ImportError("the Drive double needs PySocks (httplib2 proxies through it): "
                      "pip install -r requirements/dev.txt") from e

# --- thread-leak check ------------------------------------------------------------------------

# Long-lived daemon threads that libraries start once per process, by name prefix.
IGNORED_THREAD_PREFIXES = (
    "fsspecIO",  # fsspec's event loop for async filesystems (s3fs, gcsfs)
    "asyncio_",  # default executor of that loop (aiohttp DNS lookups)
    "gcsfs-deferred-close",  # gcsfs closes files from its loop here
    DRIVE_THREAD_PREFIX,  # the Drive double's server and connection threads
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "allow_thread_leak: skip the thread-leak check")
    config.addinivalue_line("markers", "core: tier of `make test` (tests/support/tiers.py)")
    config.addinivalue_line("markers", "full: tier of `make test-full` only")
    config.addinivalue_line("markers", f"{SERIAL}: timing-sensitive: run after the parallel "
                            "pass, alone")


# --- tiers (tests/support/tiers.py) ---------------------------------------------------------

def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--tier", choices=sorted(SELECTS), default="all",
                     help="run one tier: core (make test) or full (the rest of make test-full); "
                          "all (the default): both")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    untiered = [item.nodeid for item in items if tier_of(item) is None]
    if untiered:
        raise pytest.UsageError(
            f"{len(untiered)} tests have no tier (one of {', '.join(TIERS)}), e.g. "
            f"{untiered[0]}: give the module a pytestmark (tests/support/tiers.py)")
    wanted = SELECTS[config.getoption("--tier")]
    keep = [item for item in items if tier_of(item) in wanted]
    if len(keep) < len(items):
        config.hook.pytest_deselected(items=[i for i in items if tier_of(i) not in wanted])
        items[:] = keep


@pytest.fixture(autouse=True)
def _no_thread_leak(request: pytest.FixtureRequest) -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    if request.node.get_closest_marker("allow_thread_leak"):
        return

    def leaked() -> list[threading.Thread]:
        return [
            t for t in threading.enumerate()
            if t not in before and t.is_alive() and not t.name.startswith(IGNORED_THREAD_PREFIXES)
        ]

    deadline = time.monotonic() + 2.0  # grace period for threads that are already stopping
    while (left := leaked()) and time.monotonic() < deadline:
        left[0].join(0.05)
    if left:
        pytest.fail(f"test leaked threads: {sorted(t.name for t in left)}", pytrace=False)


@pytest.fixture
def no_process_leak() -> Iterator[None]:
    """Fail a test that leaves a child process of this one running (10 s to exit)."""
    before = set(live_children(os.getpid()))
    yield
    wait_for(lambda: not (set(live_children(os.getpid())) - before), "child processes to exit",
             timeout=10)


@pytest.fixture
def daemons() -> Iterator[list[InProcessDaemon]]:
    """In-process daemons a test starts (tests/support/daemon.py); stopped after it."""
    running: list[InProcessDaemon] = []
    yield running
    for d in running:
        if d.alive():
            d.stop()


# --- servers (session) ----------------------------------------------------------------------

@pytest.fixture(scope="session")
def seaweedfs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.SeaweedFS]:
    with servers.SeaweedFS(tmp_path_factory.mktemp("seaweedfs")) as s:
        yield s


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.MotoS3]:
    with servers.MotoS3(tmp_path_factory.mktemp("moto")) as s:
        yield s


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.FakeGCS]:
    with servers.FakeGCS(tmp_path_factory.mktemp("fake-gcs")) as s, servers.environ(s.environ()):
        yield s


@pytest.fixture(scope="session")
def drive_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DriveDouble]:
    with DriveDouble(tmp_path_factory.mktemp("drive")) as d, servers.environ(d.environ()):
        import httplib2

        old_ca = httplib2.CA_CERTS
        d.use_ca_in_this_process()  # httplib2 read HTTPLIB2_CA_CERTS when it was imported
        try:
            yield d
        finally:
            httplib2.CA_CERTS = old_ca


# --- remotes (function) ---------------------------------------------------------------------

@pytest.fixture
def _fresh_fsspec() -> Iterator[None]:
    clear_fsspec_caches()
    yield
    clear_fsspec_caches()


@pytest.fixture
def file_remote(tmp_path: Path, _fresh_fsspec: None) -> Remote:
    root = tmp_path / "remote"
    return Remote(f"file://{root}/run", {}, "file", missing_url=None)


@pytest.fixture
def memory_remote(_fresh_fsspec: None) -> Iterator[Remote]:
    prefix = f"ckpt-{uuid.uuid4().hex[:12]}"
    yield Remote(f"memory://{prefix}/run", {}, "memory")
    fs = fsspec.filesystem("memory")
    with contextlib.suppress(FileNotFoundError):
        fs.rm(f"/{prefix}", recursive=True)


def _s3_remote(server: servers._S3Server, name: str, checks_credentials: bool) -> Remote:
    bucket = server.create_bucket()
    return Remote(
        f"s3://{bucket}/run",
        server.storage_options(),
        name,
        wrong_credentials=server.storage_options(secret="wrong-secret")
        if checks_credentials else None,
        missing_url=f"s3://{servers.unique_name('missing')}/run",
        extra={"bucket": bucket, "endpoint": server.endpoint},
    )


@pytest.fixture
def seaweedfs_remote(seaweedfs_server: servers.SeaweedFS,
                     _fresh_fsspec: None) -> Iterator[Remote]:
    remote = _s3_remote(seaweedfs_server, "seaweedfs", checks_credentials=True)
    yield remote
    seaweedfs_server.delete_bucket(remote.extra["bucket"])  # frees its volumes (see there)


@pytest.fixture
def s3_remote(seaweedfs_remote: Remote) -> Remote:
    """The one S3 for tests that need just one (SeaweedFS: it checks credentials)."""
    return seaweedfs_remote


@pytest.fixture
def moto_remote(moto_server: servers.MotoS3, _fresh_fsspec: None) -> Remote:
    return _s3_remote(moto_server, "moto", checks_credentials=False)


@pytest.fixture
def gcs_remote(gcs_server: servers.FakeGCS, _fresh_fsspec: None) -> Remote:
    bucket = gcs_server.create_bucket()
    return Remote(
        f"gs://{bucket}/run",
        gcs_server.storage_options(),
        "gcs",
        wrong_credentials=None,  # fake-gcs-server accepts any token
        missing_url=f"gs://{servers.unique_name('missing')}/run",
        extra={"bucket": bucket, "endpoint": gcs_server.endpoint},
    )


@pytest.fixture
def gdrive_remote(drive_server: DriveDouble, _fresh_fsspec: None) -> Remote:
    folder = drive_server.create_folder(servers.unique_name("ckpt"))
    return Remote(
        "gdrive://run",
        drive_server.storage_options(root_file_id=folder),
        "gdrive",
        wrong_credentials=drive_server.storage_options(
            root_file_id=folder, creds=drive_server.service_account(register=False)
        ),
        missing_url=None,  # no buckets; a missing folder is just a missing path
        extra={"root_file_id": folder, "double": drive_server},
    )


@pytest.fixture
def mounted_drive_remote(tmp_path: Path, _fresh_fsspec: None,
                         monkeypatch: pytest.MonkeyPatch) -> Remote:
    """Google Drive as Colab mounts it: a directory under a FUSE mount of type ``fuse.drive``
    (a fake mount table, ``CKPTSYNC_MOUNTINFO``), given as a path without a scheme; the store
    takes the mount's path (committed means handed to the mount: synced after each commit)."""
    mount = tmp_path.resolve() / "content" / "drive"
    (mount / "MyDrive").mkdir(parents=True)
    table = tmp_path / "mountinfo"
    table.write_text("27 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n"
                     f"61 27 0:52 / {mount} rw,nosuid,nodev - fuse.drive drive rw\n")
    monkeypatch.setenv("CKPTSYNC_MOUNTINFO", str(table))
    return Remote(str(mount / "MyDrive" / "ckptsync" / "run"), {}, "mounted_drive")


@pytest.fixture(params=backend_params(BACKENDS))
def remote(request: pytest.FixtureRequest) -> Remote:
    """One remote per backend: a conformance suite written once runs on all of them."""
    value: Remote = request.getfixturevalue(f"{request.param}_remote")
    return value
