"""What the one-shot commands print: a line of text per item, or JSON Lines (torch-free).

``push``, ``pull``, ``ls``, ``verify`` and ``gc`` work through several checkpoints. With
``--json`` each writes one compact JSON object per line on stdout as each item finishes (so a
pipe sees progress, as with s5cmd's and rclone's streaming JSON), every object naming what it
is in its ``event`` field, and a last ``{"event": "summary", ...}`` line with the counts and
the exit code, written on a failure too (with ``error``). Without ``--json`` the same calls
print the human text.

Example::

    out = Output("push", json_lines=True)
    out.event("pushed", f"pushed {name}", name=name, step=3)   # {"event": "pushed", ...}
    return out.summary(0, "1 pushed", pushed=1)                # {"event": "summary", ...}
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

__all__ = ["Output"]


class Output:
    """The stdout of one ``command``: human text, or JSON Lines when ``json_lines``.

    Every line is flushed at once: stdout is block-buffered in a pipe, and a reader waiting
    for the first object should not wait for the last upload.
    """

    def __init__(self, command: str, json_lines: bool, stream: TextIO | None = None) -> None:
        self.command = command
        self.json_lines = json_lines
        self._stream = stream
        #: Whether the summary line has been written (the command's last line).
        self.done = False

    def _write(self, line: str) -> None:
        print(line, file=self._stream or sys.stdout, flush=True)

    def event(self, event: str, text: str | None = None, **fields: Any) -> None:
        """One item finished: ``{"event": EVENT, **fields}`` as one JSON line, or ``text``
        (nothing when None)."""
        if self.json_lines:
            self._write(json.dumps({"event": event, **fields}, default=str))
        elif text is not None:
            self._write(text)

    def summary(self, exit_code: int, text: str | None = None, **counts: Any) -> int:
        """The last line: ``{"event": "summary", "command": ..., **counts, "exit_code": N}``,
        or ``text``; returns ``exit_code`` (``return out.summary(code, ...)``)."""
        if self.json_lines:
            self._write(json.dumps({"event": "summary", "command": self.command, **counts,
                                    "exit_code": exit_code}, default=str))
        elif text is not None:
            self._write(text)
        self.done = True
        return exit_code

    def failed(self, exit_code: int, error: str) -> None:
        """The command stopped on ``error`` (already said on stderr): with JSON Lines, end
        the stream with a summary naming it, so a reader never waits for a missing line."""
        if self.json_lines and not self.done:
            self.summary(exit_code, error=error)
