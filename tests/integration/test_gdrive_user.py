"""``gdrive://`` with the credentials a Colab user has (issue 31 item 3): Google's
application-default credentials (what ``google.colab.auth.authenticate_user()`` installs), an
authorized-user token file or a credentials object; no service account, no folder id:
``gdrive://ckptsync/run-17`` is *My Drive/ckptsync/run-17*, its folders made as needed.

Against the Drive double (tests/support/drive_double.py), which refreshes an OAuth user's
token as Google's token endpoint does (at ``oauth2.googleapis.com``, through its tunnel). Not
run against Google itself.
"""

from __future__ import annotations

import json
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

pytestmark = pytest.mark.core

RUN = "gdrive://ckptsync/run-17"


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


def test_a_colab_login_is_enough_a_path_under_my_drive(drive_server: DriveDouble,
                                                       user: dict[str, Any],
                                                       tmp_path: Path) -> None:
    before = len(drive_server.grants)
    _run(drive_server, tmp_path, RUN, {})  # no storage options at all
    # My Drive/ckptsync/run-17/<name>/ckptsync.json: created, folders included.
    name = RemoteStore(RUN).list()[-1].name
    assert _my_drive_path(drive_server, "ckptsync", "run-17", name, "ckptsync.json")
    new = drive_server.grants[before:]
    assert new and set(new) == {"refresh_token"}  # the user's token; no service account


def test_an_authorized_user_file_or_credentials_object_works_too(
        drive_server: DriveDouble, user: dict[str, Any], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from google.oauth2.credentials import Credentials

    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS")  # only what the options say
    _run(drive_server, tmp_path / "file", "gdrive://ckptsync/by-file", {"token": user["path"]})
    info = {k: v for k, v in user.items() if k != "path"}
    _run(drive_server, tmp_path / "dict", "gdrive://ckptsync/by-dict", {"token": info})
    creds = Credentials.from_authorized_user_info(info)
    _run(drive_server, tmp_path / "object", "gdrive://ckptsync/by-object", {"token": creds})
    for run in ("by-file", "by-dict", "by-object"):
        assert _my_drive_path(drive_server, "ckptsync", run, "LATEST")


def test_no_login_says_how_to_log_in_and_exits_3(drive_server: DriveDouble,
                                                 tmp_path: Path) -> None:
    r = cli("ls", RUN, GOOGLE_APPLICATION_CREDENTIALS="", CLOUDSDK_CONFIG=str(tmp_path),
            HOME=str(tmp_path))
    assert r.returncode == 3, r.stderr
    assert "no usable credentials" in r.stderr and "auth.authenticate_user()" in r.stderr
    assert "Traceback" not in r.stderr


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


def test_a_malformed_token_is_a_usage_error_that_never_shows_it(drive_server: DriveDouble,
                                                                tmp_path: Path) -> None:
    r = cli("ls", RUN, "-o", 'token={"type": "authorized_user", "refresh_token": "1//0seekrit"}')
    assert r.returncode == 2, r.stderr
    assert "incomplete" in r.stderr and "client_id" in r.stderr
    assert "seekrit" not in r.stderr
    r = cli("ls", RUN, "-o", f"token={tmp_path / 'missing.json'}")
    assert r.returncode == 2 and "cannot read the file named by storage option token" in r.stderr
