"""The client API: :class:`Checkpointer`, the one entry point for training code."""

from __future__ import annotations

import logging
import os
import platform
import socket
import subprocess
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from ckptsync import __version__
from ckptsync.errors import (
    CkptSyncError,
    ConfigError,
    CorruptCheckpointError,
    NoCheckpointError,
)
from ckptsync.local import (
    RESUMED_FILE,
    FileOps,
    LocalCheckpoint,
    LocalStore,
    storage_error,
    write_json_atomic,
)
from ckptsync.manifest import Manifest, make_name
from ckptsync.retention import (
    BestRule,
    CheckpointInfo,
    RetentionPolicy,
    parse_best,
    select_for_deletion,
)
from ckptsync.snapshot import BackgroundWorker, SaveHandle
from ckptsync.state import (
    SnapshotBuffers,
    capture_rng,
    check_safe,
    load_into,
    restore_rng,
    serialize,
    state_of,
    to_jsonable,
)

if TYPE_CHECKING:
    from ckptsync.remote import RemoteStore

__all__ = ["Checkpointer", "RestoreInfo"]

log = logging.getLogger("ckptsync")

RESERVED = frozenset({"metrics", "extra", "rng", "step", "ckptsync"})
RNG_FILE = "rng.pt"


@dataclass(frozen=True)
class RestoreInfo:
    """What :meth:`Checkpointer.restore` loaded."""

    name: str
    step: int | None
    path: Path
    manifest: Manifest
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    """Every object's loaded state, including names that were not passed to restore."""


