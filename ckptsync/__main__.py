"""``python -m ckptsync ...``: the ``ckptsync`` command line.

``watch`` and ``status`` are dispatched to :mod:`ckptsync.watch_cli` directly, so that
``python -m ckptsync watch`` (what :func:`ckptsync.launcher.start_watcher` runs) works whether
or not :mod:`ckptsync.cli` registers them itself.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ckptsync`` command line on ``argv`` (default: ``sys.argv[1:]``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("watch", "status"):
        from ckptsync.watch_cli import main as watch_main

        return watch_main(args)
    from ckptsync.cli import main as cli_main

    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
