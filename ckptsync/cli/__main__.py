"""``python -m ckptsync.cli ...``: the ``ckptsync`` command line."""

from __future__ import annotations

import sys

from ckptsync.cli import main

if __name__ == "__main__":
    sys.exit(main())
