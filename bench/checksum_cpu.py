"""Client CPU seconds per GB of a push to S3 or GCS, with and without the backend checksums
(S3: one CRC32 per part, computed once, instead of botocore's own pass; GCS: the
CRC32C declared on the finalizing request, computed in the pass that hashes the file).

``python -m bench.checksum_cpu OLD_TREE [--mib N] [--runs N] [--servers http,https,gcs]``
starts SeaweedFS over http and over https (:mod:`bench.tls`) and fake-gcs-server over http
(those named by ``--servers``) and, in a fresh process for each tree (``OLD_TREE``: a directory
holding another version's ``ckptsync`` package, e.g. ``git archive REV ckptsync | tar -x -C
DIR``; and this checkout's), pushes one committed checkpoint (one file of ``--mib`` MiB) to
each server ``--runs`` times, and prints the median CPU seconds per GB of the pushing process
(``getrusage``: every thread of it). The servers' CPU is not counted: on a deployment it is not
the trainer's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

_CHILD = r"""
import json, os, resource, sys, uuid
from pathlib import Path
from ckptsync.config import TransferConfig
from ckptsync.local import LocalStore
from ckptsync.manifest import Manifest, make_name
from ckptsync.remote import RemoteStore

mib, runs, work = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
servers = json.loads(sys.argv[4])
store = LocalStore(work / "local")
name = make_name(1)
staging = store.staging(name)
w = staging.open("model.bin")
block = os.urandom(1 << 20)
for _ in range(mib):
    w.write(block)
staging.close_file("model.bin")
ckpt = staging.commit(Manifest.new(step=1, files=staging.entries, name=name))
out = {}
for label, (url, opts) in servers.items():
    per_gb = []
    for i in range(runs):
        remote = RemoteStore(f"{url}/{uuid.uuid4().hex[:8]}", opts, config=TransferConfig())
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        remote.push(ckpt)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
        per_gb.append(cpu / (mib / 1024))
    out[label] = per_gb
print(json.dumps(out))
"""


def _cpu_per_gb(tree: Path, mib: int, runs: int, servers: dict[str, object]) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="ckptsync-crc-") as work:
        # gcsfs hangs against an emulator unless this is off before it is imported.
        env = {**os.environ, "PYTHONPATH": str(tree), "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
        done = subprocess.run([sys.executable, "-c", _CHILD, str(mib), str(runs), work,
                               json.dumps(servers)], env=env, check=True, capture_output=True,
                              text=True)
    res: dict[str, list[float]] = json.loads(done.stdout.strip().splitlines()[-1])
    return {k: statistics.median(v) for k, v in res.items()}


def main() -> int:
    from bench.tls import SeaweedFSTLS
    from tests.support.servers import FakeGCS, SeaweedFS

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("old_tree", type=Path)
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--servers", default="http,https",
                    help="comma-separated: http, https (SeaweedFS), gcs (fake-gcs-server)")
    args = ap.parse_args()
    wanted = args.servers.split(",")
    kinds = {"http": SeaweedFS, "https": SeaweedFSTLS, "gcs": FakeGCS}
    with tempfile.TemporaryDirectory(prefix="ckptsync-crc-") as d, \
            contextlib.ExitStack() as stack:
        servers = {}
        for label in wanted:
            server = stack.enter_context(kinds[label](Path(d) / label))
            bucket = server.create_bucket()
            if label == "gcs":
                servers[label] = (f"gs://{bucket}", {**server.storage_options(),
                                                     "endpoint_url": server.endpoint})
            else:
                servers[label] = (f"s3://{bucket}", server.storage_options())
        rows = {"before": _cpu_per_gb(args.old_tree.resolve(), args.mib, args.runs, servers),
                "after": _cpu_per_gb(ROOT, args.mib, args.runs, servers)}
    print(f"client CPU-s per GB of a push ({args.mib} MiB file, median of {args.runs})")
    print(f"{'':8}" + "".join(f"{k:>10}" for k in servers))
    for label, row in rows.items():
        print(f"{label:8}" + "".join(f"{row[k]:10.3f}" for k in servers))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
