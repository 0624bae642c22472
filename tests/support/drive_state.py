"""The Drive double's account: its files (``DriveFile``), the API's errors (``DriveError``) and
``DriveState``, the file tree with the subset of Drive's ``q`` query language gdrive-fsspec uses.
Served over HTTP by tests/support/drive_double.py."""

from __future__ import annotations

import datetime as dt
import json
import re
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any

FOLDER = "application/vnd.google-apps.folder"


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass
class DriveFile:
    id: str
    name: str
    mime_type: str
    parents: list[str]
    data: bytes | None = None
    trashed: bool = False
    version: int = 1
    created: str = field(default_factory=now)
    modified: str = field(default_factory=now)

    def resource(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": "drive#file",
            "id": self.id,
            "name": self.name,
            "mimeType": self.mime_type,
            "parents": list(self.parents),
            "trashed": self.trashed,
            "version": str(self.version),
            "createdTime": self.created,
            "modifiedTime": self.modified,
        }
        if self.data is not None:  # Drive reports sizes as strings, and none for folders
            out["size"] = str(len(self.data))
        return out


class DriveError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def body(self) -> bytes:
        err = {"domain": "global", "reason": self.reason, "message": self.message}
        return json.dumps(
            {"error": {"code": self.code, "message": self.message, "errors": [err]}}
        ).encode()


_Q_CLAUSE = re.compile(
    r"""^\s*(?:
        '(?P<parent>[^']*)'\s+in\s+parents
      | (?P<field>name|mimeType)\s*(?P<op>=|!=)\s*'(?P<value>(?:[^'\\]|\\.)*)'
      | trashed\s*=\s*(?P<trashed>true|false)
    )\s*$""",
    re.X | re.I,
)


class DriveState:
    """The files of one fake Drive account, safe for concurrent requests."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.root_id = "0A" + secrets.token_hex(8)
        self.files: dict[str, DriveFile] = {
            self.root_id: DriveFile(self.root_id, "My Drive", FOLDER, [])
        }
        self.uploads: dict[str, dict[str, Any]] = {}

    def resolve(self, file_id: str) -> str:
        return self.root_id if file_id == "root" else file_id

    def get(self, file_id: str) -> DriveFile:
        f = self.files.get(self.resolve(file_id))
        if f is None:
            raise DriveError(404, "notFound", f"File not found: {file_id}.")
        return f

    def create(self, meta: dict[str, Any], data: bytes | None) -> DriveFile:
        parents = [self.resolve(p) for p in meta.get("parents") or ["root"]]
        for p in parents:
            if self.get(p).mime_type != FOLDER:
                raise DriveError(400, "invalidParent", f"Parent {p} is not a folder.")
        mime = meta.get("mimeType") or ("application/octet-stream" if data is not None else None)
        if mime is None:
            mime = "application/octet-stream"
        if mime != FOLDER and data is None:
            data = b""
        f = DriveFile(
            id="1" + secrets.token_urlsafe(24).replace("-", "x").replace("_", "y"),
            name=meta.get("name") or "Untitled",
            mime_type=mime,
            parents=parents,
            data=data if mime != FOLDER else None,
        )
        self.files[f.id] = f
        return f

    def delete(self, file_id: str) -> None:
        f = self.get(file_id)
        if f.id == self.root_id:
            raise DriveError(403, "cannotDeleteRootFolder", "The root folder cannot be deleted.")
        for child in [c for c in self.files.values() if f.id in c.parents]:
            self.delete(child.id)
        self.files.pop(f.id, None)

    def query(self, q: str) -> list[DriveFile]:
        preds = []
        for clause in re.split(r"\s+and\s+", q.strip(), flags=re.I) if q.strip() else []:
            m = _Q_CLAUSE.match(clause)
            if m is None:
                raise DriveError(400, "invalid", f"Invalid Value: unsupported query {clause!r}")
            if m["parent"] is not None:
                pid = self.resolve(m["parent"])
                preds.append(lambda f, pid=pid: pid in f.parents)
            elif m["trashed"] is not None:
                want = m["trashed"].lower() == "true"
                preds.append(lambda f, want=want: f.trashed == want)
            else:
                attr = "name" if m["field"].lower() == "name" else "mime_type"
                value = re.sub(r"\\(.)", r"\1", m["value"])
                neg = m["op"] == "!="
                preds.append(lambda f, a=attr, v=value, n=neg: (getattr(f, a) == v) != n)
        return [
            f for f in self.files.values() if f.id != self.root_id and all(p(f) for p in preds)
        ]
