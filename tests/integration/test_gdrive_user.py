"""``gdrive://`` with the credentials a Colab user has: Google's
application-default credentials (what ``google.colab.auth.authenticate_user()`` installs), an
authorized-user token file or a credentials object; no service account, no folder id:
``gdrive://ckptsync/run-17`` is *My Drive/ckptsync/run-17*, its folders made as needed.

Against the Drive double (tests/support/drive_double.py), which refreshes an OAuth user's
token as Google's token endpoint does (at ``oauth2.googleapis.com``, through its tunnel). Not
run against Google itself.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from ckptsync.local import LocalStore
from ckptsync.remote import RemoteStore
from tests.support.cli import cli
from tests.support.drive_double import CLOUD_SCOPE, DriveDouble
from tests.support.drive_state import FOLDER
from tests.support.remotes import clear_fsspec_caches
from tests.support.watchkit import make_checkpoints

pytestmark = pytest.mark.full  # the Drive double; the quick ones below are core

RUN = "gdrive://ckptsync/run-17"  # where a test that never writes looks


@pytest.fixture
def run() -> str:
    """A run of this test's own under My Drive/ckptsync (the double lives for the session)."""
    return f"run-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def user(drive_server: DriveDouble, tmp_path: Path,
         monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A logged-in user: their authorized-user file as the application-default credentials
    (where ``gcloud`` and Colab's ``authenticate_user`` put them), nothing else configured."""
    info = drive_server.user_credentials()
    path = tmp_path / "adc.json"
    path.write_text(json.dumps(info))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(path))
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))  # no gcloud login here
    clear_fsspec_caches()
    yield {**info, "path": str(path)}
    clear_fsspec_caches()


def _my_drive_path(double: DriveDouble, *names: str) -> bool:
    """Whether My Drive/<names...> exists in the double, each level a folder but the last."""
    with double.state.lock:
        parent = double.state.root_id
        for i, name in enumerate(names):
            found = [f for f in double.state.files.values()
                     if parent in f.parents and f.name == name and not f.trashed]
            if len(found) != 1 or (i < len(names) - 1 and found[0].mime_type != FOLDER):
                return False
            parent = found[0].id
    return True


def _run(double: DriveDouble, tmp_path: Path, url: str, options: dict[str, Any]) -> None:
    """Push two checkpoints to ``url``, pull the newest into a fresh directory: the bytes."""
    local = tmp_path / "ckpts"
    names = make_checkpoints(local, [10, 20])
    store = RemoteStore(url, options)
    for c in LocalStore(local).list():
        store.push(c)
    assert [m.name for m in store.list()] == names
    fresh = LocalStore(tmp_path / "fresh")
    got = store.pull(None, fresh)
    assert got.name == names[-1]
    for f in got.manifest.files:
        assert (fresh.directory / got.name / f.path).read_bytes() == \
            (local / got.name / f.path).read_bytes()


@pytest.mark.core
def test_a_colab_login_is_enough_a_path_under_my_drive(drive_server: DriveDouble,
                                                       user: dict[str, Any], run: str,
                                                       tmp_path: Path) -> None:
    before = len(drive_server.grants)
    url = f"gdrive://ckptsync/{run}"
    _run(drive_server, tmp_path, url, {})  # no storage options at all
    # My Drive/ckptsync/<run>/<name>/ckptsync.json: created, folders included.
    name = RemoteStore(url).list()[-1].name
    assert _my_drive_path(drive_server, "ckptsync", run, name, "ckptsync.json")
    new = drive_server.grants[before:]
    assert new and set(new) == {"refresh_token"}  # the user's token; no service account


