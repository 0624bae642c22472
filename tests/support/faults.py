"""A fault seam for remote storage: an fsspec filesystem that delegates to a real one and fails
(or kills the process) on the Nth call of chosen operations, or changes the bytes one read
returns, and records every call.

    fs = FaultFS(fsspec.filesystem("memory"))
    fs.fail_on("open:wb", nth=2, exc=PermissionError("injected"))
    fs.damage_on("read", lambda b: b[:-1], suffix="model.pt")  # one short body
    RemoteStore("memory://bucket/run", fs=fs)

Operation keys: ``ls``, ``info``, ``find``, ``exists``, ``cat_file``, ``pipe_file``,
``open:rb``, ``open:wb``, ``read``/``write`` (calls on an opened file), ``rm_file``,
``rm``, ``makedirs``, ``mv``. ``calls`` lists ``(key, path)`` in order.

:class:`RecordingOps` is the local counterpart, a :class:`ckptsync.atomic.FileOps` that records
every file operation (here, torch-free, so the conformance suite can run without torch).

``drop_reply_on("pipe_file", suffix=...)`` lets one write take effect, then raises as a lost
reply does (the server acted, the client cannot know it: an ambiguous outcome).

``set_outage(exc)`` makes every call fail until ``set_outage(None)`` (the network is down);
``set_delay(seconds)`` makes every call take that much longer (a slow link);
``before(key, suffix, action)`` runs ``action`` right before one call (an interleaving).

The wrapper keeps its target's capabilities, so that a store over it takes the production
path of its backend (:func:`ckptsync.remote.choose_backend` sees the same backend):

- it reports the target's ``protocol``, and forwards a server-side ``copy`` (key ``copy``);
- over s3fs it forwards what :func:`ckptsync.remote.backends.s3.is_s3fs` and the multipart
  path use (``_call_s3``, ``loop``, ``split_path``, ``_get_s3_method_kwargs``,
  ``set_session``, ``get_s3``, ``endpoint_url``, ``client_kwargs``) and multipart ``gc``
  (``list_multipart_uploads``, ``abort_mpu``). Each ``_call_s3`` is a call of key
  ``_call_s3:<method>`` (``_call_s3:create_multipart_upload``,
  ``_call_s3:complete_multipart_upload``, ...), counted and faultable like any other; the
  bulk ``upload_part`` and ranged ``get_object`` go through the blocking botocore client the
  multipart path builds, not through this wrapper;
- over a local directory the store writes through real paths: uploads still go through this
  wrapper (``open:wb``, ``write``, ``rm_file``), but the renames into place (``os.replace``),
  the manifest's ``os.link`` and the fsyncs do not. Those are seen through the store's other
  seam, ``RemoteStore(ops=...)``: each comes right after an ``ops.fsync`` (of the file) or
  before an ``ops.fsync_dir``; :class:`FaultOps` counts and fails those.
"""

from __future__ import annotations

import inspect
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
from fsspec.core import split_protocol
from fsspec.spec import AbstractFileSystem

from ckptsync.atomic import FileOps

Action = BaseException | Callable[[], Any]
Damage = Callable[[bytes], bytes]

# Forwarded from an s3fs target (absent otherwise, as on the target): called ones are counted.
_S3_CALLED = ("_call_s3", "set_session", "get_s3", "list_multipart_uploads", "abort_mpu")
_S3_VALUES = ("loop", "split_path", "_get_s3_method_kwargs", "endpoint_url", "client_kwargs")


def kill() -> None:
    """An action that ends the process at once, as a crash would (no cleanup, no flush)."""
    os._exit(17)


class _FaultyWriter:
    """Proxy for a writable remote file: counts ``write`` calls through the fault table."""

    def __init__(self, fs: FaultFS, f: Any, path: str) -> None:
        self._fs = fs
        self._f = f
        self._path = path

    def write(self, data: Any) -> int:
        self._fs._hit("write", self._path)
        n: int = self._f.write(data)
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _FaultyWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.__exit__(*exc)


