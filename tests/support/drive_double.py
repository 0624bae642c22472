"""A local double of the Google Drive v3 HTTP API, good enough for gdrive-fsspec 0.4.1.

How gdrive-fsspec reaches it, unpatched: gdrive-fsspec builds its client with
``googleapiclient.discovery.build("drive", "v3", credentials=...)`` (no way to pass a root URL)
and hard-codes ``https://www.googleapis.com/upload/drive/v3/files`` for uploads, so the double is
also an HTTPS CONNECT proxy. httplib2 (the client's transport) honours ``HTTPS_PROXY`` and trusts
the CA bundle named by ``HTTPLIB2_CA_CERTS``; the double makes its own CA, signs a certificate for
``*.googleapis.com`` and terminates TLS for tunnels to those hosts (any other host is refused).
:meth:`DriveDouble.environ` gives those variables; subprocesses inherit them.

Credentials, two kinds, as Google's token endpoint grants them:

- a fake service account (``token="service_account"``, ``creds=<dict>``) whose ``token_uri``
  points at the double's plain-HTTP ``/token`` endpoint: the double checks the JWT signature;
- an OAuth user, as a Colab user or ``gcloud auth application-default login`` has one
  (:meth:`DriveDouble.user_credentials`: an "authorized user" dict, which google-auth
  refreshes at ``https://oauth2.googleapis.com/token`` whatever the file says, so through the
  tunnel): ``grant_type=refresh_token`` with the client's id and secret, refused
  (``invalid_grant``) after :meth:`DriveDouble.revoke`, and refused (``invalid_scope``) when
  the scope asked for is not one the user granted. Its "root" is the user's *My Drive* (one
  tree for every principal: the double keeps a single account).

The double then checks the bearer token on every API call, so wrong credentials fail as they
do on Google (``google.auth.exceptions.RefreshError``). ``grants`` lists the grant types it
issued tokens for, in order.

Implemented: ``files.list`` (``q`` with ``'<id>' in parents``, ``name = '..'``, ``mimeType =/!=``,
``trashed = true|false`` joined by ``and``; paging; ``orderBy=name``), ``files.get`` (metadata and
``alt=media`` with ``Range``), ``files.create`` (metadata only, ``uploadType=media|multipart|
resumable``), resumable ``PUT`` chunks (``308`` + ``Range`` until the last one), ``files.update``
(``PATCH`` of name/trashed/addParents/removeParents, and media), ``files.delete`` (recursive),
``about.get``. Not implemented: permissions, shared drives, revisions, export, copy.
"""

from __future__ import annotations

import base64
import datetime as dt
import email.parser
import email.policy
import json
import os
import re
import secrets
import socketserver
import ssl
import tempfile
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.support.drive_state import FOLDER, DriveError, DriveFile, DriveState, now

TUNNEL_HOSTS = ("www.googleapis.com", "oauth2.googleapis.com", "googleapis.com")
DRIVE_SCOPE = "https://www.googleapis.com/auth/drive"
CLOUD_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
THREAD_PREFIX = "drive-double"


