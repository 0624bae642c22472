"""``python -m ckptsync ...``: the ``ckptsync`` command line (:func:`ckptsync.cli.main`).

:func:`ckptsync.daemon.launcher.start_watcher` runs ``python -m ckptsync watch ...``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ckptsync.cli import main as cli_main


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ckptsync`` command line on ``argv`` (default: ``sys.argv[1:]``)."""
    return cli_main(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
