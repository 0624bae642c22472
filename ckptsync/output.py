"""What every command prints: its text and JSON, its messages on stderr, and the daemon's log.

One module decides how output looks and where it goes, so that ``--json`` means the same to
every command and nothing a user reads is printed from elsewhere:

- :class:`Output`, the stdout of one command. ``push``, ``pull``, ``ls``, ``verify`` and
  ``gc`` work through several checkpoints: with ``--json`` each writes one compact JSON object
  per line as each item finishes (so a pipe sees progress, as with s5cmd's and rclone's
  streaming JSON), every object naming what it is in its ``event`` field, and a last
  ``{"event": "summary", ...}`` line with the counts and the exit code, written on a failure
  too (with ``error``); without ``--json`` the same calls print the human text. ``status`` and
  ``demo`` write one :meth:`Output.document`. :meth:`Output.diagnostic` (:func:`notice`) is a
  line on stderr (an error, a warning), whatever the mode.
- :class:`EventLog`, the log of the ``watch`` daemon: one structured event per line on stderr
  (``key=value`` or JSON), every credential scrubbed; :class:`LogBridge` routes the library's
  log records into it.

Nothing here imports torch.

Example::

    out = Output("push", json_lines=True)
    out.event("pushed", f"pushed {name}", name=name, step=3)   # {"event": "pushed", ...}
    return out.summary(0, "1 pushed", pushed=1)                # {"event": "summary", ...}
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import IO, TYPE_CHECKING, Any, TextIO

from ckptsync.progress import NullProgress
from ckptsync.redact import scrub

if TYPE_CHECKING:
    from ckptsync.progress import Progress

__all__ = ["EventLog", "LogBridge", "Output", "OutputClosed", "human_size", "notice", "utc"]


class OutputClosed(Exception):
    """The reader of stdout went away (``ckptsync ls --json | head -1``): the command ends
    quietly (:data:`ckptsync.exits.EXIT_PIPE`), as a closed pipe ends any Unix tool."""


class Output:
    """The stdout of one ``command``: human text, or JSON Lines when ``json_lines``.

    Every line is flushed at once: stdout is block-buffered in a pipe, and a reader waiting
    for the first object should not wait for the last upload. ``quiet`` (``-q``): no human
    text on stdout (JSON and :meth:`diagnostic` lines still go out). A closed stdout raises
    :class:`OutputClosed`.
    """

    def __init__(self, command: str, json_lines: bool, stream: TextIO | None = None,
                 errors: TextIO | None = None, *, quiet: bool = False) -> None:
        self.command = command
        self.json_lines = json_lines
        self.quiet = quiet
        self._stream = stream
        self._errors = errors
        #: Whether the summary line has been written (the command's last line).
        self.done = False

    def _write(self, line: str) -> None:
        try:
            print(line, file=self._stream or sys.stdout, flush=True)
        except BrokenPipeError as e:
            raise OutputClosed("stdout was closed by its reader") from e

    def _text(self, text: str) -> None:
        if not self.quiet:
            self._write(text)

    def line(self, text: str) -> None:
        """Human text on stdout (nothing with JSON: a JSON reader gets only objects)."""
        if not self.json_lines:
            self._text(text)

    def document(self, obj: Any, text: str, *, indent: int = 2,
                 sort_keys: bool = False) -> None:
        """The one result of a command that does one thing (``status``, ``demo``): ``obj`` as
        one (indented) JSON document, or ``text``."""
        if self.json_lines:
            self._write(json.dumps(obj, indent=indent, sort_keys=sort_keys))
        else:
            self._text(text)

    def diagnostic(self, text: str) -> None:
        """A line on stderr, in either mode: an error, a warning, why nothing was done."""
        notice(text, self._errors)

    def event(self, event: str, text: str | None = None, **fields: Any) -> None:
        """One item finished: ``{"event": EVENT, **fields}`` as one JSON line, or ``text``
        (nothing when None)."""
        if self.json_lines:
            self._write(json.dumps({"event": event, **fields}, default=str))
        elif text is not None:
            self._text(text)

    def summary(self, exit_code: int, text: str | None = None, **counts: Any) -> int:
        """The last line: ``{"event": "summary", "command": ..., **counts, "exit_code": N}``,
        or ``text``; returns ``exit_code`` (``return out.summary(code, ...)``)."""
        if self.json_lines:
            self._write(json.dumps({"event": "summary", "command": self.command, **counts,
                                    "exit_code": exit_code}, default=str))
        elif text is not None:
            self._text(text)
        self.done = True
        return exit_code

    def failed(self, exit_code: int, error: str) -> None:
        """The command stopped on ``error`` (already said on stderr): with JSON Lines, end
        the stream with a summary naming it, so a reader never waits for a missing line."""
        if self.json_lines and not self.done:
            self.summary(exit_code, error=error)


def human_size(n: int) -> str:
    """``n`` bytes for people: ``512 B``, ``36.6 KiB``, ``1.2 GiB``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def notice(text: str, stream: TextIO | None = None) -> None:
    """``text`` on stderr (or ``stream``), flushed: what a person must see whatever the
    application does with log records (a command's error, restore falling back)."""
    # stderr's reader went away too: nobody is left to tell.
    with contextlib.suppress(BrokenPipeError):
        print(text, file=stream or sys.stderr, flush=True)


