"""Hugging Face ``Trainer`` integration: each ``checkpoint-N/`` synced, resumed from the remote.

Two names:

- :class:`CkptSyncCallback`, a ``transformers.TrainerCallback``: the ``checkpoint-N/``
  directories the Trainer writes in ``args.output_dir`` are uploaded in the background, one
  ckptsync checkpoint each (step ``N``), by the zero-code daemon (``ckptsync watch --preset
  hf-trainer``'s rule, started with :func:`ckptsync.start_watcher`): training never waits on the
  network, and the remote layout is the one ``ckptsync watch``/``ckptsync pull`` use.
- :func:`pull_latest_checkpoint`: before training, the newest valid remote checkpoint back
  into ``output_dir/checkpoint-N/``, so that ``trainer.train(resume_from_checkpoint=True)``
  resumes from it.

Why a checkpoint is never uploaded half-written: ``Trainer._save_checkpoint`` writes the
weights, optimizer, scheduler and RNG state, then ``trainer_state.json`` last, then rotates
(deletes the oldest ``checkpoint-*`` beyond ``save_total_limit``), then fires ``on_save``.
The ``hf-trainer`` preset takes a directory only once ``trainer_state.json`` is in it, copies
it into the daemon's spool while checking that no file changed, appeared or vanished (a
rotation deleting it during the copy discards the copy, nothing is committed, later saves are
still taken), and uploads from the spool, the manifest last.

Example::

    from ckptsync.integrations.transformers import CkptSyncCallback, pull_latest_checkpoint

    step = pull_latest_checkpoint("s3://bucket/run1", "out")      # None on a fresh start
    trainer = Trainer(model, TrainingArguments("out", save_steps=100, save_total_limit=3),
                      train_dataset=ds, callbacks=[CkptSyncCallback("s3://bucket/run1")])
    trainer.train(resume_from_checkpoint=step is not None)
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ckptsync.config import remote_from_env, resolve_close_timeout, storage_options_from_env
from ckptsync.daemon.launcher import WatcherHandle, start_watcher
from ckptsync.errors import (
    CkptSyncError,
    ConfigError,
    CorruptCheckpointError,
    NoCheckpointError,
)
from ckptsync.manifest import Manifest
from ckptsync.zerocode.presets import preset_rule
from ckptsync.zerocode.restore import restore_watched
from ckptsync.zerocode.rules import is_watched

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - the extra is installed in the dev venv
    raise ConfigError("ckptsync.integrations.transformers needs Hugging Face transformers: "
                      "pip install 'ckptsync[hf]'") from e

__all__ = ["PRESET", "CkptSyncCallback", "pull_latest_checkpoint"]

log = logging.getLogger("ckptsync.hf")

#: The zero-code preset whose rule uploads a Trainer's ``checkpoint-N/`` directories.
PRESET = "hf-trainer"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")  # transformers' own PREFIX_CHECKPOINT_DIR
_MARKER = "trainer_state.json"  # written last by Trainer._save_checkpoint


def _resolve_remote(remote: str | None,
                    storage_options: Mapping[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """``remote`` > ``CKPTSYNC_REMOTE``; ``storage_options`` > ``CKPTSYNC_STORAGE_OPTIONS``."""
    url = remote if remote is not None else remote_from_env()
    if not url or not url.strip():
        raise ConfigError("no remote: pass remote='s3://bucket/run' (any fsspec URL) or set "
                          "CKPTSYNC_REMOTE")
    opts = dict(storage_options) if storage_options is not None else storage_options_from_env()
    return url, opts


def _local_checkpoints(output_dir: Path) -> dict[int, Path]:
    """``checkpoint-N`` directories of ``output_dir`` by step (complete or not)."""
    out: dict[int, Path] = {}
    if not output_dir.is_dir():
        return out
    for entry in os.scandir(output_dir):
        m = _CHECKPOINT_RE.match(entry.name)
        if m and entry.is_dir(follow_symlinks=False):
            out[int(m.group(1))] = Path(entry.path)
    return out


def _complete(ckpt_dir: Path) -> bool:
    return (ckpt_dir / _MARKER).is_file()


class CkptSyncCallback(TrainerCallback):
    """Upload every ``checkpoint-N/`` the Trainer saves, in the background.

    Only the main process (``state.is_world_process_zero``) uploads; the others do nothing.
    At train begin it starts the ``ckptsync watch`` daemon on ``args.output_dir`` with the
    ``hf-trainer`` preset's rule (its file events wake it); each ``on_save`` checks that it
    is alive (and restarts it, loudly, if it died); at train end it waits for the uploads
    (at most ``close_timeout`` seconds) and reports loudly which checkpoint is not remote.

    Args:
        remote: fsspec URL of the run (default ``CKPTSYNC_REMOTE``). One prefix holds one run.
        storage_options: fsspec options (default ``CKPTSYNC_STORAGE_OPTIONS``).
        keep_last, keep_best, keep_every: remote retention, as ``ckptsync watch``'s flags.
            With none of them, the remote keeps ``args.save_total_limit`` checkpoints (all
            where it is unset).
        close_timeout: seconds ``on_train_end`` waits for the uploads (default
            ``CKPTSYNC_CLOSE_TIMEOUT``, else 60).
        on_error: ``"warn"`` (default): a checkpoint not remote at train end is logged at
            ERROR and warned about, training's result stands; ``"raise"``: ``on_train_end``
            raises :class:`~ckptsync.errors.CkptSyncError` (out of ``trainer.train()``).
        settle, workers: as ``ckptsync watch``'s flags.

    Raises:
        ConfigError: no remote, a bad ``on_error`` or ``close_timeout``.

    Example::

        Trainer(..., callbacks=[CkptSyncCallback("s3://bucket/run1")])
    """

    def __init__(self, remote: str | None = None, *,
                 storage_options: Mapping[str, Any] | None = None,
                 keep_last: int | None = None, keep_best: str | None = None,
                 keep_every: int | None = None, close_timeout: float | None = None,
                 on_error: str = "warn", settle: float | None = None,
                 workers: int | None = None) -> None:
        if on_error not in ("warn", "raise"):
            raise ConfigError(f"on_error={on_error!r}: use 'warn' or 'raise'")
        self.remote, self.storage_options = _resolve_remote(remote, storage_options)
        self.keep_last, self.keep_best, self.keep_every = keep_last, keep_best, keep_every
        self.close_timeout = resolve_close_timeout(close_timeout)
        self.on_error = on_error
        self.settle, self.workers = settle, workers
        self.rule = preset_rule(PRESET)
        self.watcher: WatcherHandle | None = None
        self._output_dir: Path | None = None

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        out = Path(args.output_dir).expanduser().absolute()
        if self.watcher is not None and self.watcher.running() and out == self._output_dir:
            return  # a train() that raised never reached on_train_end: its daemon goes on
        if self.watcher is not None:
            self.watcher.stop()
        self._output_dir = out
        self._start(args)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero or self.watcher is None:
            return
        if not self.watcher.running():
            # Loud, and keep going: the remote is the daemon's only record, a new one
            # uploads what the dead one did not.
            log.error("ckptsync: the upload daemon (pid %d) exited with code %s (see %s); "
                      "starting a new one", self.watcher.pid, self.watcher.proc.returncode,
                      self.watcher.log_path)
            try:
                self._start(args)
            except CkptSyncError as e:  # training goes on; the next save, train end retry
                log.error("ckptsync: cannot restart the upload daemon: %s", e)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero or self.watcher is None:
            return
        watcher, self.watcher = self.watcher, None
        problem = None
        try:
            watcher.flush(timeout=self.close_timeout)
        except (TimeoutError, CkptSyncError) as e:
            problem = str(e)
        finally:
            watcher.stop()
        missing = self._not_remote()
        if missing or problem:
            msg = (f"ckptsync: {', '.join(missing) or 'some checkpoint'} of {self._output_dir} "
                   f"{'is' if len(missing) <= 1 else 'are'} not in {self.remote}"
                   + (f" ({problem})" if problem else "")
                   + f"; see {watcher.log_path}; to upload it, run: ckptsync watch "
                   f"{self._output_dir} {self.remote} --rule '{self.rule}' --once")
            if self.on_error == "raise":
                raise CkptSyncError(msg)
            log.error("%s", msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)

    # ------------------------------------------------------------------ helpers
    def _start(self, args: Any) -> None:
        assert self._output_dir is not None
        keep_last = self.keep_last
        if keep_last is None and self.keep_best is None and self.keep_every is None:
            limit = getattr(args, "save_total_limit", None)
            keep_last = limit if limit and limit > 0 else None
        self.watcher = start_watcher(
            self._output_dir, self.remote, storage_options=self.storage_options,
            keep_last=keep_last, keep_best=self.keep_best, keep_every=self.keep_every,
            rules=[self.rule], settle=self.settle, workers=self.workers)

    def _not_remote(self) -> list[str]:
        """The newest complete local ``checkpoint-N`` if no remote checkpoint has its step."""
        assert self._output_dir is not None
        done = sorted(s for s, p in _local_checkpoints(self._output_dir).items() if _complete(p))
        if not done:
            return []
        try:
            steps = {m.step for m in _versions(self.remote, self.storage_options, self.rule)}
        except CkptSyncError as e:
            return [f"checkpoint-{done[-1]} (cannot list the remote: {e})"]
        return [] if done[-1] in steps else [f"checkpoint-{done[-1]}"]


def _versions(remote: str, storage_options: Mapping[str, Any], rule: str) -> list[Manifest]:
    """The remote's committed versions of ``rule``, oldest first."""
    from ckptsync.remote import RemoteStore

    store = RemoteStore(remote, storage_options=dict(storage_options))
    return [m for m in store.list() if is_watched(m) and m.source.get("rule") == rule]


