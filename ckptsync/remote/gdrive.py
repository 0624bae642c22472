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
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gdrive_fsspec import GoogleDriveFileSystem
from gdrive_fsspec.core import GoogleDriveFile
from google.auth.credentials import AnonymousCredentials, Credentials
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


def _read_json(token: str, option: str = "token") -> Any:
    """A credentials JSON given as its content or as a file's path (storage option
    ``option``)."""
    if token.lstrip().startswith("{"):
        text = token
        where = f"the JSON given as storage option {option}"
    else:
        where = f"the file named by storage option {option}"
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
    docstring lists them), Google's application-default credentials by default, and a Drive
    client per thread.

    gdrive-fsspec builds one client, whose ``httplib2`` connection is not thread-safe: two
    threads using it at once (a daemon's upload and its retention) garble each other's
    replies, and a request that then times out and is sent again may have created a second
    folder of the same name. Here each thread gets its own client (``srv`` and ``files``),
    sharing the credentials (gdrive-fsspec's interactive logins, ``"cache"`` and
    ``"browser"``, keep its one client).

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
        self._local = threading.local()
        self._creds: Credentials | None = None
        self._shared: Any = None  # gdrive-fsspec's own client, where no credentials are known
        super().__init__(root_file_id=root_file_id, token=token, **kwargs)

    def connect(self, method: Any = None) -> None:
        """Set up the Drive client for ``method`` (the ``token`` option)."""
        if method == "service_account":
            creds: Credentials | None = _service_account(self.creds, self.scopes,
                                                         self.auth_kwargs)
        elif method == "anon":
            creds = AnonymousCredentials()
        else:
            creds = drive_credentials(method, self.scopes)
        if creds is None:  # "cache", "browser": gdrive-fsspec's own (interactive) login
            super().connect(method)
            return
        self._creds, self._shared, self._local = creds, None, threading.local()

    def invalidate_cache(self, path: str | None = None) -> None:
        """Forget the cached listings: all, or those of ``path``, of what is under it and of
        the folders above it (fsspec's contract; gdrive-fsspec keeps every listing for ever,
        so what another process wrote since, a daemon's upload, would stay unseen). The
        folders above go too: their listings say whether ``path`` exists at all.

        What this costs: Drive is asked again, one listing per level, where ckptsync wants
        to see the remote as it is now (about three times the requests of a push with
        gdrive-fsspec alone, which never looks again).
        """
        if path is None:
            self.dircache.clear()
        else:
            p = self._strip_protocol(path).rstrip("/")
            for key in list(self.dircache):
                if key == p or key.startswith(p + "/"):
                    self.dircache.pop(key, None)
            while p:
                p = self._parent(p)
                self.dircache.pop(p, None)
        super().invalidate_cache(path)

    def _ls_from_cache(self, path: str) -> Any:
        """A folder's own cached listing, or None (then ``ls`` asks Drive).

        fsspec's version answers from the parent's listing too, with the entry of ``path``
        itself; gdrive-fsspec's ``ls`` returns that as a folder's content, so once a folder's
        own listing is dropped (:meth:`invalidate_cache`) its files would not be seen.
        """
        return self.dircache.get(path.rstrip("/"))

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        return _DriveFile(self, path, mode=mode, **kwargs)

    def _client(self) -> threading.local:
        local = self._local
        if getattr(local, "srv", None) is None:
            # As gdrive-fsspec's own connect builds it, once per thread.
            local.srv = build("drive", "v3", credentials=self._creds) \
                if self._shared is None else self._shared
            local.files = local.srv.files()
        return local

    @property
    def srv(self) -> Any:
        """This thread's Drive client."""
        return self._client().srv

    @srv.setter
    def srv(self, value: Any) -> None:  # gdrive-fsspec's connect: one client for all
        self._shared, self._local = value, threading.local()

    @property
    def files(self) -> Any:
        """This thread's ``files()`` resource of the Drive client."""
        return self._client().files

    @files.setter
    def files(self, value: Any) -> None:  # set with srv by gdrive-fsspec's connect
        pass


class _DriveFile(GoogleDriveFile):
    """gdrive-fsspec's file; an upload whose parent folder's listing was dropped meanwhile
    (:meth:`DriveFileSystem.invalidate_cache`) still finishes: that listing is read again
    when next needed, with the new file in it."""

    def _upload_chunk(self, final: bool = False) -> bool:
        try:
            done: bool = super()._upload_chunk(final)
        except KeyError as e:
            # The last chunk is in and the file exists; only the addition of its entry to the
            # parent's cached listing failed, as there is none.
            if final and e.args == (self.fs._parent(self.path),):
                return True
            raise
        return done


def _service_account(creds: Any, scopes: Sequence[str],
                     auth_kwargs: Mapping[str, Any]) -> Credentials:
    """gdrive-fsspec's ``token="service_account"``: ``creds`` is the key as a dict, its JSON,
    or its file's path."""
    from google.oauth2 import service_account

    info = creds if isinstance(creds, Mapping) else _read_json(str(creds or ""), "creds")
    if not isinstance(info, Mapping):
        raise ConfigError("gdrive://: storage option creds must be a service account's key "
                          "(a dict, its JSON or its file's path)")
    account: Credentials = service_account.Credentials.from_service_account_info(
        dict(info), scopes=list(scopes), **auth_kwargs)
    return account
