"""``python run_daemon.py watch ...``: ``python -m ckptsync`` with the test-only ``slowfile://``
protocol registered (see tests/support/slowfs.py; the repository is on ``PYTHONPATH``:
``tests.support.paths.child_env``)."""

from __future__ import annotations

import sys

from ckptsync.__main__ import main
from tests.support import slowfs

if __name__ == "__main__":
    slowfs.register()
    sys.exit(main(sys.argv[1:]))
