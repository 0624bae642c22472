"""Sync what 🤗 Accelerate's ``Accelerator.save_state`` writes; resume from the remote.

With ``ProjectConfiguration(project_dir=..., automatic_checkpoint_naming=True)`` every
``save_state()`` writes ``project_dir/checkpoints/checkpoint_N/``. :class:`CkptSync` hands
each finished directory to a ``ckptsync watch`` daemon (started on the main process, in its
own process: training never waits on the network) that watches ``project_dir`` with the
``accelerate`` preset, so the remote holds exactly what ``ckptsync watch --preset
accelerate`` would upload and ``ckptsync pull`` restores it. :meth:`CkptSync.load_state`
pulls the newest valid remote checkpoint into ``project_dir`` (main process) and loads it on
every process.

Example::

    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from ckptsync.integrations.accelerate import CkptSync

    acc = Accelerator(project_config=ProjectConfiguration(
        project_dir="run", automatic_checkpoint_naming=True, total_limit=3))
    model, opt = acc.prepare(model, opt)
    sync = CkptSync(acc, "s3://bucket/run1")
    sync.load_state()                      # resume if the remote holds a checkpoint
    for step in ...:
        ...
        sync.save_state()                  # returns once the local files are written
    sync.close()                           # waits until the remote holds the last one
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ckptsync.daemon.launcher import WatcherHandle, start_watcher
from ckptsync.errors import CkptSyncError, ConfigError, CorruptCheckpointError
from ckptsync.redact import redact_url
from ckptsync.remote import RemoteStore
from ckptsync.zerocode.presets import preset_rule
from ckptsync.zerocode.restore import restore_watched
from ckptsync.zerocode.rules import WatchRule

__all__ = ["PRESET", "CkptSync"]

log = logging.getLogger("ckptsync.accelerate")

PRESET = "accelerate"
_N_RE = re.compile(r"checkpoint_(\d+)$")


def _require_accelerate() -> None:
    try:
        import accelerate  # noqa: F401
    except ImportError as e:
        raise ConfigError("ckptsync.integrations.accelerate needs Hugging Face Accelerate: "
                          "pip install 'ckptsync[accelerate]'") from e


class CkptSync:
    """Upload every ``accelerator.save_state()`` checkpoint; resume from the newest one.

    Args:
        accelerator: an ``accelerate.Accelerator`` whose ``ProjectConfiguration`` has a
            ``project_dir`` and ``automatic_checkpoint_naming=True``.
        remote: fsspec URL of the run's remote prefix (one prefix per run).
        storage_options: fsspec options (credentials stay out of the daemon's command line).
        keep_last: remote retention; default: the ``ProjectConfiguration``'s ``total_limit``
            (None: keep everything). ``keep_best``/``keep_every`` as ``ckptsync watch``.
        settle, interval: as ``ckptsync watch``.
        watcher_options: more :func:`ckptsync.start_watcher` arguments (``log_path``, ...).

    Raises:
        ConfigError: Accelerate is not installed, or automatic checkpoint naming is off.
    """

    def __init__(self, accelerator: Any, remote: str, *,
                 storage_options: Mapping[str, Any] | None = None,
                 keep_last: int | None = None, keep_best: str | None = None,
                 keep_every: int | None = None, settle: float | None = None,
                 interval: float | None = None, **watcher_options: Any) -> None:
        _require_accelerate()
        config = accelerator.project_configuration
        if not config.automatic_checkpoint_naming or not config.project_dir:
            raise ConfigError(
                "CkptSync needs Accelerator(project_config=ProjectConfiguration(project_dir="
                "..., automatic_checkpoint_naming=True)): it syncs project_dir/checkpoints/")
        self.accelerator = accelerator
        self.remote = remote
        self.storage_options = dict(storage_options or {})
        self.project_dir = Path(config.project_dir).expanduser().absolute()
        self.keep_last = keep_last if keep_last is not None else config.total_limit
        self._watch_args: dict[str, Any] = dict(
            keep_best=keep_best, keep_every=keep_every, settle=settle, interval=interval,
            **watcher_options)
        self._watcher: WatcherHandle | None = None

    # ------------------------------------------------------------------ save
    def save_state(self, **kwargs: Any) -> str:
        """``accelerator.save_state(**kwargs)`` on every process (as Accelerate requires),
        then, on the main process, the finished directory goes to the background uploader.
        Returns the checkpoint directory."""
        path: str = self.accelerator.save_state(**kwargs)
        if self.accelerator.is_main_process:
            self._ensure_watcher()
        return path

    def _ensure_watcher(self) -> WatcherHandle:
        if self._watcher is None or not self._watcher.running():
            self._watcher = start_watcher(
                self.project_dir, self.remote, storage_options=self.storage_options,
                presets=[PRESET], keep_last=self.keep_last, **self._watch_args)
        return self._watcher

    @property
    def watcher(self) -> WatcherHandle | None:
        """The daemon's handle on the main process (None elsewhere, or before a save)."""
        return self._watcher

    def wait(self, timeout: float | None = None) -> None:
        """Block until the remote holds every finished local checkpoint (main process; other
        processes return at once). Raises ``TimeoutError`` or ``CkptSyncError`` (the daemon's
        failures) like :meth:`ckptsync.WatcherHandle.flush`."""
        if self._watcher is not None:
            self._watcher.flush(timeout=timeout)

    def close(self, timeout: float | None = None) -> None:
        """:meth:`wait`, then stop the daemon."""
        try:
            self.wait(timeout)
        finally:
            if self._watcher is not None:
                self._watcher.stop()

    # ------------------------------------------------------------------ resume
    def pull_latest(self) -> str | None:
        """Pull the newest valid remote checkpoint into ``project_dir/checkpoints/`` (main
        process), then every process waits for it. Returns its directory, or None when the
        remote holds none. Every process must call it (a single node, or a ``project_dir``
        shared by every node).

        Raises:
            CkptSyncError: the pull failed (on every process: none is left waiting).
        """
        from accelerate.utils import broadcast_object_list

        failure: BaseException | None = None
        if self.accelerator.is_main_process:
            try:
                self._pull_newest_whole(RemoteStore(self.remote, self.storage_options))
            except Exception as e:  # reported on every process below
                failure = e
        # In place of wait_for_everyone(): every process learns whether the pull failed, so
        # a failure is raised on each of them instead of leaving the others waiting forever.
        said = broadcast_object_list([None if failure is None else
                                      f"{type(failure).__name__}: {failure}"])[0]
        if failure is not None:
            raise failure
        if said is not None:
            raise CkptSyncError(f"the main process could not pull the newest checkpoint from "
                                f"{redact_url(self.remote)} into {self.project_dir}: {said}")
        # The newest finished directory: the one pulled, or a newer one this machine wrote
        # and had not uploaded yet (the daemon uploads it once started).
        return self._newest_local()

    def _required(self) -> set[str]:
        """The files every process's load_state reads besides the weights: each process's
        RNG file and each registered object's file (written after the marker)."""
        objects = len(getattr(self.accelerator, "_custom_objects", []))
        return ({f"random_states_{i}.pkl" for i in range(self.accelerator.num_processes)}
                | {f"custom_checkpoint_{i}.pkl" for i in range(objects)})

    def _pull_newest_whole(self, store: RemoteStore) -> None:
        """Restore the newest remote version that holds every file load_state reads and
        verifies; an older one when the newest lacks one (the trainer was killed between the
        marker and a registered object's file) or does not verify."""
        rule = preset_rule(PRESET)
        versions = [m for m in store.list() if m.source.get("rule") == rule]
        required = self._required()
        for m in reversed(versions):
            names = {f.path.rsplit("/", 1)[-1] for f in m.files}
            missing = sorted(required - names)
            if missing:
                log.warning("skipping %s: it lacks %s (the trainer stopped while writing it)",
                            store.url_of(m.name), ", ".join(missing))
                continue
            try:
                restore_watched(store, self.project_dir, m.name, rules=[rule])
                return
            except CorruptCheckpointError as e:
                log.warning("skipping %s: %s", store.url_of(m.name), e)
        # Nothing to resume from: a fresh run (with nothing local either, load_state is a no-op).

    def _newest_local(self) -> str | None:
        rule = WatchRule.parse(preset_rule(PRESET))
        required = self._required()
        dirs = [d for d in rule.finished_dirs(self.project_dir) if _N_RE.search(d)
                and all((self.project_dir / d / f).is_file() for f in required)]
        dirs.sort(key=lambda d: int(_N_RE.search(d).group(1)))  # type: ignore[union-attr]
        return str(self.project_dir / dirs[-1]) if dirs else None

    def load_state(self, **kwargs: Any) -> str | None:
        """Resume: :meth:`pull_latest`, then ``accelerator.load_state`` on it, and continue
        Accelerate's checkpoint numbering after it (``load_state`` leaves
        ``project_configuration.iteration`` at 0, so the next save would otherwise be
        ``checkpoint_0`` again); a directory that lacks a file ``load_state`` reads (a save
        interrupted after the marker) is skipped, locally and remotely. Returns the directory
        loaded, or None (nothing to resume: the state is left as it is)."""
        path = self.pull_latest()
        if path is None:
            return None
        self.accelerator.load_state(path, **kwargs)
        # After every checkpoint_N here, the one loaded and any an interrupted save left.
        base = self.project_dir / "checkpoints"
        taken = [int(m.group(1)) for p in base.iterdir() if (m := _N_RE.search(p.name))]
        config = self.accelerator.project_configuration
        config.iteration = max([config.iteration, *(n + 1 for n in taken)])
        return path

    def __enter__(self) -> CkptSync:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
