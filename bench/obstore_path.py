"""obstore as ckptsync's data path for s3:// and gs://, measured against the
path ckptsync has, on the same servers, runs alternating.

``python -m bench.obstore_path [--mib N] [--runs N] [--servers http,https,gcs] [--probe]``

Starts SeaweedFS over http and over https (:mod:`bench.tls`) and fake-gcs-server (those named
by ``--servers``), commits one local checkpoint of one ``--mib`` MiB file of random bytes, and
per server alternates these contenders ``--runs`` times, printing the median MB/s and client
CPU seconds per GB (``getrusage`` of this process: every thread, obstore's Rust ones too; the
servers are other processes and are not counted):

- upload: ``ckptsync push`` (today's path: BLAKE3 of every byte read and compared with the
  manifest, a CRC32 per part, parts through botocore from transfer threads, the manifest
  create-only, LATEST); ``obstore put`` (obstore alone, a file path, its defaults);
  ``obstore data path`` (the least ckptsync on obstore would do: read the file in 16 MiB
  pieces, BLAKE3 each, hand them to ``obstore.put`` as a multipart upload, 16 MiB parts, 8
  at once, compare the digest, then write the manifest with ``mode="create"``);
- download: ``ckptsync pull`` (listing, manifest, ranged parallel reads, BLAKE3 verified,
  fsync, local commit); ``obstore get`` (streamed to a file, fsynced); ``obstore data path``
  (the same stream, BLAKE3 of each piece compared with the manifest's, fsynced).

The data path's S3 store signs bodies over http and not over https (``unsigned_payload``), as
ckptsync does, and sends CRC64NVME, the checksum obstore offers besides SHA256. fake-gcs-server
implements no XML multipart upload (object_store's GCS upload), so on ``gcs`` obstore's
uploads are single PUTs of the whole file held in memory.

``--probe`` prints what each client sends (request heads recorded by the fault proxy) and what
obstore offers for what ckptsync needs: create-only writes, checksums, ranged reads, multipart
listing, fake-gcs-server.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # else gcsfs hangs on fakes
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PIECE = 16 * 1024 * 1024


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Server:
    """One server: ckptsync's URL and options for it, and an obstore store for its bucket."""

    def __init__(self, label: str, server: Any, ca: str = "") -> None:
        from tests.support.servers import ACCESS_KEY, REGION, SECRET_KEY

        self.label = label
        self.bucket = server.create_bucket()
        self.gcs = label == "gcs"
        if self.gcs:
            self.url = f"gs://{self.bucket}"
            self.options = {**server.storage_options(), "endpoint_url": server.endpoint}
        else:
            self.url = f"s3://{self.bucket}"
            self.options = server.storage_options()
        self.endpoint = server.endpoint
        self.ca = ca
        self.keys = {"access_key_id": ACCESS_KEY, "secret_access_key": SECRET_KEY,
                     "region": REGION}

    def store(self, *, data_path: bool = False, endpoint: str = "", **config: Any) -> Any:
        """An obstore store for the bucket; ``data_path``: configured as ckptsync would."""
        from obstore.store import GCSStore, S3Store

        endpoint = endpoint or self.endpoint
        options: dict[str, Any] = {"timeout": "600s"}
        if endpoint.startswith("https"):
            options["root_certificate"] = Path(self.ca).read_text()
        else:
            options["allow_http"] = True
        if self.gcs:
            # fake-gcs-server checks no token. Not skip_signature: with it, obstore 0.12.1
            # still asked the GCE metadata server (169.254.169.254) for one.
            return GCSStore(self.bucket, base_url=endpoint, bearer_token="unchecked",
                            client_options=options, **config)
        if data_path:
            config = {"unsigned_payload": endpoint.startswith("https"),
                      "checksum_algorithm": "crc64nvme", **config}
        return S3Store(self.bucket, endpoint=endpoint, virtual_hosted_style_request=False,
                       client_options=options, **self.keys, **config)


def _pieces(path: Path, hasher: Any) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while piece := f.read(PIECE):
            hasher.update(piece)
            yield piece


