"""The upload process: a :class:`~ckptsync.client.Checkpointer`'s pushes run in a process of
their own, as the daemon's do.

Why: a push's CPU (reading the local copy back, hashing, encrypting, signing every body, the
HTTP client's Python) run in a thread of the trainer holds the trainer's GIL between those
calls and cannot be given a lower priority than the training loop; ``ckptsync watch`` loses
the loop less time for the same upload because it is another process, with a nice value.
:class:`UploadProcess` gives the in-process upload the same: one persistent child per
uploader, started at its first push, niced, opening its own
:class:`~ckptsync.remote.RemoteStore` from the :class:`RemoteSpec`
the trainer's store was opened from (the same :meth:`RemoteSpec.open`). The queue, retry
policy, status and retention stay in the trainer (:mod:`ckptsync.client.uploader`)); each
push is one request.

The protocol: pickled frames (:class:`multiprocessing.connection.Connection`) on a socket
pair; the child is ``python -m ckptsync.remote.process FD``, so nothing of the trainer's
``__main__`` is imported again (``multiprocessing``'s spawn would re-run a script that lacks
an ``if __name__ == "__main__"`` guard).

- trainer -> child: ``("spec", spec, nice, log_level)`` once, then ``("push", id, checkpoint,
  fresh)`` and ``("stop", id)``;
- child -> trainer: ``("ready",)`` or ``("failed", error)`` once, then ``("moved", id)``
  (bytes moved, at most every 0.25 s), ``("log", logger, level, message)`` (the child's
  log records and warnings, logged again in the trainer under the same logger),
  ``("done", id, manifest)`` and ``("error", id, error)``.

A child ends at the end of its socket: when the trainer closes it, or dies (the kernel closes
it), a push in flight is stopped and never committed. A child that dies mid-push fails that
attempt (retried by the queue with a new child); a child that cannot start (a filesystem
registered only in the trainer's memory, a store that cannot be opened there) makes the
uploader push in its own thread from then on, said once as a warning.

Example::

    proc = UploadProcess(spec, nice=10)
    if proc.available():             # started on first use
        manifest = proc.push(ckpt, stop=stop_event, progress=None, fresh=True)
    proc.close()
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptsync.errors import RemoteError

if TYPE_CHECKING:
    from ckptsync.crypto import KeyRing
    from ckptsync.local import LocalCheckpoint
    from ckptsync.manifest import Manifest
    from ckptsync.progress import Progress
    from ckptsync.remote import RemoteStore

__all__ = ["UPLOAD_NICE", "RemoteSpec", "UploadProcess", "main",
           "upload_nice"]

log = logging.getLogger("ckptsync")

UPLOAD_NICE = 10
"""The niceness the upload process adds to its own (``CKPTSYNC_UPLOAD_NICE`` overrides it,
0-19): the training loop gets the CPU first, the upload what is left."""
START_TIMEOUT_S = 120.0
"""How long a starting child may take to import its backend and open the store."""
STOP_GRACE_S = 10.0
"""How long a stopped push may take to unwind in the child before the child is killed."""
_MOVED_EVERY_S = 0.25


@dataclass(frozen=True)
class RemoteSpec:
    """What a :class:`~ckptsync.client.Checkpointer`'s remote store is opened from, resolved
    once (:func:`ckptsync.client.remote_open.remote_spec`): the upload process opens its own
    store from it, by the same :meth:`open` as the trainer's."""

    url: str
    storage_options: Mapping[str, Any]
    keys: KeyRing | None
    directory: Path
    allow_plaintext: bool = False

    def open(self) -> RemoteStore:
        from ckptsync.ownership import RunFile
        from ckptsync.remote import RemoteStore

        return RemoteStore(self.url, dict(self.storage_options), keys=self.keys,
                           run_file=RunFile(self.directory),
                           allow_plaintext=self.allow_plaintext)


def upload_nice(env: dict[str, str] | os._Environ[str] | None = None) -> int:
    """The upload process's niceness: ``CKPTSYNC_UPLOAD_NICE`` or :data:`UPLOAD_NICE`."""
    from ckptsync.errors import ConfigError

    raw = (os.environ if env is None else env).get("CKPTSYNC_UPLOAD_NICE", "").strip()
    if not raw:
        return UPLOAD_NICE
    try:
        nice = int(raw)
    except ValueError:
        nice = -1
    if not 0 <= nice <= 19:
        raise ConfigError(f"CKPTSYNC_UPLOAD_NICE must be an integer from 0 to 19, got {raw!r}")
    return nice