def test_an_authorized_user_file_or_credentials_object_works_too(
        drive_server: DriveDouble, user: dict[str, Any], run: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from google.oauth2.credentials import Credentials

    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS")  # only what the options say
    _run(drive_server, tmp_path / "file", f"gdrive://ckptsync/{run}-file", {"token": user["path"]})
    info = {k: v for k, v in user.items() if k != "path"}
    _run(drive_server, tmp_path / "dict", f"gdrive://ckptsync/{run}-dict", {"token": info})
    creds = Credentials.from_authorized_user_info(info)
    _run(drive_server, tmp_path / "object", f"gdrive://ckptsync/{run}-object",
         {"token": creds})
    for kind in ("file", "dict", "object"):
        assert _my_drive_path(drive_server, "ckptsync", f"{run}-{kind}", "LATEST")


@pytest.mark.core
def test_no_login_says_how_to_log_in_and_exits_3(drive_server: DriveDouble,
                                                 tmp_path: Path) -> None:
    r = cli("ls", RUN, GOOGLE_APPLICATION_CREDENTIALS="", CLOUDSDK_CONFIG=str(tmp_path),
            HOME=str(tmp_path))
    assert r.returncode == 3, r.stderr
    assert "no usable credentials" in r.stderr and "auth.authenticate_user()" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.core
def test_a_revoked_login_or_one_without_drive_access_is_refused_loudly(
        drive_server: DriveDouble, user: dict[str, Any], tmp_path: Path) -> None:
    drive_server.revoke(user["refresh_token"])
    r = cli("ls", RUN)
    assert r.returncode == 3, r.stderr
    assert "expired or revoked" in r.stderr and "auth.authenticate_user()" in r.stderr
    for secret in (user["refresh_token"], user["client_secret"]):
        assert secret not in r.stderr and secret not in r.stdout

    # A login without the Drive scope (gcloud's default): the scope is asked for, and refused.
    no_drive = drive_server.user_credentials(scopes=(CLOUD_SCOPE,))
    token = tmp_path / "no-drive.json"
    token.write_text(json.dumps({**no_drive, "scopes": ["https://www.googleapis.com/auth/drive"]}))
    r = cli("ls", RUN, "-o", f"token={token}")
    assert r.returncode == 3 and "invalid_scope" in r.stderr, r.stderr
    assert "--scopes=https://www.googleapis.com/auth/drive" in r.stderr


@pytest.mark.core
def test_a_malformed_token_is_a_usage_error_that_never_shows_it(drive_server: DriveDouble,
                                                                tmp_path: Path) -> None:
    r = cli("ls", RUN, "-o", 'token={"type": "authorized_user", "refresh_token": "1//0seekrit"}')
    assert r.returncode == 2, r.stderr
    assert "incomplete" in r.stderr and "client_id" in r.stderr
    assert "seekrit" not in r.stderr
    r = cli("ls", RUN, "-o", f"token={tmp_path / 'missing.json'}")
    assert r.returncode == 2 and "cannot read the file named by storage option token" in r.stderr


def test_threads_sharing_a_drive_store_never_garble_each_others_requests(
        drive_server: DriveDouble, user: dict[str, Any], run: str, tmp_path: Path) -> None:
    """A daemon's upload and its retention or listing run in different threads on one store:
    each thread has its own Drive connection (one shared httplib2 connection mixes their
    replies up, and each call then waits out a 60 s read timeout)."""
    local = tmp_path / "ckpts"
    names = make_checkpoints(local, [1, 2, 3, 4], size=300_000)
    store = RemoteStore(f"gdrive://ckptsync/{run}", {})
    ckpts = LocalStore(local).list()
    store.push(ckpts[0])
    errors: list[BaseException] = []
    seen: list[int] = []

    def guarded(fn: Any) -> Any:
        def run() -> None:
            try:
                fn()
            except BaseException as e:  # reported below: the test fails on it
                errors.append(e)
        return run

    def pushes() -> None:
        for c in ckpts[1:]:
            store.push(c)

    def looks() -> None:
        for _ in range(15):
            seen.append(len(store.list()))
            store.read_latest()

    threads = [threading.Thread(target=guarded(f), name=f"test-{f.__name__}")
               for f in (pushes, looks)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads) and not errors, errors
    assert time.monotonic() - t0 < 30  # no call waited out a read timeout
    assert [m.name for m in store.list()] == names and seen and min(seen) >= 1
    with drive_server.state.lock:  # one folder per name: no request was sent twice
        folders = [f.name for f in drive_server.state.files.values() if f.mime_type == FOLDER]
    assert folders.count("ckptsync") == 1 and folders.count(run) == 1
    assert all(folders.count(n) == 1 for n in names)


def test_a_store_sees_what_another_wrote_since_it_last_looked(
        drive_server: DriveDouble, user: dict[str, Any], run: str, tmp_path: Path) -> None:
    """A notebook's restorer and its watcher, two processes: what one uploads, the other's
    next listing shows (gdrive-fsspec alone caches every listing for ever)."""
    reader = RemoteStore(f"gdrive://ckptsync/{run}", {})  # application-default login
    writer = RemoteStore(f"gdrive://ckptsync/{run}", {"token": user["path"]})  # another client
    assert reader.fs is not writer.fs
    assert reader.list() == [] and reader.newest_valid() is None
    names = make_checkpoints(tmp_path / "ckpts", [5, 6])
    for c in LocalStore(tmp_path / "ckpts").list():
        writer.push(c)
    assert [m.name for m in reader.list()] == names
    newest = reader.newest_valid()
    assert newest is not None and newest.name == names[-1]
    writer.delete(names[-1])
    assert [m.name for m in reader.list()] == names[:1]


@pytest.mark.core
def test_a_credentials_object_cannot_be_handed_to_a_watcher_process(tmp_path: Path) -> None:
    """The daemon reads its options as JSON: a credentials object is refused before anything
    starts, with what to give instead."""
    from ckptsync.daemon import start_watcher
    from ckptsync.errors import ConfigError

    with pytest.raises(ConfigError, match="token='google_default'") as ei:
        start_watcher(tmp_path / "ckpts", "gdrive://ckptsync/x",
                      storage_options={"token": object(), "access": "full_control"})
    assert "['token']" in str(ei.value)
    assert not (tmp_path / "ckpts").exists()  # nothing started, nothing made