def contenders(s: Server, ckpt: Any, tmp: Path) -> tuple[dict[str, Callable[[], None]],
                                                         dict[str, Callable[[], None]]]:
    """Upload and download contenders for server ``s`` (each one run: a fresh prefix or
    directory)."""
    import obstore

    from ckptsync.local import LocalStore
    from ckptsync.manifest import new_hasher
    from ckptsync.remote import RemoteStore

    (entry,) = ckpt.manifest.files
    src = ckpt.path / entry.path
    plain, ours = s.store(), s.store(data_path=True)
    dl = f"dl-{uuid.uuid4().hex[:8]}"
    RemoteStore(f"{s.url}/{dl}", s.options).push(ckpt)
    remote_file = f"{dl}/{ckpt.name}/{entry.path}"
    sinks: list[Path] = []

    def sink() -> Path:
        import shutil

        while sinks:
            shutil.rmtree(sinks.pop(), ignore_errors=True)
        d = tmp / f"sink-{uuid.uuid4().hex[:8]}"
        d.mkdir()
        sinks.append(d)
        return d

    def push() -> None:
        RemoteStore(f"{s.url}/up-{uuid.uuid4().hex[:8]}", s.options).push(ckpt)

    def put_plain() -> None:
        obstore.put(plain, f"plain-{uuid.uuid4().hex[:8]}/{entry.path}", src)

    def put_data_path() -> None:
        prefix = f"obs-{uuid.uuid4().hex[:8]}/{ckpt.name}"
        h = new_hasher(entry.algo)
        obstore.put(ours, f"{prefix}/{entry.path}", _pieces(src, h), chunk_size=PIECE,
                    max_concurrency=8, use_multipart=not s.gcs)
        if h.hexdigest() != entry.digest:
            raise RuntimeError(f"{src} changed while it was uploaded")
        obstore.put(ours, f"{prefix}/ckptsync.json", ckpt.manifest.to_json(), mode="create")

    def pull() -> None:
        RemoteStore(f"{s.url}/{dl}", s.options).pull(None, LocalStore(sink()))

    def get(store: Any, verify: bool) -> None:
        h = new_hasher(entry.algo)
        with open(sink() / entry.path, "wb") as f:
            for piece in obstore.get(store, remote_file).stream(min_chunk_size=PIECE):
                f.write(piece)
                if verify:
                    h.update(piece)
            f.flush()
            os.fsync(f.fileno())
        if verify and h.hexdigest() != entry.digest:
            raise RuntimeError(f"{remote_file}: digest mismatch")

    up = {"ckptsync push": push, "obstore put (file path)": put_plain,
          "obstore data path (BLAKE3 + put + create-only manifest)": put_data_path}
    down = {"ckptsync pull (verified, fsync)": pull,
            "obstore get -> file + fsync": lambda: get(plain, False),
            "obstore data path (get + BLAKE3 + fsync)": lambda: get(ours, True)}
    return up, down


def measure(runs: int, fns: dict[str, Callable[[], None]],
            nbytes: int) -> dict[str, tuple[list[float], list[float]]]:
    """MB/s and client CPU-s/GB of each contender, ``runs`` times alternating; an error makes
    the row ``unavailable`` (printed with it)."""
    out: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in fns}
    failed: dict[str, str] = {}
    for _ in range(runs):
        for name, fn in fns.items():
            if name in failed:
                continue
            c0, t0 = _cpu(), time.perf_counter()
            try:
                fn()
            except Exception as e:  # reported in the table, as bench.common.measure does
                first = str(e).splitlines()[0][:200] if str(e) else ""
                failed[name] = f"{type(e).__name__}: {first}"
                continue
            wall, cpu = time.perf_counter() - t0, _cpu() - c0
            out[name][0].append(nbytes / wall / 1e6)
            out[name][1].append(cpu / (nbytes / 1e9))
    for name, why in failed.items():
        print(f"  {name}: unavailable: {why}", flush=True)
        out[name] = ([], [])
    return out


def render(title: str, rows: dict[str, tuple[list[float], list[float]]]) -> None:
    base = next(iter(rows.values()))[1]
    print(f"\n== {title} (median of n) ==")
    print(f"{'':58}{'MB/s':>8}  {'CPU-s/GB':>9}  {'vs ckptsync':>11}  n")
    for name, (mbps, cpu) in rows.items():
        if not mbps:
            print(f"{name:58}unavailable")
            continue
        ratio = statistics.median(cpu) / statistics.median(base) if base else float("nan")
        print(f"{name:58}{statistics.median(mbps):8.1f}  {statistics.median(cpu):9.2f}  "
              f"{ratio:10.2f}x  {len(mbps)}")


def make_checkpoint(tmp: Path, mib: int) -> Any:
    from ckptsync.local import LocalStore
    from ckptsync.manifest import Manifest, make_name

    store = LocalStore(tmp / "local")
    name = make_name(1)
    staging = store.staging(name)
    w = staging.open("model.bin")
    block = os.urandom(1 << 20)
    for i in range(mib):
        w.write(block[:-8] + i.to_bytes(8, "big"))  # no two MiB alike
    staging.close_file("model.bin")
    return staging.commit(Manifest.new(step=1, files=staging.entries, name=name))


@contextlib.contextmanager
def servers(wanted: list[str], tmp: Path) -> Iterator[list[Server]]:
    from bench.tls import SeaweedFSTLS
    from tests.support.servers import FakeGCS, SeaweedFS

    kinds = {"http": SeaweedFS, "https": SeaweedFSTLS, "gcs": FakeGCS}
    with contextlib.ExitStack() as stack:
        out = []
        for label in wanted:
            srv = stack.enter_context(kinds[label](tmp / label))
            out.append(Server(label, srv, str(getattr(srv, "ca", "") or "")))
        yield out


def main() -> int:
    from bench.obstore_probe import probe

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--servers", default="http,https,gcs")
    ap.add_argument("--probe", action="store_true", help="only the probe of what each sends")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ckptsync-obstore-",
                                     dir=os.environ.get("BENCH_TMP")) as d:
        tmp = Path(d)
        if args.probe:
            return probe(tmp)
        ckpt = make_checkpoint(tmp, args.mib)
        nbytes = ckpt.manifest.total_size
        print(f"obstore as the data path: one {nbytes / 1e6:.0f} MB file, {args.runs} runs, "
              f"{os.cpu_count()} CPUs", flush=True)
        with servers(args.servers.split(","), tmp) as found:
            results: dict[str, Any] = {}
            for s in found:
                up, down = contenders(s, ckpt, tmp)
                for what, fns in (("upload", up), ("download", down)):
                    rows = measure(args.runs, fns, nbytes)
                    render(f"{what}, {s.label}", rows)
                    results[f"{what}/{s.label}"] = rows
        print("\n" + json.dumps({"bytes": nbytes, "runs": args.runs, "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
