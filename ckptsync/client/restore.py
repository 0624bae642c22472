"""Restore: choosing the checkpoint a run resumes from, verifying it and loading it.

:class:`Restorer` walks every committed checkpoint copy, local and remote, newest first,
skipping one that is unusable, lacks an object asked for, fails verification or that
``torch.load(weights_only=True)`` refuses; :func:`read_states` loads a chosen one's files
without touching the caller's objects, and :func:`load_states` then loads them into those
objects (and the RNG). :meth:`Checkpointer.restore <ckptsync.client.Checkpointer.restore>`
drives them and, under ``torch.distributed``, shares rank 0's choice with every rank.
"""

from __future__ import annotations

import heapq
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from ckptsync.client import ranks
from ckptsync.client.state import RNG_FILE, load_into, restore_rng
from ckptsync.crypto import KeyRing, SealedReader, missing_key
from ckptsync.errors import (
    ConfigError,
    CorruptCheckpointError,
    NoCheckpointError,
    UnknownKeyError,
    UnsupportedFormatError,
)
from ckptsync.integrity import check_checkpoint
from ckptsync.local import RESUMED_FILE, LocalCheckpoint, LocalStore, write_json_atomic
from ckptsync.manifest import FileEntry, Manifest, parse_name, unusable_reason
from ckptsync.output import human_size, notice
from ckptsync.remote.encrypted import check_keys

if TYPE_CHECKING:
    from ckptsync.remote import RemoteStore

__all__ = ["Candidate", "Found", "RestoreInfo", "Restorer", "load_states", "read_states",
           "restore_replicated", "say_fell_back"]

log = logging.getLogger("ckptsync")

Skipped = list[tuple[str, str]]  # (name, why) of checkpoint copies restore passed over


class Found(NamedTuple):
    """The checkpoint to load, its loaded states, what was passed over on the way, and the
    remote it was pulled from (redacted; None: it was local)."""

    ckpt: LocalCheckpoint
    states: dict[str, Any]
    skipped: Skipped
    pulled_from: str | None = None


@dataclass(frozen=True, repr=False)
class RestoreInfo:
    """What :meth:`Checkpointer.restore` loaded. Its ``repr`` is one short line (name, step,
    where from, whether restore fell back), never the tensors: those are in :attr:`state`.
    """

    name: str
    step: int | None
    path: Path
    manifest: Manifest
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    """Every object's loaded state, including names that were not passed to restore."""
    skipped: tuple[tuple[str, str], ...] = ()
    """``(name, why)`` of each committed checkpoint copy, local or remote, newer than (or a
    copy of) the one loaded that restore passed over, newest first."""
    pulled_from: str | None = None
    """The remote (URL, credentials redacted) the checkpoint was pulled from; None when it
    was restored from the local directory."""

    @property
    def fell_back(self) -> bool:
        """True when restore loaded an older checkpoint than the newest committed one."""
        return any(n != self.name for n, _ in self.skipped)

    def summary(self) -> str:
        """One line for people: ``resumed from step 150 (NAME), pulled from URL, 36.6 KiB,
        verified`` (every file's digest was checked before anything was loaded)."""
        at = f"step {self.step} ({self.name})" if self.step is not None else self.name
        where = (f"pulled from {self.pulled_from}" if self.pulled_from is not None
                 else f"local copy in {self.path.parent}")
        line = f"resumed from {at}, {where}, {human_size(self.manifest.total_size)}, verified"
        newer = len({n for n, _ in self.skipped if n != self.name})
        if newer:
            line += f"; fell back past {newer} newer unusable checkpoint(s)"
        return line

    def __repr__(self) -> str:
        source = "local" if self.pulled_from is None else f"remote {self.pulled_from}"
        return (f"RestoreInfo(name={self.name!r}, step={self.step}, from={source!r}, "
                f"fell_back={self.fell_back})")