def _git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=2, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    rev = out.stdout.strip()
    return rev if out.returncode == 0 and rev else None


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Checkpointer:
    """Crash-safe, asynchronous checkpoints of a training run, optionally synced to a remote.

    Args:
        directory: local checkpoint directory (created if missing). One directory holds one run.
        remote: optional fsspec URL (``s3://bucket/run``, ``gs://...``, ``gdrive://...``,
            ``file:///mnt/drive/run``). Saves are uploaded in the background; ``restore`` pulls
            the newest valid remote checkpoint when it is newer than the newest local one.
        storage_options: passed unchanged to fsspec for ``remote``.
        keep_last, keep_best, keep_every: retention (applied locally and, with a remote,
            remotely). ``keep_best`` is ``"METRIC:min|max:K"`` or a :class:`BestRule`.
        rng: capture and restore python/numpy/torch/CUDA RNG states (default True).
        file_ops: local file system calls (a fault seam for tests).

    Raises:
        LocalStorageError: the directory cannot be created or written.
        ConfigError: a bad retention rule or remote URL.

    Example::

        ckpt = Checkpointer("ckpts", remote="s3://bucket/run1", keep_last=3)
        info = ckpt.restore(model=model, optimizer=opt)
        start = info.step + 1 if info else 0
        for step in range(start, steps):
            ...
            if step % 100 == 0:
                ckpt.save(step, model=model, optimizer=opt, metrics={"loss": loss.item()})
        ckpt.close()
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        remote: str | None = None,
        *,
        storage_options: Mapping[str, Any] | None = None,
        keep_last: int | None = None,
        keep_best: str | BestRule | None = None,
        keep_every: int | None = None,
        rng: bool = True,
        file_ops: FileOps | None = None,
        remote_store: RemoteStore | None = None,
    ) -> None:
        self.rank, self.world_size = _dist_info()
        self.store = LocalStore(directory, ops=file_ops)
        if self.rank == 0:
            if self.store.acquire_writer_lock():
                self.store.cleanup()
            else:
                log.warning("another process is writing checkpoints in %s: leaving its "
                            "unfinished saves alone", self.store.directory)
        best = parse_best(keep_best) if isinstance(keep_best, str) else keep_best
        self.policy = RetentionPolicy(keep_last=keep_last, keep_best=best, keep_every=keep_every)
        self.capture_rng = rng
        self._buffers = SnapshotBuffers()
        self._worker = BackgroundWorker()
        self._uploads: list[Future[Manifest]] = []
        self._upload_pool: ThreadPoolExecutor | None = None
        self._uploading: set[str] = set()
        self._lock = threading.Lock()
        self._resumed_from: str | None = None
        self._dist_pending = False
        self._closed = False
        self._git = _git_revision()
        self.remote: RemoteStore | None = remote_store
        if self.remote is None and remote is not None:
            from ckptsync.remote import RemoteStore

            self.remote = RemoteStore(remote, dict(storage_options or {}))
        if self.remote is not None:
            self._upload_pool = ThreadPoolExecutor(1, thread_name_prefix="ckptsync-upload")

    # ------------------------------------------------------------------ save
    def save(
        self,
        step: int | None,
        *,
        metrics: Mapping[str, Any] | None = None,
        extra: Any = None,
        **objects: Any,
    ) -> SaveHandle[Manifest | None]:
        """Checkpoint ``objects`` at ``step``; returns once tensors are snapshotted to CPU.

        Serialization, hashing, fsync, the local commit and any upload run in the background.
        A save while one is in flight first waits for it. Call on every rank under
        ``torch.distributed``: rank 0 writes.

        Args:
            step: training step (non-negative int; None for step-less checkpoints).
            metrics: numbers (floats or 0-d tensors) stored in the manifest, used by keep_best.
            extra: JSON-able run arguments/config (a dict or ``argparse.Namespace``).
            **objects: objects with ``state_dict()`` (model, optimizer, GradScaler, scheduler,
                your own) or plain dicts of tensors and values.

        Raises:
            UnsafeStateError: a value cannot be stored without unsafe pickling (named).
            CkptSyncError: a previous background save or upload failed.
        """
        self._check_open()
        bad = RESERVED.intersection(objects)
        if bad:
            raise ConfigError(f"object names {sorted(bad)} are reserved; pick other names")
        if not objects:
            raise ConfigError("save() needs at least one object, e.g. save(step, model=model)")
        self._sync()  # back-pressure: the previous save is committed before buffers are reused
        self._raise_upload_errors()
        metric_values = {k: float(v.item() if isinstance(v, torch.Tensor) else v)
                         for k, v in (metrics or {}).items()}
        extra_json = to_jsonable(extra) if extra is not None else {}

        t0 = time.perf_counter()
        rng_state = capture_rng() if self.capture_rng else None
        if self.world_size > 1:
            gathered: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
            dist.gather_object(rng_state, gathered, dst=0)
            rng_all = gathered
        else:
            rng_all = [rng_state]
        if self.rank != 0:
            self._dist_pending = True
            return SaveHandle(_done_future(None), "")

        trees: dict[str, Any] = {}
        for obj_name, obj in objects.items():
            tree = state_of(obj_name, obj)
            check_safe(tree, obj_name)
            trees[obj_name] = self._buffers.snapshot(obj_name, tree)
        stall = time.perf_counter() - t0
        name = make_name(step)
        meta = self._meta(objects, stall)
        if rng_all is not None and rng_all[0] is not None:
            trees_rng: dict[str, Any] | None = {"world_size": self.world_size, "ranks": rng_all}
        else:
            trees_rng = None

        def job() -> Manifest:
            return self._write(name, step, trees, trees_rng, metric_values, extra_json, meta)

        handle = self._worker.submit(job, name)
        self._dist_pending = self.world_size > 1
        return handle  # type: ignore[return-value]

    def _meta(self, objects: Mapping[str, Any], stall: float) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "world_size": self.world_size,
            "torch": torch.__version__,
            "ckptsync": __version__,
            "python": platform.python_version(),
            "host": socket.gethostname(),
            "objects": {k: type(v).__name__ for k, v in objects.items()},
            "stall_s": round(stall, 6),
        }
        if self._git:
            meta["git_revision"] = self._git
        return meta

    def _write(
        self,
        name: str,
        step: int | None,
        trees: dict[str, Any],
        rng: dict[str, Any] | None,
        metrics: dict[str, float],
        extra: dict[str, Any],
        meta: dict[str, Any],
    ) -> Manifest:
        t0 = time.perf_counter()
        staging = self.store.staging(name)
        streams: dict[str, Any] = {}
        try:
            files = dict(trees)
            if rng is not None:
                files[RNG_FILE[:-3]] = rng
            for obj_name, tree in files.items():
                relpath = f"{obj_name}.pt"
                w = staging.open(relpath)
                # With an S3 remote, large files are uploaded while they are serialized (the
                # bytes hashed are the bytes sent); nothing is visible remotely before push.
                stream = (self.remote.stream_file(name, relpath)
                          if self.remote is not None and self._upload_pool is not None else None)
                if stream is not None:
                    streams[relpath] = stream
                    w.tee = stream.write
                try:
                    serialize(tree, w)  # hashed while written
                except Exception:
                    if w.error is not None:  # torch wraps OSError: report the real cause
                        raise storage_error(w.error, w.path, "write") from w.error
                    raise
                staging.close_file(relpath)  # fsync
            manifest = Manifest.new(step=step, files=staging.entries, name=name,
                                    metrics=metrics, meta=meta, extra=extra)
            ckpt = staging.commit(manifest)
        except BaseException:
            staging.abort()
            for stream in streams.values():
                stream.abort()
            raise
        log.info("saved %s (step %s, %.1f MB) in %.2fs", ckpt.path, step,
                 manifest.total_size / 1e6, time.perf_counter() - t0)
        if self.remote is not None and self._upload_pool is not None:
            with self._lock:
                self._uploading.add(name)
                self._uploads.append(self._upload_pool.submit(self._upload, ckpt, streams))
        self._apply_local_retention()
        return manifest

    def _upload(self, ckpt: LocalCheckpoint, streams: Mapping[str, Any] | None = None) -> Manifest:
        assert self.remote is not None
        try:
            manifest = self.remote.push(ckpt, streams=streams)
            if self.policy.active:
                protect = [n for n in (self._resumed_from,) if n]
                self.remote.apply_retention(self.policy, protect=protect)
            return manifest
        finally:
            with self._lock:
                self._uploading.discard(ckpt.name)

    def _apply_local_retention(self) -> None:
        if not self.policy.active:
            return
        infos = [CheckpointInfo(c.name, c.step, c.manifest.sort_key(), c.manifest.metrics)
                 for c in self.store.list()]
        with self._lock:
            protect = {*self._uploading, *([self._resumed_from] if self._resumed_from else [])}
        for doomed in select_for_deletion(infos, self.policy, protect=protect):
            self.store.delete(doomed)
            log.info("retention: deleted local checkpoint %s", doomed)

    # ------------------------------------------------------------------ wait / close
    def _sync(self) -> None:
        """Drain the in-flight save; under torch.distributed, tell every rank how it went."""
        err: BaseException | None = None
        if self.rank == 0:
            try:
                self._worker.drain()
            except BaseException as e:
                err = e
        if self.world_size > 1 and self._dist_pending:
            status = [None if err is None else f"{type(err).__name__}: {err}"]
            dist.broadcast_object_list(status, src=0)
            self._dist_pending = False
            if self.rank != 0 and status[0] is not None:
                raise CkptSyncError(f"rank 0 failed to save the checkpoint: {status[0]}")
        if err is not None:
            raise err

    def _raise_upload_errors(self, wait: bool = False) -> None:
        with self._lock:
            futs = list(self._uploads)
        for fut in futs:
            if not wait and not fut.done():
                continue
            with self._lock:
                self._uploads.remove(fut)
            fut.result()  # raises the upload's error

    def wait(self) -> None:
        """Block until every save is committed locally and (with a remote) remotely.

        Under ``torch.distributed`` this is collective: call it on every rank.

        Raises:
            CkptSyncError: a background save or upload failed.
        """
        self._sync()
        self._raise_upload_errors(wait=True)

    def close(self) -> None:
        """:meth:`wait`, then stop the background threads. Idempotent."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            self._worker.close()
            self.store.release_writer_lock()
            if self._upload_pool is not None:
                self._upload_pool.shutdown(wait=True)

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            # Keep the original exception; still finish what was in flight.
            try:
                self.close()
            except Exception as e:
                log.error("while closing after an error: %s", e)

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError(f"the checkpointer for {self.store.directory} is closed")

    # ------------------------------------------------------------------ listing
    def list(self) -> list[Manifest]:
        """Committed local checkpoints, oldest first (not verified)."""
        return [c.manifest for c in self.store.list()]

    def latest(self) -> Manifest | None:
        """The newest committed checkpoint, local or (with a remote) remote; not verified."""
        local = self.store.list()
        best = local[-1].manifest if local else None
        if self.remote is not None:
            rm = self.remote.newest_valid()
            if rm is not None and (best is None or rm.sort_key() > best.sort_key()):
                best = rm
        return best

    # ------------------------------------------------------------------ restore
    def restore(
        self, *, map_location: Any = "cpu", name: str | None = None, **objects: Any
    ) -> RestoreInfo | None:
        """Load the newest valid checkpoint into ``objects``; None when there is none.

        Each candidate is verified (every file's size and digest) before anything is loaded;
        a corrupt one is logged and skipped for the next newest. With a remote, the newest
        valid remote checkpoint is pulled first when it is newer than the newest local one.
        Loading uses ``torch.load(weights_only=True)``: nothing in a checkpoint can run code.
        A module's file is memory-mapped (copy-on-write: the checkpoint never changes), not
        read, since ``load_state_dict`` copies its tensors anyway.

        Args:
            map_location: passed to ``torch.load`` (default "cpu": a GPU checkpoint loads on a
                CPU-only machine).
            name: restore this checkpoint instead of the newest.
            **objects: the objects to load into, by the names they were saved under.

        Raises:
            NoCheckpointError: ``name`` was given and does not exist.
            CorruptCheckpointError: every checkpoint present is corrupt (nothing was loaded).
            ConfigError: an object was not in the checkpoint.
        """
        self._check_open()
        self.wait()
        chosen = self._choose(name) if self.rank == 0 else None
        if self.world_size > 1:
            box = [chosen.name if chosen else None]
            dist.broadcast_object_list(box, src=0)
            chosen = self.store.get(box[0]) if box[0] else None
        if chosen is None:
            log.info("no checkpoint in %s: starting fresh", self.store.directory)
            return None
        info = self._load(chosen, map_location, objects)
        self._resumed_from = chosen.name
        if self.rank == 0:
            write_json_atomic(self.store.directory / RESUMED_FILE,
                              {"name": chosen.name, "pid": os.getpid()})
        log.info("resumed from %s (step %s)", chosen.path, chosen.step)
        return info

    def _choose(self, name: str | None) -> LocalCheckpoint | None:
        if name is not None:
            ckpt = self._named(name)
            self.store.verify(ckpt)
            return ckpt
        pulled = self._pull_if_newer() if self.remote is not None else None
        failures = []
        for ckpt in reversed(self.store.list()):
            try:
                # A checkpoint pulled just now had every byte's digest verified while it was
                # downloaded and fsynced: hashing it again would only double the resume time.
                if ckpt.name != pulled:
                    self.store.verify(ckpt)
            except CorruptCheckpointError as e:
                log.warning("checkpoint %s is corrupt, falling back to an older one: %s",
                            ckpt.name, e)
                failures.append(str(e))
                continue
            return ckpt
        if failures:
            raise CorruptCheckpointError(
                f"every checkpoint in {self.store.directory} is corrupt ({'; '.join(failures)}); "
                "nothing was loaded. Restore a backup, or move the directory away to start fresh"
            )
        return None

    def _named(self, name: str) -> LocalCheckpoint:
        try:
            return self.store.get(name)
        except NoCheckpointError:
            if self.remote is None:
                raise
        return self.remote.pull(name, self.store)

    def _pull_if_newer(self) -> str | None:
        """Pull the newest valid remote checkpoint if newer than every local one; its name."""
        assert self.remote is not None
        local = self.store.list()
        newest_local = local[-1].manifest.sort_key() if local else None
        candidate = self.remote.newest_valid()
        tried: set[str] = set()
        while candidate is not None and (newest_local is None
                                         or candidate.sort_key() > newest_local):
            tried.add(candidate.name)
            try:
                self.remote.pull(candidate.name, self.store)
                log.info("pulled %s from %s", candidate.name, self.remote.url)
                return candidate.name
            except CorruptCheckpointError as e:
                log.warning("remote checkpoint %s is corrupt, trying an older one: %s",
                            candidate.name, e)
            older = [m for m in self.remote.list() if m.name not in tried]
            candidate = older[-1] if older else None
        return None

    def _load(self, ckpt: LocalCheckpoint, map_location: Any,
              objects: Mapping[str, Any]) -> RestoreInfo:
        listed = {e.path for e in ckpt.manifest.files}
        missing = [k for k in objects if f"{k}.pt" not in listed]
        if missing:
            held = sorted(p[:-3] for p in listed if p.endswith(".pt") and p != RNG_FILE)
            raise ConfigError(
                f"checkpoint {ckpt.path} has no state for {missing}; it holds {held}. "
                "Pass objects under the names they were saved with"
            )
        # Load everything first: a file that fails to load leaves every object untouched.
        states: dict[str, Any] = {}
        for entry in ckpt.manifest.files:
            if not entry.path.endswith(".pt"):
                continue
            path = ckpt.file(entry.path)
            try:
                key = entry.path[:-3]
                states[key] = _torch_load(path, map_location,
                                          isinstance(objects.get(key), torch.nn.Module))
            except Exception as e:
                raise CorruptCheckpointError(
                    f"{path}: cannot be loaded safely ({e}); it was not written by ckptsync "
                    "or holds objects that need unsafe pickling", path=str(path)
                ) from e
        for obj_name, obj in objects.items():
            load_into(obj_name, obj, states[obj_name])
        rng = states.pop(RNG_FILE[:-3], None)
        if self.capture_rng and rng is not None:
            ranks = rng.get("ranks", [])
            if self.rank < len(ranks) and ranks[self.rank] is not None:
                restore_rng(ranks[self.rank])
            else:
                log.warning("checkpoint %s has no RNG state for rank %d (saved with world size "
                            "%s): RNG not restored", ckpt.name, self.rank, rng.get("world_size"))
        return RestoreInfo(ckpt.name, ckpt.step, ckpt.path, ckpt.manifest,
                           dict(ckpt.manifest.metrics), dict(ckpt.manifest.extra), states)


def _torch_load(path: Path, map_location: Any, mmap: bool) -> Any:
    """``torch.load(weights_only=True)``; with ``mmap``, memory-mapping the file where it can.

    For a module, whose ``load_state_dict`` copies every tensor into its own parameters, a
    mapping (private: nothing is ever written back) saves reading the whole file into fresh
    memory first: its tensors are copied once, straight from the page cache. Not for objects
    that keep the loaded tensors (an optimizer's moments): those would be copied anyway, a
    page at a time as training first writes them, which costs more than one read. A file in
    torch's legacy format, or on a file system that refuses mappings, is read.
    """
    if mmap and os.name == "posix":
        try:  # torch refuses a legacy-format file before mapping anything
            return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
        except Exception as e:  # the read below raises what is really wrong, if anything
            log.debug("cannot map %s (%s): reading it", path, e)
    return torch.load(path, map_location=map_location, weights_only=True)


def _done_future(value: Any) -> Future[Any]:
    f: Future[Any] = Future()
    f.set_result(value)
    return f