class _FaultyReader:
    """Proxy for a readable remote file: counts ``read`` calls through the fault table."""

    def __init__(self, fs: FaultFS, f: Any, path: str) -> None:
        self._fs = fs
        self._f = f
        self._path = path

    def read(self, *args: Any) -> Any:
        damage = self._fs._hit("read", self._path)
        data = self._f.read(*args)
        return damage(data) if damage is not None else data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _FaultyReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.__exit__(*exc)


class FaultFS(AbstractFileSystem):
    """Delegates to ``target``; ``fail_on(key, nth, exc)`` makes the nth call of ``key`` fail."""

    protocol = "faulty"
    cachable = False

    def __init__(self, target: AbstractFileSystem) -> None:
        super().__init__()
        self.target = target
        self.protocol = target.protocol  # the store chooses the target's backend
        self.counts: Counter[str] = Counter()
        self.calls: list[tuple[str, str]] = []
        self._faults: dict[str, tuple[int, Action]] = {}
        self._outage: BaseException | None = None
        self._delay = 0.0
        self._damage: dict[str, tuple[str, int, Damage]] = {}  # key -> (suffix, calls left, fn)
        self._before: dict[str, tuple[str, Callable[[], Any]]] = {}  # key -> (suffix, action)
        self._drops: dict[str, tuple[str, int]] = {}  # key -> (suffix, calls left)
        self._lock = threading.Lock()

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        # Strip as the wrapped URL's own filesystem class would.
        proto = split_protocol(path)[0] or "file"
        return fsspec.get_filesystem_class(proto)._strip_protocol(path)

    def fail_on(self, key: str, nth: int = 1, exc: Action | None = None) -> None:
        """Make the ``nth`` call (counted from now) of ``key`` raise ``exc`` or run it."""
        with self._lock:
            self._faults[key] = (self.counts[key] + nth, exc or ConnectionError("injected fault"))

    def damage_on(self, key: str, damage: Damage, *, nth: int = 1, suffix: str = "") -> None:
        """Make the ``nth`` call (counted from now) of ``key`` (``read`` or ``cat_file``) on a
        path ending with ``suffix`` return ``damage(data)`` instead of the bytes it read: a
        short body whose length the transport did not notice, or a flipped byte. Once."""
        with self._lock:
            self._damage[key] = (suffix, nth, damage)

    def drop_reply_on(self, key: str, *, nth: int = 1, suffix: str = "") -> None:
        """Let the ``nth`` call (counted from now) of ``key`` (``pipe_file``) on a path ending
        with ``suffix`` take effect, then raise ``ConnectionError`` as a reply lost on the way
        back does. Once."""
        with self._lock:
            self._drops[key] = (suffix, nth)

    def _reply_lost(self, key: str, path: Any) -> None:
        """After a call of ``key`` took effect: raise if its reply is to be lost."""
        with self._lock:
            planned = self._drops.get(key)
            if planned is None or not str(path).endswith(planned[0]):
                return
            suffix, left = planned
            if left > 1:
                self._drops[key] = (suffix, left - 1)
                return
            del self._drops[key]
        raise ConnectionError(f"injected: the reply to {key} {path} was lost after it acted")

    def before(self, key: str, suffix: str, action: Callable[[], Any]) -> None:
        """Run ``action`` once, right before the first call of ``key`` on a path ending with
        ``suffix`` (counted from now): another client's request interleaved at that point."""
        with self._lock:
            self._before[key] = (suffix, action)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._damage.clear()

    def set_outage(self, exc: BaseException | None) -> None:
        """Every call (counted and recorded) raises ``exc`` from now on; None ends it."""
        with self._lock:
            self._outage = exc

    def set_delay(self, seconds: float) -> None:
        """Every call first sleeps ``seconds`` (0: no delay)."""
        with self._lock:
            self._delay = seconds

    def count(self, key: str, suffix: str = "") -> int:
        """How many ``key`` calls were made on paths ending with ``suffix``."""
        return sum(1 for k, p in self.calls if k == key and p.endswith(suffix))

    def _hit(self, key: str, path: Any) -> Damage | None:
        """Count a call; raise or run its fault if one is due; return its damage if one is."""
        with self._lock:
            hook = self._before.get(key)
            if hook is not None and str(path).endswith(hook[0]):
                del self._before[key]
            else:
                hook = None
        if hook is not None:
            hook[1]()
        with self._lock:
            self.counts[key] += 1
            self.calls.append((key, str(path)))
            delay, outage = self._delay, self._outage
            damage: Damage | None = None
            planned = self._damage.get(key)
            if planned is not None and str(path).endswith(planned[0]):
                suffix, left, fn = planned
                if left == 1:
                    del self._damage[key]
                    damage = fn
                else:
                    self._damage[key] = (suffix, left - 1, fn)
            fault = self._faults.get(key)
            if fault is not None and fault[0] == self.counts[key]:
                del self._faults[key]
            else:
                fault = None
        if delay:
            time.sleep(delay)
        if outage is not None:
            raise type(outage)(*outage.args)  # a fresh one: threads raise it concurrently
        if fault is None:
            return damage
        action = fault[1]
        if isinstance(action, BaseException):
            raise action
        action()
        return damage

    # --- delegated operations ------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        # Only for names the class lacks: the s3fs attributes, where the target has them.
        target = self.__dict__.get("target")
        if target is None or name not in _S3_CALLED + _S3_VALUES or not hasattr(target, name):
            raise AttributeError(name)
        value = getattr(target, name)
        if name not in _S3_CALLED:
            return value
        if name == "_call_s3":
            async def call_s3(method: str, *args: Any, **kwargs: Any) -> Any:
                where = "/".join(str(kwargs[k]) for k in ("Bucket", "Key") if k in kwargs)
                self._hit(f"_call_s3:{method}", where)
                return await value(method, *args, **kwargs)

            return call_s3
        if inspect.iscoroutinefunction(value):
            async def forward_async(*args: Any, **kwargs: Any) -> Any:
                self._hit(name, str(args[0]) if args else "")
                return await value(*args, **kwargs)

            return forward_async

        def forward(*args: Any, **kwargs: Any) -> Any:
            self._hit(name, str(args[0]) if args else "")
            return value(*args, **kwargs)

        return forward

    def copy(self, path1: Any, path2: Any, *args: Any, **kwargs: Any) -> None:
        self._hit("copy", path2)
        self.target.copy(path1, path2, *args, **kwargs)

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> Any:
        self._hit("ls", path)
        return self.target.ls(path, detail=detail, **kwargs)

    def info(self, path: str, **kwargs: Any) -> Any:
        self._hit("info", path)
        return self.target.info(path, **kwargs)

    def find(self, path: str, maxdepth: int | None = None, withdirs: bool = False,
             detail: bool = False, **kwargs: Any) -> Any:
        self._hit("find", path)
        return self.target.find(path, maxdepth=maxdepth, withdirs=withdirs, detail=detail,
                                **kwargs)

    def exists(self, path: str, **kwargs: Any) -> bool:
        self._hit("exists", path)
        return bool(self.target.exists(path, **kwargs))

    def cat_file(self, path: str, start: int | None = None, end: int | None = None,
                 **kwargs: Any) -> Any:
        damage = self._hit("cat_file", path)
        data = self.target.cat_file(path, start=start, end=end, **kwargs)
        return damage(data) if damage is not None else data

    def cat(self, path: Any, recursive: bool = False, on_error: str = "raise",
            **kwargs: Any) -> Any:
        for p in [path] if isinstance(path, str) else path:
            self._hit("cat_file", p)
        return self.target.cat(path, recursive=recursive, on_error=on_error, **kwargs)

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> Any:
        self._hit("pipe_file", path)
        out = self.target.pipe_file(path, value, mode=mode, **kwargs)
        self._reply_lost("pipe_file", path)
        return out

    def open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:  # type: ignore[override]
        key = "open:rb" if "r" in mode else "open:wb"
        self._hit(key, path)
        f = self.target.open(path, mode, **kwargs)
        if key == "open:rb":
            return _FaultyReader(self, f, path)
        return _FaultyWriter(self, f, path)

    def rm_file(self, path: str) -> None:
        self._hit("rm_file", path)
        self.target.rm_file(path)

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        self._hit("rm", path)
        self.target.rm(path, recursive=recursive, maxdepth=maxdepth)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self._hit("makedirs", path)
        self.target.makedirs(path, exist_ok=exist_ok)

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        self._hit("mkdir", path)
        self.target.mkdir(path, create_parents=create_parents, **kwargs)

    def mv(self, path1: str, path2: str, **kwargs: Any) -> None:
        self._hit("mv", path1)
        self.target.mv(path1, path2, **kwargs)

    def invalidate_cache(self, path: str | None = None) -> None:
        self.target.invalidate_cache(path)


