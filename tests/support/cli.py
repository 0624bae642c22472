"""The ``ckptsync`` command line for tests: in this process (:func:`run_cli`) for what a
command does, or in a subprocess (:func:`cli`) for what needs a process of its own (signals,
exit on SIGPIPE, ``python -m ckptsync``, a torch-free interpreter, a daemon).

Both give a :class:`subprocess.CompletedProcess` (``returncode``, ``stdout``, ``stderr`` as
text) and the same environment: quick retries (``CKPTSYNC_RETRIES=2``, no back-off), then the
caller's variables.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping

from tests.support.paths import REPO
from tests.support.servers import environ

#: Quick retries: a test of a failure should not wait out the production back-off.
QUICK = {"CKPTSYNC_RETRIES": "2", "CKPTSYNC_BACKOFF_INITIAL": "0"}


def cli_env(**extra: str) -> dict[str, str]:
    """This process's environment with its ``sys.path`` and quick retries, then ``extra``."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **QUICK, **extra}


def cli(*args: str, env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None, timeout: float = 120,
        **variables: str) -> subprocess.CompletedProcess[str]:
    """``python -m ckptsync.cli ARGS`` in a subprocess (in ``cwd``, by default the repository
    root), with ``env`` and ``variables`` added to the environment; its output captured."""
    return subprocess.run([sys.executable, "-m", "ckptsync.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd or REPO,
                          env=cli_env(**{**(env or {}), **variables}))


@contextlib.contextmanager
def _own_logging() -> Iterator[None]:
    """Give the command a root logger with no handlers (as a fresh interpreter has), so that
    its ``logging.basicConfig`` writes to the captured stderr; pytest's handlers and the
    root level come back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers.clear()
    try:
        yield
    finally:
        for h in root.handlers:
            with contextlib.suppress(Exception):
                h.close()
        root.handlers[:] = handlers
        root.setLevel(level)


def run_cli(*args: str, env: Mapping[str, str | None] | None = None,
            cwd: str | os.PathLike[str] | None = None, stdin: str = "",
            **variables: str) -> subprocess.CompletedProcess[str]:
    """Run ``ckptsync ARGS`` in this process through its entry point
    (:func:`ckptsync.cli.main`): what the command prints and its exit code, without an
    interpreter's start-up. ``env`` and ``variables`` set (None: remove) environment
    variables for the call; ``cwd`` is the working directory during the call."""
    from ckptsync.cli import main

    out, err = io.StringIO(), io.StringIO()
    changes: dict[str, str | None] = {**QUICK, **(env or {}), **variables}
    with (environ(changes), _own_logging(), contextlib.chdir(cwd or os.getcwd()),
          contextlib.redirect_stdout(out), contextlib.redirect_stderr(err)):
        old_stdin = sys.stdin
        sys.stdin = io.StringIO(stdin)
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse: --help, --version, a usage error
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        finally:
            sys.stdin = old_stdin
    return subprocess.CompletedProcess(["ckptsync", *args], code, out.getvalue(),
                                       err.getvalue())