class UploadProcess:
    """The trainer's side of one persistent upload process (see the module doc).

    One push at a time (the uploader has one); thread-safe for :meth:`close` against a push.

    Args:
        spec: what the child opens its store from.
        nice: added to the child's niceness (0: as the trainer).
    """

    def __init__(self, spec: RemoteSpec, nice: int = UPLOAD_NICE) -> None:
        self.spec = spec
        self.nice = nice
        self._lock = threading.Lock()  # one push (or start) at a time
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._unavailable: str | None = None  # why pushes run in the uploader's thread
        self._closed = False
        self._ids = 0

    def __repr__(self) -> str:
        pid = self._proc.pid if self._proc is not None else None
        return f"UploadProcess(pid={pid}, unavailable={self._unavailable!r})"

    @property
    def pid(self) -> int | None:
        """The running child's process id (None before the first push or after close)."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def usable(self) -> bool:
        """Whether pushes go to the child (as far as known: not started yet is usable);
        starts nothing."""
        return self._unavailable is None and not self._closed

    def available(self) -> bool:
        """Whether pushes go to the child: starts it if needed; False (for good) where it
        could not start, said once as a warning."""
        with self._lock:
            if self._unavailable is None and not self._closed and self._conn is None:
                try:
                    self._start()
                except Exception as e:
                    self._stop_child()
                    self._unavailable = f"{type(e).__name__}: {e}"
                    log.warning("the upload process for %s could not start (%s); uploading "
                                "in a thread of this process instead (training and uploads go "
                                "on; the upload's CPU now competes with the training loop)",
                                self.spec_url, self._unavailable)
            return self._unavailable is None and not self._closed

    @property
    def spec_url(self) -> str:
        from ckptsync.remote import redact_url

        return redact_url(self.spec.url)

    def push(self, ckpt: LocalCheckpoint, *, stop: threading.Event,
             progress: Progress | None, fresh: bool,
             streams: Mapping[str, Any] | None = None) -> Manifest:
        """:meth:`RemoteStore.push <ckptsync.remote.RemoteStore.push>` in the child (no
        ``streams``: they live in the trainer).

        Raises:
            RemoteError: the child died mid-push (retryable; the next push starts a new one),
                or whatever the child's push raised.
        """
        assert not streams, "a streamed push runs in the trainer"
        with self._lock:
            if self._conn is None:
                if self._closed or self._unavailable is not None:
                    raise RemoteError(f"the upload process for {self.spec_url} is closed",
                                      url=self.spec_url, retryable=True)
                self._start()  # a new child after one died
            conn = self._conn
            assert conn is not None
            self._ids += 1
            rid = self._ids
            try:
                conn.send(("push", rid, ckpt, fresh))
                return self._await(conn, rid, stop, progress)
            except (EOFError, OSError) as e:
                code = self._stop_child()
                raise RemoteError(
                    f"the upload process for {self.spec_url} exited mid-push of {ckpt.name} "
                    f"(exit code {code}): {type(e).__name__}: {e}; the push is retried in a "
                    "new upload process", url=self.spec_url, retryable=True) from None

    def close(self, timeout: float = 5.0) -> None:
        """End the child (a push in flight is stopped, never committed). Idempotent."""
        self._closed = True
        if self._lock.acquire(timeout=timeout):
            try:
                self._stop_child(timeout)
            finally:
                self._lock.release()
            return
        proc = self._proc  # a push that would not stop: its attempt ends on the child's exit
        if proc is not None:
            proc.kill()

    # ------------------------------------------------------------------ internals
    def _start(self) -> None:
        """Start the child and wait for its store (the lock is held); nothing is left
        running where it fails."""
        try:
            self._spawn()
        except BaseException:
            self._stop_child(0)
            raise

    def _spawn(self) -> None:
        ours, theirs = socket.socketpair()
        # The child imports this very ckptsync, wherever it was imported from here.
        here = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (here, os.environ.get("PYTHONPATH", "")) if p)}
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "ckptsync.remote.process", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, close_fds=True, env=env)
        finally:
            theirs.close()
        conn = self._conn = Connection(ours.detach())
        conn.send(("spec", self.spec, self.nice, logging.getLogger("ckptsync")
                   .getEffectiveLevel()))
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"not ready within {START_TIMEOUT_S:.0f}s")
            if not conn.poll(min(left, 0.5)):
                if self._proc.poll() is not None:
                    raise RuntimeError(f"it exited with code {self._proc.returncode}")
                continue
            msg = conn.recv()
            if msg[0] == "ready":
                log.debug("upload process %d for %s started", self._proc.pid, self.spec_url)
                return
            if msg[0] == "failed":
                raise msg[1]
            self._relay(msg)

    def _await(self, conn: Connection, rid: int, stop: threading.Event,
               progress: Progress | None) -> Manifest:
        """The child's answer to push ``rid``; relays logs and progress meanwhile."""
        stop_by: float | None = None
        while True:
            if stop.is_set() and stop_by is None:
                conn.send(("stop", rid))
                stop_by = time.monotonic() + STOP_GRACE_S
            if not conn.poll(0.1):
                if stop_by is not None and time.monotonic() > stop_by:
                    self._stop_child(0)
                    from ckptsync.transfer.retry import TransferAborted

                    raise TransferAborted(f"transfer to {self.spec_url} was stopped (the "
                                          "upload process did not stop in time: killed)",
                                          url=self.spec_url, retryable=False)
                continue
            msg = conn.recv()
            kind = msg[0]
            if kind == "moved":
                if progress is not None:
                    progress.update(1)
            elif kind == "done" and msg[1] == rid:
                return msg[2]
            elif kind == "error" and msg[1] == rid:
                raise msg[2]
            else:
                self._relay(msg)

    def _relay(self, msg: tuple[Any, ...]) -> None:
        if msg[0] == "log":
            _, name, level, text = msg
            logging.getLogger(name).log(level, "%s", text)

    def _stop_child(self, timeout: float = 5.0) -> int | None:
        """Close the socket (the child's cue to end) and reap it; its exit code."""
        conn, proc, self._conn, self._proc = self._conn, self._proc, None, None
        if conn is not None:
            conn.close()
        if proc is None:
            return None
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


