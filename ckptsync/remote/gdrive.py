"""Google Drive through gdrive-fsspec, with the credentials a Colab user has.

gdrive-fsspec 0.4.1 (``GoogleDriveFileSystem``) takes ``token`` as one of four methods:
``"service_account"`` (with ``creds=``, a key dict or file: the account's own Drive, so a
folder shared with it and ``root_file_id`` are needed), ``"cache"`` (pydata-google-auth's
cached login, else a browser flow: on Colab it calls ``auth.authenticate_user()`` first),
``"browser"`` (the flow again) and ``"anon"``; no credentials object, and its default,
``"cache"``, may wait for a browser that a daemon never has.

:class:`DriveFileSystem` is gdrive-fsspec's filesystem, also taking what Google's own
libraries take (the ``token`` storage option):

- ``"google_default"`` (the default for ``gdrive://``): Google's application-default
  credentials with the Drive scope: on Colab after ``google.colab.auth.authenticate_user()``
  (the login a Colab user already does; a watcher started after it inherits it), elsewhere
  ``gcloud auth application-default login --scopes=...`` or ``GOOGLE_APPLICATION_CREDENTIALS``;
- an OAuth user token: an "authorized user" JSON file's path, its content, or that dict
  (``client_id``, ``client_secret``, ``refresh_token``: what ``gcloud`` writes and
  ``google.oauth2.credentials.Credentials.to_json()`` gives);
- a ``google.auth.credentials.Credentials`` object (in-process only: a daemon gets its options
  as JSON);
- gdrive-fsspec's own four methods, unchanged.

With a user's credentials, ``gdrive://ckptsync/run-17`` is *My Drive/ckptsync/run-17*: no
folder id to look up, folders created as needed. The Drive scope asked for is ``access``'s
(gdrive-fsspec's option: ``full_control`` by default).

Example::

    fs = DriveFileSystem()                          # application-default credentials
    fs = DriveFileSystem(token="/content/user.json")  # an authorized-user file
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gdrive_fsspec import GoogleDriveFileSystem
from google.auth.credentials import Credentials
from googleapiclient.discovery import build

from ckptsync.errors import ConfigError

__all__ = ["GOOGLE_DEFAULT", "DriveFileSystem", "drive_credentials"]

#: ``token`` for Google's application-default credentials (gcsfs's name for the same).
GOOGLE_DEFAULT = "google_default"
#: gdrive-fsspec's own ``token`` methods, passed to it unchanged.
GDRIVE_FSSPEC_METHODS = ("cache", "browser", "anon", "service_account")
_FORMS = ("'google_default' (Google's application-default credentials: on Colab after "
          "google.colab.auth.authenticate_user()), the path or content of an authorized-user "
          "JSON file, a google.auth credentials object, or one of gdrive-fsspec's "
          + ", ".join(repr(m) for m in GDRIVE_FSSPEC_METHODS))


def drive_credentials(token: Any, scopes: Sequence[str]) -> Credentials | None:
    """The credentials ``token`` stands for, with ``scopes`` where they take scopes; None for
    gdrive-fsspec's own methods (it resolves them itself).

    Raises:
        ConfigError: ``token`` has none of the accepted forms, or names a file that is not
            an authorized-user or service-account key file (the message never holds it).
        google.auth.exceptions.DefaultCredentialsError: ``"google_default"`` and no
            application-default credentials are set up (translated at the boundary, with
            what to do).
    """
    if token is None or token == GOOGLE_DEFAULT:
        import google.auth

        # Drive has no use for a cloud project: google-auth's warning that none is set
        # would only mislead (Colab's own auth module quiets it the same way).
        quiet = logging.getLogger("google.auth._default")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            creds, _project = google.auth.default(scopes=list(scopes))
        finally:
            quiet.setLevel(level)
        return creds
    if isinstance(token, Credentials):
        return _scoped(token, scopes)
    if isinstance(token, str) and token in GDRIVE_FSSPEC_METHODS:
        return None
    if isinstance(token, str):
        token = _read_json(token)
    if isinstance(token, Mapping):
        return _from_info(token, scopes)
    raise ConfigError(f"gdrive:// storage option token: unknown form ({type(token).__name__}); "
                      f"give {_FORMS}")


def _scoped(creds: Credentials, scopes: Sequence[str]) -> Credentials:
    with_scopes = getattr(creds, "with_scopes_if_required", None)  # Scoped credentials only
    return with_scopes(list(scopes)) if callable(with_scopes) else creds


def _read_json(token: str) -> Any:
    """An authorized-user JSON given as its content or as a file's path."""
    if token.lstrip().startswith("{"):
        text = token
        where = "the JSON given as storage option token"
    else:
        where = "the file named by storage option token"
        try:
            text = Path(token).expanduser().read_text()
        except OSError as e:
            raise ConfigError(f"gdrive://: cannot read {where} ({e.strerror or e}); give "
                              f"{_FORMS}") from None
    try:
        return json.loads(text)
    except ValueError:
        raise ConfigError(f"gdrive://: {where} is not JSON; give {_FORMS}") from None


def _from_info(info: Mapping[str, Any], scopes: Sequence[str]) -> Credentials:
    kind = info.get("type", "authorized_user")
    try:
        if kind == "authorized_user":
            from google.oauth2.credentials import Credentials as UserCredentials

            # The refresh token carries the scopes the user granted: asking for others
            # would be refused, so none are asked for unless the file lists them.
            user: Credentials = UserCredentials.from_authorized_user_info(dict(info))
            return user
        if kind == "service_account":
            from google.oauth2 import service_account

            account: Credentials = service_account.Credentials.from_service_account_info(
                dict(info), scopes=list(scopes))
            return account
    except ValueError as e:  # a missing field; the message names fields, never values
        raise ConfigError(f"gdrive://: the {kind} credentials in storage option token are "
                          f"incomplete ({e})") from None
    raise ConfigError(f"gdrive://: credentials of type {kind!r} in storage option token are "
                      "not supported; give an authorized-user (OAuth user) or "
                      "service-account key")


class DriveFileSystem(GoogleDriveFileSystem):
    """gdrive-fsspec's ``GoogleDriveFileSystem`` with more ways to log in (the module
    docstring lists them) and Google's application-default credentials by default.

    Args:
        root_file_id: a folder id to treat as the root (default: *My Drive*).
        token: the credentials (module docstring).
        **kwargs: gdrive-fsspec's other options (``access``, ``creds``, ``auth_kwargs``, ...).

    Raises:
        ConfigError: ``token`` is malformed.
        google.auth.exceptions.DefaultCredentialsError: no application-default credentials.
    """

    def __init__(self, root_file_id: str | None = None, token: Any = GOOGLE_DEFAULT,
                 **kwargs: Any) -> None:
        super().__init__(root_file_id=root_file_id, token=token, **kwargs)

    def connect(self, method: Any = None) -> None:
        """Build the Drive client for ``method`` (the ``token`` option)."""
        creds = drive_credentials(method, self.scopes)
        if creds is None:
            super().connect(method)
            return
        # As gdrive-fsspec's own connect does, with these credentials.
        self.srv = build("drive", "v3", credentials=creds)
        self.files = self.srv.files()