class Restorer:
    """Finds the checkpoint to restore in ``store`` and (when given) ``remote``: rank 0's
    half of :meth:`Checkpointer.restore`."""

    def __init__(self, store: LocalStore, remote: RemoteStore | None,
                 keys: KeyRing | None = None, keep_encrypted: bool = False,
                 allow_plaintext: bool = False) -> None:
        self.store = store
        self.remote = remote
        self.keys = keys  # what decrypts local files written with encrypt_local=True
        self.keep_encrypted = keep_encrypted  # pull encrypted checkpoints as they are stored
        self.allow_plaintext = allow_plaintext

    def _check_local(self, ckpt: LocalCheckpoint) -> None:
        """An ``encrypt_local`` directory holds only encrypted, keyed checkpoints: one that is
        not (a plaintext one planted or downgraded) is invalid, as it is remotely."""
        if self.keep_encrypted and self.keys is not None:
            check_checkpoint(ckpt.manifest, self.keys, vouched=None,
                             allow_plaintext=self.allow_plaintext, where=str(ckpt.path))

    def choose(self, name: str | None, map_location: Any, objects: Mapping[str, Any]
               ) -> Found | None:
        """The checkpoint to load (``name``, else the newest usable one), its states, and
        what was passed over on the way; None when there is no checkpoint.

        Raises:
            NoCheckpointError: ``name`` was given and does not exist.
            CorruptCheckpointError: every checkpoint present is unusable, or ``name`` is.
            ConfigError: an object is in no checkpoint (or, with ``name``, not in that one).
        """
        if name is not None:
            ckpt, pulled_from = self._named(name)
            self._check_local(ckpt)
            self.store.verify(ckpt)
            return Found(ckpt, read_states(ckpt, map_location, objects, self.keys), [],
                         pulled_from)
        skipped: Skipped = []
        lacking: list[str] = []  # why, for each candidate without an object passed here
        unknown_key: UnknownKeyError | None = None
        for cand in self.candidates():
            where = "local" if cand.local is not None else "remote"
            if isinstance(cand.error, UnsupportedFormatError):
                raise cand.error  # never passed over for an older checkpoint
            if cand.problem is not None:
                why = f"{where} copy: {cand.problem}"
            elif (missing := _missing(cand.manifest, objects)) is not None:
                why = f"{where} copy has no state for {missing}; it holds {_held(cand.manifest)}"
                lacking.append(why)
            else:
                try:
                    pulled_from = None
                    if cand.local is not None:
                        ckpt = cand.local
                        self._check_local(ckpt)
                        self.store.verify(ckpt)
                    else:
                        assert self.remote is not None
                        # Every byte's digest is verified while it is downloaded and fsynced:
                        # hashing it again would only double the resume time.
                        ckpt = self.remote.pull(cand.name, self.store,
                                                keep_encrypted=self.keep_encrypted)
                        pulled_from = self.remote.url_of()
                    return Found(ckpt, read_states(ckpt, map_location, objects, self.keys),
                                 skipped, pulled_from)
                except CorruptCheckpointError as e:
                    why = str(e)
                    if isinstance(e, UnknownKeyError) and unknown_key is None:
                        unknown_key = e
            log.warning("checkpoint %s cannot be restored, trying an older one: %s",
                        cand.name, why)
            skipped.append((cand.name, why))
        where = f"{self.store.directory}{' or ' + self.remote.url_of() if self.remote else ''}"
        if unknown_key is not None:  # nothing could be restored: the key is what is missing
            raise missing_key(unknown_key.key_id, unknown_key.name, where, self.keys)
        if skipped and len(lacking) == len(skipped):
            # Every checkpoint is fine but none has an object by that name: a usage error.
            raise ConfigError(
                f"no checkpoint in {where} has state for every object passed to restore: the "
                f"newest, {skipped[0][0]}: {lacking[0]}. Pass objects under the names they were "
                "saved with"
            )
        if skipped:
            raise CorruptCheckpointError(
                f"no checkpoint in {where} can be restored "
                f"({'; '.join(f'{n}: {w}' for n, w in skipped)}); nothing was loaded. Restore "
                "a backup, or move the directory away to start fresh"
            )
        return None

    def candidates(self) -> Iterator[Candidate]:
        """Every committed checkpoint copy, local and remote, newest first (lazily remote)."""
        bad: Skipped = []
        local = [Candidate(_order_key(c.name, c.manifest), c.name, c.manifest, c,
                            unusable_reason(c.manifest))
                 for c in self.store.list(bad)]
        local += [Candidate(_order_key(n, None), n, None, None, why, self._unsupported(n))
                  for n, why in bad]
        local.sort(key=lambda c: c.key, reverse=True)
        if self.remote is None:
            return iter(local)
        remote = (Candidate(_order_key(e.name, e.manifest), e.name, e.manifest, None,
                             None if e.status == "valid" else (e.problem or e.status))
                  for e in self.remote.iter_committed())
        # Copies of one checkpoint have equal keys, and the merge is stable: the local copy
        # comes first (no download).
        return heapq.merge(local, remote, key=lambda c: c.key, reverse=True)

    def _unsupported(self, name: str) -> UnsupportedFormatError | None:
        """The error of local checkpoint ``name`` if it needs a format feature this version
        does not read (raised when restore reaches it, never passed over)."""
        try:
            self.store.read_manifest(name)
        except UnsupportedFormatError as e:
            return e
        except (CorruptCheckpointError, NoCheckpointError):
            return None
        return None

    def _named(self, name: str) -> tuple[LocalCheckpoint, str | None]:
        """Checkpoint ``name``, local or else pulled; and the remote it was pulled from."""
        try:
            return self.store.get(name), None
        except NoCheckpointError:
            if self.remote is None:
                raise
        return (self.remote.pull(name, self.store, keep_encrypted=self.keep_encrypted),
                self.remote.url_of())