# --------------------------------------------------------------------------- the daemon's log
def utc(ts: float | None = None) -> str:
    """``ts`` (default: now) as UTC ISO-8601 with milliseconds and a ``Z``."""
    t = datetime.fromtimestamp(time.time() if ts is None else ts, timezone.utc)
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class EventLog:
    """One event per line on a stream: ``ts=... level=info event=pushed name=...`` or JSON.

    Listeners (:meth:`listen`) get every event too, after its line is written, and the byte
    counts of uploads (:meth:`progress`), which never reach the stream: what the daemon's
    metrics and alerts (:mod:`ckptsync.daemon.metrics`) count.
    """

    def __init__(self, stream: IO[str] | None = None, fmt: str = "kv", *,
                 quiet: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.fmt = fmt
        self.quiet = quiet  # -q: warnings and errors only (listeners still get every event)
        self._lock = threading.Lock()
        self._listeners: list[Callable[[str, str, dict[str, Any]], None]] = []

    def listen(self, listener: Callable[[str, str, dict[str, Any]], None]) -> None:
        """Call ``listener(level, event, fields)`` for every event from now on (in the
        thread that reports it: it must be quick and must not block)."""
        self._listeners.append(listener)

    def progress(self, name: str) -> Progress:
        """A progress reporter for the upload of ``name``: its byte counts go to the
        listeners as ``upload_progress`` events (never to the stream)."""
        return _EventProgress(self, name) if self._listeners else _NO_PROGRESS

    def _notify(self, level: str, event: str, fields: dict[str, Any]) -> None:
        for listener in self._listeners:
            try:
                listener(level, event, fields)
            except Exception as e:  # a monitor's bug never stops the daemon, but is said
                self._line(f"ts={utc()} level=error event=listener_failed "
                           f"error={_kv(f'{type(e).__name__}: {e}')}")

    def _line(self, line: str) -> None:
        with self._lock:
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass

    def __call__(self, level: str, event: str, **fields: Any) -> None:
        if not (self.quiet and level in ("info", "debug")):
            rec = {"ts": utc(), "level": level, "event": event, **fields}
            if self.fmt == "json":
                line = json.dumps(rec, default=str)
            else:
                line = " ".join(f"{k}={_kv(v)}" for k, v in rec.items())
            self._line(scrub(line))  # no credential ever reaches the log (DESIGN.md)
        if self._listeners:
            self._notify(level, event, fields)


_NO_PROGRESS = NullProgress()


class _EventProgress:
    """Byte counts of one upload, to an :class:`EventLog`'s listeners."""

    def __init__(self, log: EventLog, name: str) -> None:
        self.log = log
        self.name = name

    def start(self, total: int, description: str) -> None:
        self.log._notify("info", "upload_progress", {"name": self.name, "total": total,
                                                      "bytes": 0})

    def update(self, n: int) -> None:
        self.log._notify("info", "upload_progress", {"name": self.name, "bytes": n})

    def close(self) -> None:
        pass


def _kv(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    if s and not any(c in s for c in ' "=\n\t'):
        return s
    return json.dumps(s)


#: Characters of one bridged log message kept in the event log: a library that logs (or warns
#: with) a whole object's repr must not turn the daemon's log into pages per line.
LOG_MSG_CHARS = 1000


class LogBridge(logging.Handler):
    """Routes library log records (ckptsync's retries and commits; in the ``ckptsync watch``
    process every library's, and Python warnings) into an event log, each message cut to
    :data:`LOG_MSG_CHARS`."""

    def __init__(self, events: EventLog) -> None:
        super().__init__(logging.INFO)
        self.events = events

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            msg = record.getMessage().strip()
            if len(msg) > LOG_MSG_CHARS:
                msg = f"{msg[:LOG_MSG_CHARS]}... ({len(msg) - LOG_MSG_CHARS} more characters)"
            self.events(record.levelname.lower(), "log", logger=record.name, msg=msg)
