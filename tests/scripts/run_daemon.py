"""``python run_daemon.py watch ...``: ``python -m ckptsync`` with the test-only ``slowfile://``
protocol registered (see slowfs.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import slowfs

from ckptsync.__main__ import main

if __name__ == "__main__":
    slowfs.register()
    sys.exit(main(sys.argv[1:]))
