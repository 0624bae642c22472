"""Capturing and restoring training state: state dicts, safety checks, snapshot buffers, RNG.

Everything a checkpoint stores must load with ``torch.load(weights_only=True)``: tensors,
numbers, strings, None, and dicts/lists/tuples of them (plus ``torch.Size``, ``torch.dtype``,
``torch.device``). :func:`check_safe` refuses anything else at save time, naming the key, so a
checkpoint that cannot be resumed is never written.

:class:`SnapshotBuffers` copies tensors into CPU buffers that are reused from one save to the
next (same shapes, same dtypes: no new allocation after the first save).
"""

from __future__ import annotations

import argparse
import inspect
import pickle
import random
import sys
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ckptsync.errors import UnsafeStateError

__all__ = [
    "RNG_FILE",
    "SnapshotBuffers",
    "capture_rng",
    "check_safe",
    "load_into",
    "restore_rng",
    "serialize",
    "state_of",
    "to_jsonable",
    "unwrap",
]

_SAFE_LEAVES = (int, float, bool, str, complex, type(None), torch.Size, torch.dtype, torch.device)


def unwrap(obj: Any) -> Any:
    """Strip DDP / DataParallel / FSDP-free wrappers and ``torch.compile``'s OptimizedModule."""
    for _ in range(8):
        if isinstance(obj, torch.nn.parallel.DistributedDataParallel | torch.nn.DataParallel):
            obj = obj.module
        elif hasattr(obj, "_orig_mod") and isinstance(obj, torch.nn.Module):
            obj = obj._orig_mod
        else:
            return obj
    return obj


def state_of(name: str, obj: Any) -> Any:
    """The state tree to save for ``obj``: its ``state_dict()``, or a plain mapping itself."""
    obj = unwrap(obj)
    if hasattr(obj, "state_dict") and callable(obj.state_dict):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        return obj
    raise UnsafeStateError(
        f"cannot checkpoint {name!r}: a {type(obj).__name__} has no state_dict(); pass an object "
        "with state_dict()/load_state_dict() or a dict of tensors and plain values"
    )


def is_sharded(objects: Mapping[str, Any]) -> bool:
    """True when a module or optimizer in ``objects`` holds a DTensor (FSDP2, tensor
    parallel): such state is saved through :mod:`ckptsync.client.sharded`."""
    # Whoever holds a DTensor imported its module; nobody else pays for importing it.
    tensor_mod = sys.modules.get("torch.distributed.tensor")
    if tensor_mod is None:
        return False
    for obj in objects.values():
        target = unwrap(obj)
        if isinstance(target, torch.nn.Module):
            params = list(target.parameters())
        elif isinstance(target, torch.optim.Optimizer):
            params = [p for g in target.param_groups for p in g["params"]]
        else:
            continue
        if any(isinstance(p, tensor_mod.DTensor) for p in params):
            return True
    return False


def check_safe(tree: Any, path: str) -> None:
    """Raise :class:`UnsafeStateError` naming the first value that would need unsafe pickling."""
    if isinstance(tree, (torch.Tensor, *_SAFE_LEAVES)):
        return
    if isinstance(tree, dict):  # includes OrderedDict
        for k, v in tree.items():
            if not isinstance(k, str | int | float | bool | type(None) | tuple):
                raise UnsafeStateError(
                    f"{path}: key {k!r} of type {type(k).__name__} cannot be stored safely; "
                    "use str or int keys"
                )
            check_safe(v, f"{path}[{k!r}]")
        return
    if isinstance(tree, list | tuple):
        for i, v in enumerate(tree):
            check_safe(v, f"{path}[{i}]")
        return
    hint = (
        "convert it to a tensor" if isinstance(tree, np.ndarray | np.generic)
        else "store plain values (tensors, numbers, strings, lists, dicts) instead"
    )
    raise UnsafeStateError(
        f"{path}: a {type(tree).__name__} cannot be saved without unsafe pickling, and "
        f"could not be loaded with weights_only=True; {hint}"
    )


def to_jsonable(extra: Any, what: str = "extra") -> dict[str, Any]:
    """Normalize ``extra`` (a dict or ``argparse.Namespace``) to a JSON object, or refuse it."""
    import json

    if isinstance(extra, argparse.Namespace):
        extra = vars(extra)
    if not isinstance(extra, Mapping):
        raise UnsafeStateError(f"{what} must be a dict or argparse.Namespace, got {type(extra)}")
    try:
        out: dict[str, Any] = json.loads(json.dumps(dict(extra), allow_nan=True))
        return out
    except TypeError as e:
        raise UnsafeStateError(
            f"{what} must hold only JSON values (str, numbers, bool, None, lists, dicts): {e}"
        ) from e