def _b64url_decode(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def _make_ca(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for the Google API hosts."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ckptsync test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "www.googleapis.com")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(h) for h in (*TUNNEL_HOSTS,
                                                                  "*.googleapis.com")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    ca_path = directory / "ca.pem"
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    ca_path.write_bytes(ca_cert.public_bytes(pem))
    cert_path.write_bytes(cert.public_bytes(pem))
    key_path.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return ca_path, cert_path, key_path


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    double: DriveDouble

    def process_request(self, request: Any, client_address: Any) -> None:
        # Named threads, so a thread-leak check can tell the double's own threads apart.
        t = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name=f"{THREAD_PREFIX}-conn",
            daemon=True,
        )
        t.start()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        self.server.double.log(format % args)

    # --- transport -------------------------------------------------------------------------
    def do_CONNECT(self) -> None:
        host = self.path.split(":", 1)[0]
        if host not in TUNNEL_HOSTS:
            self.send_response(502, "Only Google API hosts are served by the Drive double")
            self.send_header("Content-Length", "0")
            self.end_headers()
            self.close_connection = True
            return
        self.send_response(200, "Connection established")
        self.end_headers()
        self.wfile.flush()
        tls = self.server.double.ssl_context.wrap_socket(self.connection, server_side=True)
        self.connection = tls
        self.rfile = tls.makefile("rb", self.rbufsize)
        self.wfile = socketserver._SocketWriter(tls)  # type: ignore[attr-defined]
        self.close_connection = False

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, code: int, body: bytes = b"", ctype: str = "application/json",
              headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, code: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(code, json.dumps(obj).encode(), headers=headers)

    def _dispatch(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        params = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        body = self._body()
        double = self.server.double
        try:
            double.requests.append((self.command, url.path, params))
            if url.path == "/token" and self.command == "POST":
                self._json(200, double.grant_token(body))
                return
            double.check_auth(self.headers.get("Authorization"))
            with double.state.lock:
                self._route(url.path, params, body)
        except DriveError as e:
            self._send(e.code, e.body())

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch

    # --- API ---------------------------------------------------------------------------------
    def _route(self, path: str, params: dict[str, str], body: bytes) -> None:
        state = self.server.double.state
        cmd = self.command
        m = re.fullmatch(r"/drive/v3/files/([^/]+)", path)
        if path == "/drive/v3/about" and cmd == "GET":
            self._json(200, {
                "kind": "drive#about",
                "user": {"displayName": "ckptsync test", "emailAddress": "test@example.com"},
                "storageQuota": {"limit": str(15 << 30), "usage": "0"},
            })
        elif path == "/drive/v3/files" and cmd == "GET":
            self._list(params)
        elif path == "/drive/v3/files" and cmd == "POST":
            meta = json.loads(body or b"{}")
            self._json(200, state.create(meta, None).resource())
        elif m and cmd == "GET":
            f = state.get(urllib.parse.unquote(m[1]))
            if params.get("alt") == "media":
                self._media(f)
            else:
                self._json(200, f.resource())
        elif m and cmd == "DELETE":
            state.delete(urllib.parse.unquote(m[1]))
            self._send(204, b"", ctype="text/plain")
        elif m and cmd == "PATCH":
            f = state.get(urllib.parse.unquote(m[1]))
            self._update(f, json.loads(body or b"{}"), params)
            self._json(200, f.resource())
        elif path == "/upload/drive/v3/files" and cmd in ("POST", "PUT"):
            self._upload(params, body, None)
        elif (mu := re.fullmatch(r"/upload/drive/v3/files/([^/]+)", path)) and cmd in (
            "PATCH", "PUT"
        ):
            self._upload(params, body, state.get(urllib.parse.unquote(mu[1])))
        else:
            raise DriveError(404, "notFound", f"No route for {cmd} {path}")

    def _list(self, params: dict[str, str]) -> None:
        state = self.server.double.state
        found = state.query(params.get("q", ""))
        if "name" in params.get("orderBy", ""):
            found.sort(key=lambda f: f.name)
        size = max(1, min(int(params.get("pageSize") or 100), 1000))
        start = int(params.get("pageToken") or 0)
        page = found[start : start + size]
        out: dict[str, Any] = {
            "kind": "drive#fileList",
            "incompleteSearch": False,
            "files": [f.resource() for f in page],
        }
        if start + size < len(found):
            out["nextPageToken"] = str(start + size)
        self._json(200, out)

    def _media(self, f: DriveFile) -> None:
        if f.data is None:
            raise DriveError(403, "fileNotDownloadable", "Only files with binary content can be "
                             "downloaded. Use Export with Docs Editors files.")
        data = f.data
        rng = self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if not m:
                raise DriveError(400, "badRequest", f"Invalid range {rng}")
            first = int(m[1]) if m[1] else max(0, len(data) - int(m[2] or 0))
            last = min(int(m[2]), len(data) - 1) if m[1] and m[2] else len(data) - 1
            if first >= len(data) or first > last:
                raise DriveError(416, "requestedRangeNotSatisfiable",
                                 "Request range not satisfiable")
            self._send(206, data[first : last + 1], ctype="application/octet-stream",
                       headers={"Content-Range": f"bytes {first}-{last}/{len(data)}"})
            return
        self._send(200, data, ctype="application/octet-stream")

    def _update(self, f: DriveFile, meta: dict[str, Any], params: dict[str, str]) -> None:
        state = self.server.double.state
        if "name" in meta:
            f.name = meta["name"]
        if "trashed" in meta:
            f.trashed = bool(meta["trashed"])
        for pid in filter(None, params.get("removeParents", "").split(",")):
            f.parents = [p for p in f.parents if p != state.resolve(pid)]
        for pid in filter(None, params.get("addParents", "").split(",")):
            if state.get(pid).mime_type != FOLDER:
                raise DriveError(400, "invalidParent", f"Parent {pid} is not a folder.")
            f.parents.append(state.resolve(pid))
        f.version += 1
        f.modified = now()

    def _upload(self, params: dict[str, str], body: bytes, target: DriveFile | None) -> None:
        state = self.server.double.state
        kind = params.get("uploadType", "media")
        if kind == "resumable" and "upload_id" in params:
            self._resumable_chunk(params["upload_id"], body)
        elif kind == "resumable":
            upload_id = secrets.token_hex(16)
            state.uploads[upload_id] = {
                "meta": json.loads(body or b"{}"), "data": bytearray(), "target": target,
            }
            base = "/upload/drive/v3/files" + (f"/{target.id}" if target else "")
            location = (f"https://www.googleapis.com{base}?uploadType=resumable"
                        f"&upload_id={upload_id}")
            self._send(200, b"", headers={"Location": location})
        elif kind == "multipart":
            meta, data = self._parse_multipart(body)
            self._finish({"meta": meta, "data": data, "target": target})
        elif kind == "media":
            self._finish({"meta": {}, "data": body, "target": target})
        else:
            raise DriveError(400, "badRequest", f"Unsupported uploadType {kind}")

    def _resumable_chunk(self, upload_id: str, body: bytes) -> None:
        up = self.server.double.state.uploads.get(upload_id)
        if up is None:
            raise DriveError(404, "notFound", "Upload session not found or expired.")
        cr = (self.headers.get("Content-Range") or "").strip()
        data: bytearray = up["data"]
        if m := re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", cr):
            first, last, total = int(m[1]), int(m[2]), m[3]
            if first != len(data) or last - first + 1 != len(body):
                raise DriveError(400, "badRequest",
                                 f"Content-Range {cr} does not follow {len(data)} bytes received")
            data += body
        elif m := re.fullmatch(r"bytes \*/(\d+|\*)", cr):
            total = m[1]
        elif not cr:
            data += body
            total = str(len(data))
        else:
            raise DriveError(400, "badRequest", f"Invalid Content-Range {cr}")
        if total == "*":
            headers = {"Range": f"bytes=0-{len(data) - 1}"} if data else {}
            self._send(308, b"", headers=headers)
            return
        if int(total) != len(data):
            raise DriveError(400, "badRequest", f"Upload size {len(data)} != declared {total}")
        del self.server.double.state.uploads[upload_id]
        self._finish(up)

    def _finish(self, up: dict[str, Any]) -> None:
        state = self.server.double.state
        target: DriveFile | None = up["target"]
        data = bytes(up["data"])
        if target is None:
            f = state.create(up["meta"], data)
        else:
            f = target
            f.data = data
            self._update(f, up["meta"], {})
        self._json(200, f.resource())

    def _parse_multipart(self, body: bytes) -> tuple[dict[str, Any], bytes]:
        ctype = self.headers.get("Content-Type", "")
        msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {ctype}\r\n\r\n".encode() + body
        )
        parts = list(msg.iter_parts())  # type: ignore[attr-defined]
        if len(parts) != 2:
            raise DriveError(400, "badRequest", "multipart upload needs metadata and media")
        meta = json.loads(parts[0].get_payload(decode=True) or b"{}")
        return meta, parts[1].get_payload(decode=True) or b""