def read_states(ckpt: LocalCheckpoint, map_location: Any, objects: Mapping[str, Any],
                keys: KeyRing | None = None) -> dict[str, Any]:
    """Every ``.pt`` file of ``ckpt``, loaded (weights only); nothing is loaded into
    ``objects`` yet, so a file that fails leaves them untouched. A file stored encrypted
    (``encrypt_local=True``) is decrypted by ``keys`` while it is read.

    Raises:
        ConfigError: an object of ``objects`` has no file in ``ckpt``.
        EncryptionKeyError: a file is encrypted under a key id none of ``keys`` has (checked
            before anything is loaded; never a reason to fall back).
        CorruptCheckpointError: a file cannot be loaded safely (or fails authentication).
    """
    missing = _missing(ckpt.manifest, objects)
    if missing is not None:
        raise ConfigError(
            f"checkpoint {ckpt.path} has no state for {missing}; it holds "
            f"{_held(ckpt.manifest)}. Pass objects under the names they were saved with"
        )
    check_keys(ckpt.manifest, keys, str(ckpt.path))
    states: dict[str, Any] = {}
    for entry in ckpt.manifest.files:
        if not entry.path.endswith(".pt"):
            continue
        path = ckpt.file(entry.path)
        try:
            key = entry.path[:-3]
            if entry.encryption is not None and keys is not None:
                states[key] = load_sealed(path, entry, ckpt.name, keys, map_location)
            else:
                states[key] = _torch_load(path, map_location,
                                          isinstance(objects.get(key), torch.nn.Module))
        except CorruptCheckpointError:
            raise
        except Exception as e:
            raise CorruptCheckpointError(
                f"{path}: cannot be loaded safely ({e}); it was not written by ckptsync "
                "or holds objects that need unsafe pickling", path=str(path)
            ) from e
    return states


def load_states(ckpt: LocalCheckpoint, states: dict[str, Any], objects: Mapping[str, Any],
                skipped: Skipped, *, rank: int, rng: bool,
                pulled_from: str | None = None) -> RestoreInfo:
    """Load ``states`` (from :func:`read_states`) into ``objects`` and, with ``rng``, this
    ``rank``'s RNG state; what was loaded (``pulled_from``: the remote it came from)."""
    for obj_name, obj in objects.items():
        load_into(obj_name, obj, states[obj_name])
    rng_states = states.pop(RNG_FILE[:-3], None)
    if rng and rng_states is not None:
        ranks = rng_states.get("ranks", [])
        if rank < len(ranks) and ranks[rank] is not None:
            restore_rng(ranks[rank])
        else:
            log.warning("checkpoint %s has no RNG state for rank %d (saved with world size "
                        "%s): RNG not restored", ckpt.name, rank, rng_states.get("world_size"))
    return RestoreInfo(ckpt.name, ckpt.step, ckpt.path, ckpt.manifest,
                       dict(ckpt.manifest.metrics), dict(ckpt.manifest.extra), states,
                       tuple(skipped), pulled_from)


def say_fell_back(info: RestoreInfo) -> None:
    # Printed as well as logged: resuming from an older checkpoint silently throws away
    # training, and a log line goes wherever (or nowhere) the application sends logs.
    # Not warnings.warn: shown once per call site, and `-W error` would turn a restore
    # that worked into a crash.
    why = "; ".join(f"{n}: {r.splitlines()[0] if r else '?'}" for n, r in info.skipped)
    msg = (f"restored {info.name} (step {info.step}), not the newest committed checkpoint "
           f"{info.skipped[0][0]}: {why}")
    log.warning("%s", msg)
    notice(f"ckptsync: WARNING: {msg}")