def pull_latest_checkpoint(
    remote: str | None,
    output_dir: str | os.PathLike[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> int | None:
    """Pull the newest valid remote checkpoint into ``output_dir/checkpoint-N/``.

    Call it before ``trainer.train(resume_from_checkpoint=True)`` (on the main process of
    each machine that has its own ``output_dir``). A remote checkpoint that fails to verify
    is skipped for the next older one. Nothing is pulled when a complete local
    ``checkpoint-N`` (one holding ``trainer_state.json``) is as new or newer: a local
    checkpoint is never overwritten by an older one. A local ``checkpoint-N`` newer than what
    resumes, but without ``trainer_state.json`` (the save was killed), is renamed aside to
    ``incomplete-checkpoint-N`` with a warning, since the Trainer would try to resume from it.
    Writes only inside ``output_dir``, never through a symlink.

    Args:
        remote: fsspec URL (``None``: ``CKPTSYNC_REMOTE``).
        output_dir: the Trainer's ``args.output_dir`` (created if missing).
        storage_options: fsspec options (default ``CKPTSYNC_STORAGE_OPTIONS``).

    Returns:
        The step training will resume from (pulled or local), or None on a fresh start (an
        empty remote and no complete local checkpoint).

    Raises:
        ConfigError: no remote.
        RemoteError: the remote cannot be read.
        LocalStorageError: ``output_dir`` cannot be written, or a path in it is a symlink.

    Example::

        step = pull_latest_checkpoint("s3://bucket/run1", "out")
        trainer.train(resume_from_checkpoint=step is not None)
    """
    from ckptsync.remote import RemoteStore

    url, opts = _resolve_remote(remote, storage_options)
    out = Path(output_dir).expanduser().absolute()
    local = _local_checkpoints(out)
    local_step = max((s for s, p in local.items() if _complete(p)), default=None)
    store = RemoteStore(url, storage_options=opts)
    rule = preset_rule(PRESET)
    resumed = local_step
    candidates = [m for m in store.list() if is_watched(m) and m.source.get("rule") == rule
                  and m.step is not None and (local_step is None or m.step > local_step)]
    for m in reversed(candidates):
        try:
            restore_watched(store, out, m.name, rules=[rule])
        except (CorruptCheckpointError, NoCheckpointError) as e:  # damaged, or just deleted
            log.warning("ckptsync: remote checkpoint %s is not usable, trying an older one: %s",
                        m.name, e)
            continue
        resumed = m.step
        log.info("ckptsync: pulled %s into %s/checkpoint-%d", store.url_of(m.name), out,
                 m.step)
        break
    else:
        if local_step is not None:
            log.info("ckptsync: %s/checkpoint-%d is the newest checkpoint; nothing pulled",
                     out, local_step)
    for step, path in sorted(local.items()):
        if (resumed is None or step > resumed) and not _complete(path):
            _set_aside(path)
    return resumed


def _set_aside(path: Path) -> None:
    """Rename a half-saved ``checkpoint-N`` out of the Trainer's sight (never deleted)."""
    dest = path.with_name(f"incomplete-{path.name}")
    i = 1
    while dest.exists():
        dest = path.with_name(f"incomplete-{path.name}.{i}")
        i += 1
    path.rename(dest)
    msg = (f"ckptsync: {path} has no {_MARKER} (its save was interrupted); renamed it to "
           f"{dest.name} so that the Trainer resumes from a complete checkpoint; delete it "
           "when you no longer need it")
    log.warning("%s", msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