# ---------------------------------------------------------------------- the child


class _Forward(logging.Handler):
    """Sends the child's log records to the trainer, which logs them again."""

    def __init__(self, send: Any) -> None:
        super().__init__()
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            self._send(("log", record.name, record.levelno, text))
        except Exception:
            self.handleError(record)


class _Moved:
    """A push's progress sink in the child: tells the trainer bytes moved, throttled."""

    def __init__(self, send: Any, rid: int) -> None:
        self._send, self._rid, self._last = send, rid, 0.0

    def start(self, total: int, description: str) -> None:
        self.update(1)

    def update(self, n: int) -> None:
        now = time.monotonic()
        if n > 0 and now - self._last >= _MOVED_EVERY_S:
            self._last = now
            self._send(("moved", self._rid))

    def close(self) -> None:
        pass


def _portable(e: BaseException, url: str) -> BaseException:
    """``e`` if it survives pickling, else a :class:`RemoteError` that says what it was."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RemoteError(f"{type(e).__name__}: {e}", url=url, retryable=True)


def main(argv: list[str] | None = None) -> int:
    """The child: serve pushes on the socket whose descriptor is ``argv[0]``."""
    args = sys.argv[1:] if argv is None else argv
    conn = Connection(int(args[0]))
    send_lock = threading.Lock()

    def send(msg: tuple[Any, ...]) -> None:
        with send_lock:
            conn.send(msg)

    handler = _Forward(send)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.captureWarnings(True)
    try:
        _, spec, nice, level = conn.recv()
    except EOFError:
        return 0
    logging.getLogger("ckptsync").setLevel(level)
    try:
        if nice:
            os.nice(nice)
        store = spec.open()
    except Exception as e:
        send(("failed", _portable(e, spec.url)))
        return 1
    send(("ready",))
    stop = threading.Event()
    worker: threading.Thread | None = None

    def push(rid: int, ckpt: LocalCheckpoint, fresh: bool) -> None:
        try:
            manifest = store.push(ckpt, stop=stop, progress=_Moved(send, rid), fresh=fresh)
        except BaseException as e:  # every outcome reaches the trainer
            with contextlib.suppress(OSError):  # else the trainer is gone
                send(("error", rid, _portable(e, store.url)))
            return
        with contextlib.suppress(OSError):
            send(("done", rid, manifest))

    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the trainer closed the socket, or died
            stop.set()
            if worker is not None:
                worker.join(STOP_GRACE_S)
            return 0
        if msg[0] == "push":
            if worker is not None:
                worker.join()
            stop.clear()
            worker = threading.Thread(target=push, args=msg[1:], name="ckptsync-upload",
                                      daemon=True)
            worker.start()
        elif msg[0] == "stop":
            stop.set()


if __name__ == "__main__":
    sys.exit(main())
