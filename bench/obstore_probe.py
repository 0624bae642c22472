"""What obstore and s3torchconnector send, and what obstore offers for what ckptsync needs:
``python -m bench.obstore_path --probe``.

Each client talks to SeaweedFS (plain, and over https through the fault proxy, which then
terminates TLS) or to fake-gcs-server through the fault proxy
(``tests/support/fault_proxy.py``), which records every request's head. The probe prints the
headers that matter to ckptsync: payload signing (``x-amz-content-sha256``), checksums
(``x-amz-checksum-*``, ``x-amz-trailer``), conditional writes (``If-None-Match``,
``x-goog-if-generation-match``); then it tries a create-only write twice, a ranged read, and
lists the multipart calls obstore's Python API has.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

SHOWN = ("x-amz-content-sha256", "x-amz-trailer", "content-encoding", "if-none-match",
         "if-match", "x-goog-if-generation-match", "x-goog-hash", "range",
         "x-amz-checksum-algorithm", "x-amz-checksum-type", "x-amz-sdk-checksum-algorithm")


def _head(method: str, target: str, headers: dict[str, str]) -> str:
    path, _, query = target.partition("?")
    q = sorted(k for k in urllib.parse.parse_qs(query, keep_blank_values=True)
               if k in ("uploads", "uploadId", "partNumber", "list-type", "uploadType"))
    what = f"{method} {'/'.join(path.split('/')[2:])[-24:] or '/'}{'?' + '&'.join(q) if q else ''}"
    shown = []
    for k, v in sorted(headers.items()):
        if k in SHOWN or k.startswith("x-amz-checksum-"):
            v = "<sha256>" if re.fullmatch(r"[0-9a-f]{64}", v) else v
            v = "<value>" if k.startswith("x-amz-checksum-") and k not in SHOWN else v
            shown.append(f"{k}: {v}")
    return f"    {what}  [{'; '.join(shown)}]"


def _show(label: str, fn: Callable[[], Any], proxy: Any) -> None:
    n0 = len(proxy.heads)
    try:
        fn()
        outcome = "ok"
    except Exception as e:  # what the client says is the finding
        outcome = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    print(f"  {label}: {outcome}")
    last, count = "", 0
    for line in [_head(*h) for h in proxy.heads[n0:]] + [""]:
        if line == last:
            count += 1
            continue
        if last:
            print(last + (f"  x{count}" if count > 1 else ""))
        last, count = line, 1


def probe(tmp: Path) -> int:
    import obstore

    from bench.obstore_path import Server
    from bench.tls import make_ca_and_cert
    from tests.support.fault_proxy import FaultProxy
    from tests.support.servers import FakeGCS, SeaweedFS

    data = os.urandom(12 * 1024 * 1024)
    ca, cert, key = make_ca_and_cert(tmp / "tls")
    with SeaweedFS(tmp / "weed") as weed:
        s = Server("http", weed, str(ca))
        port = urllib.parse.urlsplit(weed.endpoint).port
        assert port is not None
        for tls in (False, True):
            with FaultProxy("127.0.0.1", port, tls=(cert, key) if tls else None,
                            lifetime=600) as proxy:
                print(f"\n== S3 (SeaweedFS) over {'https' if tls else 'http'}: a 12 MiB object ==")
                cases = _s3_cases(s, proxy.endpoint, data, str(ca) if tls else "",
                                  "https" if tls else "http")
                for label, fn in cases:
                    _show(label, fn, proxy)
    with FakeGCS(tmp / "gcs") as gcs:
        g = Server("gcs", gcs)
        port = urllib.parse.urlsplit(gcs.endpoint).port
        assert port is not None
        with FaultProxy("127.0.0.1", port, lifetime=600) as proxy:
            print("\n== GCS (fake-gcs-server) over http ==")
            store = g.store(endpoint=proxy.endpoint)
            _show("obstore put, single PUT", lambda: obstore.put(store, "p/single", data,
                                                                 use_multipart=False), proxy)
            _show("obstore put, multipart (XML API)", lambda: obstore.put(
                store, "p/multi", data, chunk_size=5 << 20), proxy)
            _show("obstore put mode=create, twice (second: refused?)",
                  lambda: [obstore.put(store, "p/manifest.json", b"{}", mode="create")
                           for _ in range(2)], proxy)
    calls = sorted(n for n in dir(obstore) if "multipart" in n.lower() or "upload" in n.lower())
    print(f"\nobstore {getattr(obstore, '__version__', '?')}: module-level multipart/upload "
          f"calls: {calls or 'none'}")
    return 0


def _s3_cases(s: Any, ep: str, data: bytes, ca: str,
              p: str) -> list[tuple[str, Callable[[], Any]]]:
    """The S3 probes through endpoint ``ep``, under the prefix ``p``."""
    import obstore

    from tests.support.servers import REGION

    def twice() -> None:
        for _ in range(2):
            obstore.put(s.store(endpoint=ep), f"{p}/manifest.json", b"{}", mode="create")

    def ranged() -> None:
        got = obstore.get_range(s.store(endpoint=ep), f"{p}/default", start=1000, end=5000)
        _check(bytes(got) == data[1000:5000])

    return [
        ("obstore put, defaults, 5 MiB parts",
         lambda: obstore.put(s.store(endpoint=ep), f"{p}/default", data,
                             chunk_size=5 << 20)),
        ("obstore put, ckptsync's configuration (data path), 5 MiB parts",
         lambda: obstore.put(s.store(endpoint=ep, data_path=True), f"{p}/datapath", data,
                             chunk_size=5 << 20)),
        ("obstore put mode=create, a small object, twice (second: refused?)", twice),
        ("obstore get_range [1000, 5000) equals the bytes", ranged),
        ("s3torchconnector S3Checkpoint.writer (8 MiB parts)",
         lambda: _s3tc_put(ep, REGION, s.bucket, f"{p}/s3tc", data, ca)),
    ]


def _check(ok: bool) -> None:
    if not ok:
        raise AssertionError("the bytes read differ from those written")


def _s3tc_put(endpoint: str, region: str, bucket: str, key: str, data: bytes,
              ca: str) -> None:
    """A 12 MiB object through ``S3Checkpoint.writer``; the CRT reads credentials from the
    AWS environment and, over https, its trust store from ``SSL_CERT_FILE``."""
    from s3torchconnector import S3Checkpoint, S3ClientConfig

    from tests.support.servers import ACCESS_KEY, SECRET_KEY, environ

    env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
           "AWS_EC2_METADATA_DISABLED": "true", **({"SSL_CERT_FILE": ca} if ca else {})}
    with environ(env):
        cp = S3Checkpoint(region, endpoint=endpoint,
                          s3client_config=S3ClientConfig(force_path_style=True, max_attempts=2))
        with cp.writer(f"s3://{bucket}/{key}") as w:
            w.write(data)
