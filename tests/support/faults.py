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

``set_outage(exc)`` makes every call fail until ``set_outage(None)`` (the network is down);
``set_delay(seconds)`` makes every call take that much longer (a slow link).
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import fsspec
from fsspec.core import split_protocol
from fsspec.spec import AbstractFileSystem

Action = BaseException | Callable[[], Any]
Damage = Callable[[bytes], bytes]


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
        self.counts: Counter[str] = Counter()
        self.calls: list[tuple[str, str]] = []
        self._faults: dict[str, tuple[int, Action]] = {}
        self._outage: BaseException | None = None
        self._delay = 0.0
        self._damage: dict[str, tuple[str, int, Damage]] = {}  # key -> (suffix, calls left, fn)
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
        return self.target.pipe_file(path, value, mode=mode, **kwargs)

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