class DriveDouble:
    """The double: a thread serving plain HTTP and, through CONNECT, HTTPS for googleapis.com.

    ::

        with DriveDouble() as d, servers.environ(d.environ()):
            folder = d.create_folder("run-1")
            fs = fsspec.filesystem("gdrive", **d.storage_options(root_file_id=folder))
    """

    def __init__(self, workdir: str | os.PathLike[str] | None = None,
                 allow_anonymous: bool = False) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="ckptsync-drive-")
            workdir = self._tmp.name
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.allow_anonymous = allow_anonymous
        self.state = DriveState()
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._accounts: dict[str, Any] = {}  # client_email -> public key
        self._users: dict[str, dict[str, Any]] = {}  # refresh token -> client and scopes
        self._tokens: set[str] = set()
        self.grants: list[str] = []
        self._log_lock = threading.Lock()
        self.log_path = self.workdir / "drive-double.log"
        self.ca_path, cert, key = _make_ca(self.workdir)
        self.ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ssl_context.load_cert_chain(cert, key)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # --- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.double = self
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1},
            name=f"{THREAD_PREFIX}-serve", daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> DriveDouble:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def log(self, line: str) -> None:
        with self._log_lock, open(self.log_path, "a") as fh:
            fh.write(line + "\n")

    # --- configuration for clients ----------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def environ(self) -> dict[str, str]:
        """Variables that send httplib2's googleapis.com traffic here.

        httplib2 reads ``HTTPLIB2_CA_CERTS`` once, when it is imported: call
        :func:`use_ca_in_this_process` too if httplib2 may already be imported.
        """
        no_proxy = {"127.0.0.1", "localhost"}
        no_proxy.update(filter(None, os.environ.get("NO_PROXY", "").split(",")))
        return {
            "HTTPS_PROXY": self.url,
            "HTTPLIB2_CA_CERTS": str(self.ca_path),
            "NO_PROXY": ",".join(sorted(no_proxy)),
            # google-auth's last resort, the GCE metadata server: never asked (tests talk to
            # 127.0.0.1 only), and not waited for either.
            "NO_GCE_CHECK": "true",
            "GCE_METADATA_HOST": "127.0.0.1:9",
            "GCE_METADATA_IP": "127.0.0.1:9",
        }

    def use_ca_in_this_process(self) -> None:
        """Make an already imported httplib2 trust the double's CA (new ``Http`` objects only)."""
        import httplib2

        httplib2.CA_CERTS = str(self.ca_path)

    def service_account(self, email: str | None = None, register: bool = True) -> dict[str, Any]:
        """A service-account key dict (as downloaded from GCP) whose token URI is this double.

        ``register=False`` gives credentials the double does not know: every call fails.
        """
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        email = email or f"sa-{secrets.token_hex(4)}@ckptsync-test.iam.gserviceaccount.com"
        if register:
            self._accounts[email] = key.public_key()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        return {
            "type": "service_account",
            "project_id": "ckptsync-test",
            "private_key_id": secrets.token_hex(20),
            "private_key": pem,
            "client_email": email,
            "client_id": str(secrets.randbelow(10**20)),
            "token_uri": f"{self.url}/token",
        }

    def user_credentials(self, scopes: tuple[str, ...] = (DRIVE_SCOPE, CLOUD_SCOPE),
                         register: bool = True) -> dict[str, Any]:
        """An OAuth user's "authorized user" credentials (the JSON ``gcloud auth
        application-default login`` writes, and Colab's ``authenticate_user`` installs as
        the application-default credentials), granted ``scopes``.

        ``register=False`` gives a refresh token the double does not know.
        """
        info = {
            "type": "authorized_user",
            "client_id": f"{secrets.randbelow(10**12)}-test.apps.googleusercontent.com",
            "client_secret": "GOCSPX-" + secrets.token_urlsafe(18),
            "refresh_token": "1//0test-" + secrets.token_urlsafe(32),
        }
        if register:
            self._users[info["refresh_token"]] = {
                "client_id": info["client_id"], "client_secret": info["client_secret"],
                "scopes": set(scopes)}
        return info

    def revoke(self, refresh_token: str) -> None:
        """The user revoked the login (or it expired): its refresh token is refused."""
        self._users.pop(refresh_token, None)

    def storage_options(self, root_file_id: str | None = None,
                        creds: dict[str, Any] | None = None) -> dict[str, Any]:
        """gdrive-fsspec ``storage_options`` (a registered service account unless given)."""
        opts: dict[str, Any] = {"token": "service_account",
                                "creds": creds or self.default_account}
        if root_file_id:
            opts["root_file_id"] = root_file_id
        return opts

    @property
    def default_account(self) -> dict[str, Any]:
        acct = getattr(self, "_default_account", None)
        if acct is None:
            acct = self._default_account = self.service_account()
        return acct

    def create_folder(self, name: str, parent: str = "root") -> str:
        """Create a folder directly in the double's state; return its id."""
        with self.state.lock:
            return self.state.create({"name": name, "mimeType": FOLDER, "parents": [parent]},
                                     None).id

    # --- auth --------------------------------------------------------------------------------
    def grant_token(self, body: bytes) -> dict[str, Any]:
        form = dict(urllib.parse.parse_qsl(body.decode()))
        if form.get("grant_type") == "refresh_token":
            return self._refresh(form)
        try:
            head_b64, claims_b64, sig_b64 = form["assertion"].split(".")
            claims = json.loads(_b64url_decode(claims_b64))
            self._verify_jwt(head_b64, claims_b64, sig_b64, claims)
        except (KeyError, ValueError) as e:
            raise _TokenError("invalid_grant", f"Invalid JWT: {e}") from None
        return self._issue("jwt-bearer", {})

    def _issue(self, grant: str, extra: dict[str, Any]) -> dict[str, Any]:
        token = "ya29.test-" + secrets.token_urlsafe(24)
        self._tokens.add(token)
        self.grants.append(grant)
        return {"access_token": token, "expires_in": 3599, "token_type": "Bearer", **extra}

    def _refresh(self, form: dict[str, str]) -> dict[str, Any]:
        """``grant_type=refresh_token``, as Google's token endpoint answers it."""
        user = self._users.get(form.get("refresh_token", ""))
        if user is None:
            raise _TokenError("invalid_grant", "Token has been expired or revoked.")
        if (form.get("client_id"), form.get("client_secret")) != (user["client_id"],
                                                                   user["client_secret"]):
            raise _TokenError("invalid_client", "The OAuth client was not found.")
        asked = set(form.get("scope", "").split())
        if not asked <= user["scopes"]:
            raise _TokenError("invalid_scope", "Bad Request")
        return self._issue("refresh_token", {"scope": " ".join(sorted(asked or user["scopes"]))})

    def _verify_jwt(self, head_b64: str, claims_b64: str, sig_b64: str,
                    claims: dict[str, Any]) -> None:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        pub = self._accounts.get(claims.get("iss", ""))
        if pub is None:
            raise _TokenError("invalid_grant", "Invalid grant: account not found")
        try:
            pub.verify(_b64url_decode(sig_b64), f"{head_b64}.{claims_b64}".encode(),
                       padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            raise _TokenError("invalid_grant", "Invalid JWT Signature.") from None

    def check_auth(self, header: str | None) -> None:
        if header is None and self.allow_anonymous:
            return
        if header is None or not header.startswith("Bearer "):
            raise DriveError(401, "required", "Login Required.")
        token = header[len("Bearer "):]
        if token in self._tokens:
            return
        # A self-signed JWT used directly as the bearer token (google-auth may do this).
        try:
            h, c, s = token.split(".")
            self._verify_jwt(h, c, s, json.loads(_b64url_decode(c)))
        except (ValueError, _TokenError):
            raise DriveError(401, "authError", "Invalid Credentials") from None


class _TokenError(DriveError):
    """OAuth token-endpoint errors use their own body format."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(400, error, description)
        self.error, self.description = error, description

    def body(self) -> bytes:
        return json.dumps({"error": self.error, "error_description": self.description}).encode()
