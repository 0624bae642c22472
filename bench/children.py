"""Child processes for the memory benchmark (``python -m bench.children``).

``daemon`` execs the real ``ckptsync watch`` (its ``--nice`` included); the parent samples
each child's RSS from outside.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from pathlib import Path


def rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


class PeakSampler:
    def __init__(self) -> None:
        self.peak = rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss())

    def reset(self) -> None:
        self.peak = rss()

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return max(self.peak, rss())


def daemon(args: argparse.Namespace) -> None:
    """Become ``ckptsync watch DIR URL`` (exec: same pid, so the parent samples its RSS)."""
    os.environ["CKPTSYNC_STORAGE_OPTIONS"] = args.options
    argv = [sys.executable, "-m", "ckptsync", "watch", args.dir, args.url,
            "--nice", str(args.nice)]
    if args.once:
        argv.append("--once")
    sys.stdout.flush()
    os.execv(sys.executable, argv)


def peer_upload(args: argparse.Namespace) -> None:
    """One peer uploading every file of a directory (memory of a boto3 / s3fs uploader)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    opts = json.loads(args.options)
    src = Path(args.dir)
    if args.tool == "boto3":
        import boto3

        from bench.peers import boto3_config

        ck = opts["client_kwargs"]
        client = boto3.client("s3", endpoint_url=ck["endpoint_url"], region_name=ck["region_name"],
                              aws_access_key_id=opts["key"], aws_secret_access_key=opts["secret"])
        bucket, _, prefix = args.url[len("s3://"):].partition("/")
        for p in sorted(src.rglob("*")):
            if p.is_file():
                client.upload_file(str(p), bucket, f"{prefix}/{p.name}", Config=boto3_config())
    else:
        import s3fs

        fs = s3fs.S3FileSystem(**opts)
        for p in sorted(src.rglob("*")):
            if p.is_file():
                fs.put_file(str(p), f"{args.url}/{p.name}")


def client(args: argparse.Namespace) -> None:
    """Extra RSS of a saver over ``saves`` saves of the state: JSON on stdout."""
    import torch

    from bench.common import Size, make_state, state_dict
    from bench.peers import DcpAsync, torch_save_fsync

    torch.set_num_threads(2)
    size = Size(args.width, args.layers)
    model, opt = make_state(size)
    import gc

    gc.collect()
    base = rss()
    sampler = PeakSampler()
    after: list[int] = []
    out = Path(args.dir)
    if args.tool == "ckptsync":
        from ckptsync import Checkpointer

        c = Checkpointer(out / "ours", keep_last=1)
        for i in range(args.saves):
            c.save(i, model=model, optimizer=opt).wait()
            after.append(rss() - base)
        c.close()
    elif args.tool == "torch.save":
        for _i in range(args.saves):
            torch_save_fsync(state_dict(model, opt), out / "ckpt.pt")
            after.append(rss() - base)
    elif args.tool == "dcp.async_save":
        import shutil

        d = DcpAsync(async_staging=False)
        for i in range(args.saves):
            d.save(state_dict(model, opt), out / f"dcp{i}")
            d.wait()
            shutil.rmtree(out / f"dcp{i}", ignore_errors=True)
            after.append(rss() - base)
        d.close()
    peak = sampler.stop() - base
    print(json.dumps({"extra_peak": peak, "after": after, "state": size.nbytes}))


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("daemon")
    d.add_argument("--dir", required=True)
    d.add_argument("--url", required=True)
    d.add_argument("--options", default="{}")
    d.add_argument("--nice", type=int, default=0)
    d.add_argument("--once", action="store_true")
    p = sub.add_parser("peer-upload")
    p.add_argument("--tool", choices=["boto3", "s3fs"], required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--url", required=True)
    p.add_argument("--options", default="{}")
    c = sub.add_parser("client")
    c.add_argument("--tool", required=True)
    c.add_argument("--dir", required=True)
    c.add_argument("--width", type=int, required=True)
    c.add_argument("--layers", type=int, required=True)
    c.add_argument("--saves", type=int, default=20)
    args = ap.parse_args()
    {"daemon": daemon, "peer-upload": peer_upload, "client": client}[args.cmd](args)


if __name__ == "__main__":
    main()