def restore_replicated(store: LocalStore, remote: RemoteStore | None, rank: int,
                       world_size: int, name: str | None, map_location: Any,
                       objects: Mapping[str, Any], *, rng: bool, keys: KeyRing | None = None,
                       keep_encrypted: bool = False,
                       allow_plaintext: bool = False) -> RestoreInfo | None:
    """:meth:`Checkpointer.restore` of replicated (not sharded) state: rank 0 chooses, every
    rank reads and loads; collective under ``torch.distributed``."""
    found: Found | None = None
    err: Exception | None = None
    if rank == 0:
        try:
            found = Restorer(store, remote, keys, keep_encrypted,
                             allow_plaintext).choose(name, map_location, objects)
        except Exception as e:
            if world_size == 1:
                raise
            err = e
    if world_size > 1:
        # Rank 0's choice, or its error, on every rank; then every rank reads it, and
        # nothing is loaded anywhere unless every rank could read it.
        chosen = ranks.share_from_rank0(
            rank, err, (found.ckpt.name, found.skipped, found.pulled_from) if found else None,
            "restore")
        if rank != 0 and chosen is not None:
            try:
                ckpt = store.get(chosen[0])
                found = Found(ckpt, read_states(ckpt, map_location, objects, keys), chosen[1],
                              chosen[2])
            except Exception as e:
                err = e
        ranks.agree(rank, world_size, err, None, "restore")
    if found is None:
        log.info("no checkpoint in %s: starting fresh", store.directory)
        return None
    info = load_states(found.ckpt, found.states, objects, found.skipped, rank=rank, rng=rng,
                       pulled_from=found.pulled_from)
    if rank == 0:
        write_json_atomic(store.directory / RESUMED_FILE,
                          {"name": info.name, "pid": os.getpid()}, store.ops)
        if info.fell_back:
            say_fell_back(info)
    log.info("%s", info.summary())
    return info


@dataclass(frozen=True)
class Candidate:
    """One committed copy of a checkpoint that restore may try: local (``local`` set) or
    remote; ``problem`` says why it cannot be used without reading a byte of it."""

    key: tuple[int, int, str, str]
    name: str
    manifest: Manifest | None
    local: LocalCheckpoint | None
    problem: str | None
    error: CorruptCheckpointError | None = None


def _order_key(name: str, manifest: Manifest | None) -> tuple[int, int, str, str]:
    """Newest-last order of restore's candidates: :meth:`Manifest.sort_key`, from the name
    where it is one of ours (its stamp is the creation time), so that copies of one
    checkpoint, even one whose manifest cannot be read, sort together. A step-less one that
    carries a remote ``seq`` orders by it (as the remote listing does), not by its stamp."""
    parsed = parse_name(name)
    if parsed is None or (manifest is not None and manifest.step is None
                          and manifest.seq is not None):
        return manifest.sort_key() if manifest is not None else (-1, -1, "", name)
    step, stamp = parsed
    created = datetime.strptime(stamp, "%Y%m%dT%H%M%S%fZ").replace(tzinfo=timezone.utc)
    return (0 if step is None else 1, -1 if step is None else step, created.isoformat(), name)


def _missing(manifest: Manifest | None, objects: Mapping[str, Any]) -> list[str] | None:
    """The objects ``manifest`` lists no file for, or None when it has them all."""
    listed = {e.path for e in manifest.files} if manifest is not None else set()
    missing = [k for k in objects if f"{k}.pt" not in listed]
    return missing or None


def _held(m: Manifest | None) -> list[str]:
    if m is None:
        return []
    return sorted(e.path[:-3] for e in m.files if e.path.endswith(".pt") and e.path != RNG_FILE)


def load_sealed(path: Path, entry: FileEntry, name: str, keys: KeyRing,
                map_location: Any) -> Any:
    """``torch.load(weights_only=True)`` of a file stored encrypted, through a
    :class:`~ckptsync.crypto.SealedReader`: decrypted a chunk at a time as torch reads it.

    Raises:
        CorruptCheckpointError: a chunk fails authentication (altered, moved, cut short).
    """
    enc = entry.encryption
    assert enc is not None
    key = keys.get(enc.key_id)
    assert key is not None  # check_keys ran first
    with SealedReader(path, key, kid=enc.key_id, name=name, relpath=entry.path,
                      where=str(path)) as reader:
        try:
            return torch.load(reader,  # type: ignore[arg-type]
                              map_location=map_location, weights_only=True)
        except Exception:
            if reader.error is not None:  # torch wraps what a read raised: say what it was
                raise reader.error from None
            raise


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