class FaultOps(FileOps):
    """The store's local-path seam (``RemoteStore(ops=...)``) with faults: records
    ``(op, path)`` for ``fsync`` (the path of the descriptor) and ``fsync_dir``, and
    ``fail_on(op, contains, exc)`` makes the next such call on a path containing ``contains``
    raise ``exc`` (once).

        ops = FaultOps()
        ops.fail_on("fsync", f".{MANIFEST_NAME}.tmp-", PermissionError("injected"))
        RemoteStore("file:///mnt/backup/run", ops=ops)   # the manifest is never linked
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self._faults: dict[str, tuple[str, BaseException]] = {}
        self._lock = threading.Lock()

    def fail_on(self, op: str, contains: str, exc: BaseException) -> None:
        with self._lock:
            self._faults[op] = (contains, exc)

    def _hit(self, op: str, path: str) -> None:
        with self._lock:
            self.calls.append((op, path))
            fault = self._faults.get(op)
            if fault is None or fault[0] not in path:
                return
            del self._faults[op]
        raise fault[1]

    def fsync(self, fd: int) -> None:
        self._hit("fsync", os.readlink(f"/proc/self/fd/{fd}"))
        super().fsync(fd)

    def fsync_dir(self, path: Path) -> None:
        self._hit("fsync_dir", str(path))
        super().fsync_dir(path)


# --------------------------------------------------------------------------- local FileOps


class RecordingOps(FileOps):
    """Calls every real file operation, and records ``(op, path)`` for each, in order.

    ``hook(index, op, path, when)`` runs before (``when="before"``) and after each call.
    """

    def __init__(self, hook: Callable[[int, str, str, str], None] | None = None) -> None:
        self.calls: list[tuple[str, str]] = []
        self._hook = hook
        self._paths: dict[int, str] = {}
        self._fds: dict[int, str] = {}  # fd -> path of the file last opened on it

    def _run(self, op: str, path: str, fn: Callable[[], Any]) -> Any:
        idx = len(self.calls)
        self.calls.append((op, path))
        if self._hook:
            self._hook(idx, op, path, "before")
        result = fn()
        if self._hook:
            self._hook(idx, op, path, "after")
        return result

    def open_write(self, path: Path) -> Any:
        def go() -> Any:
            f = super(RecordingOps, self).open_write(path)
            self._paths[id(f)] = str(path)
            self._fds[f.fileno()] = str(path)
            return f
        return self._run("open_write", str(path), go)

    def write(self, f: Any, data: Any) -> int:
        return self._run("write", self._paths.get(id(f), "?"),
                         lambda: super(RecordingOps, self).write(f, data))

    def fsync(self, fd: int) -> None:
        """Recorded with the path of the file open on ``fd`` (its number if unknown)."""
        self._run("fsync", self._fds.get(fd, str(fd)),
                  lambda: super(RecordingOps, self).fsync(fd))

    def mkdir(self, path: Path) -> None:
        self._run("mkdir", str(path), lambda: super(RecordingOps, self).mkdir(path))

    def rename(self, src: Path, dst: Path) -> None:
        self._run("rename", f"{src} -> {dst}", lambda: super(RecordingOps, self).rename(src, dst))

    def fsync_dir(self, path: Path) -> None:
        self._run("fsync_dir", str(path), lambda: super(RecordingOps, self).fsync_dir(path))

    def replace_at(self, src: Path, dst_dir_fd: int, dst_name: str) -> None:
        self._run("replace_at", f"{src} -> {dst_name}",
                  lambda: super(RecordingOps, self).replace_at(src, dst_dir_fd, dst_name))

    def replace(self, src: Path, dst: Path) -> None:
        self._run("replace", f"{src} -> {dst}",
                  lambda: super(RecordingOps, self).replace(src, dst))

    def link(self, src: Path, dst: Path) -> None:
        self._run("link", f"{src} -> {dst}", lambda: super(RecordingOps, self).link(src, dst))