class SnapshotBuffers:
    """Reusable CPU buffers, keyed by (object name, path in its state tree).

    :meth:`snapshot` returns a copy of a state tree whose tensors live in these buffers. A buffer
    is reused when the next save has a tensor of the same shape and dtype at the same place, so
    steady-state saves allocate nothing. Callers must not snapshot again while a previous
    snapshot is still being serialized (the checkpointer's back-pressure guarantees it).
    """

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, ...], torch.Tensor] = {}
        self.allocated_bytes = 0
        self.synchronized: set[torch.device] = set()
        """The CUDA devices the last :meth:`snapshot` copied from, and synchronized."""

    def snapshot(self, name: str, tree: Any) -> Any:
        seen: dict[tuple[int, int, tuple[int, ...], tuple[int, ...], torch.dtype], torch.Tensor]
        seen = {}
        devices: set[torch.device] = set()
        out = self._copy(tree, (name,), seen, devices)
        # Every device a non-blocking copy came from, not just the current one: a copy from
        # another device still running when the background thread serializes the buffer
        # would write (and hash) a mix of old and new bytes.
        for device in sorted(devices, key=str):
            torch.cuda.synchronize(device)
        self.synchronized = devices
        return out

    def _buffer(self, key: tuple[str, ...], t: torch.Tensor) -> torch.Tensor:
        buf = self._bufs.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            pin = t.device.type == "cuda"
            buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
            self._bufs[key] = buf
            self.allocated_bytes += buf.numel() * buf.element_size()
        return buf

    def _copy(self, tree: Any, key: tuple[str, ...], seen: dict[Any, torch.Tensor],
              devices: set[torch.device]) -> Any:
        if isinstance(tree, torch.Tensor):
            t = tree.detach()
            if t.is_sparse or t.layout != torch.strided:
                return t.to("cpu", copy=True)
            # Tensors sharing storage (tied weights) share one buffer, as torch.save would.
            alias = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                     tuple(t.stride()), t.dtype)
            if alias in seen and t.numel() > 0:
                return seen[alias]
            buf = self._buffer(key, t)
            non_blocking = t.device.type == "cuda"
            buf.copy_(t, non_blocking=non_blocking)
            if non_blocking:
                devices.add(t.device)
            seen[alias] = buf
            return buf
        if isinstance(tree, OrderedDict):
            return OrderedDict((k, self._copy(v, (*key, str(k)), seen, devices))
                               for k, v in tree.items())
        if isinstance(tree, dict):
            return {k: self._copy(v, (*key, str(k)), seen, devices) for k, v in tree.items()}
        if isinstance(tree, list):
            return [self._copy(v, (*key, str(i)), seen, devices) for i, v in enumerate(tree)]
        if isinstance(tree, tuple):
            return tuple(self._copy(v, (*key, str(i)), seen, devices)
                         for i, v in enumerate(tree))
        return tree  # immutable leaf (checked by check_safe)


_SAVE_PARAMS = ["obj", "zip_file", "pickle_module", "pickle_protocol", "_disable_byteorder_record"]


def serialize(tree: Any, f: Any) -> None:
    """``torch.save(tree, f)``, without the CRC32 of each zip record.

    The manifest holds every file's digest, checked before every restore and while every pull
    downloads; ``torch.load`` never reads the CRC32 (a flipped byte loads silently). Computing it
    costs ~0.3 CPU-s per GB on the thread that competes with training, and protects nothing.
    torch's switch for it (``torch.serialization.set_crc32_options``) is process-wide: flipped
    from this background thread, it would also strip the CRC from the user's own concurrent
    ``torch.save`` calls. The writer is therefore built here with the calls ``torch.save``
    makes for a file object; where this torch lacks them, ``torch.save`` it is (nothing has been
    written by then). The file is ``torch.save``'s format; zip tools report CRC errors on it.
    """
    try:
        from torch.serialization import DEFAULT_PROTOCOL, _get_storage_alignment, _save

        if list(inspect.signature(_save).parameters) != _SAVE_PARAMS:
            raise TypeError("torch.serialization._save changed")
        writer = torch._C.PyTorchFileWriter(f, False, _get_storage_alignment())
    except (ImportError, AttributeError, TypeError):
        torch.save(tree, f)
        return
    _save(tree, writer, pickle, DEFAULT_PROTOCOL, False)
    writer.write_end_of_file()
    f.flush()


RNG_FILE = "rng.pt"
"""The file of a checkpoint holding every rank's RNG state (see :func:`capture_rng`)."""


def capture_rng() -> dict[str, Any]:
    """RNG states of python, numpy, torch CPU and every CUDA device, as weights-only data."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    assert isinstance(np_state, tuple)
    state: dict[str, Any] = {
        "python": (py_version, list(py_state), py_gauss),
        "numpy": {
            "kind": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64).copy()),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng`. CUDA states are restored for the devices present."""
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
         n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"].to("cpu"))
    if "cuda" in state and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.to("cpu"), i)


def load_into(name: str, obj: Any, state: Any) -> None:
    """Load ``state`` into ``obj`` in place (``load_state_dict``, or a dict's contents)."""
    target = unwrap(obj)
    if hasattr(target, "load_state_dict") and callable(target.load_state_dict):
        target.load_state_dict(state)
    elif isinstance(target, dict):
        target.clear()
        target.update(state)
    else:
        raise UnsafeStateError(
            f"cannot restore {name!r}: a {type(obj).__name__} has no load_state_dict(); "
            "pass the object that was saved under this name"
        )
