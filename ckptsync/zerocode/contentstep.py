"""The training step a zero-code checkpoint file says it holds, read from its content.

Two formats say it: a Hugging Face ``trainer_state.json`` (``global_step``) and a
``torch.save`` archive of a top-level ``dict`` holding an int under ``step``, ``iter_num`` or
``global_step`` (nanoGPT, most hand-written loops), else ``epoch``. The pickle inside the
archive is never executed: its opcodes are walked with :func:`pickletools.genops` on a model
of the stack that records only strings, ints and the top-level dict's items. Anything
unexpected (another top-level type, an unknown opcode, a damaged pickle) means no step.

Nothing here imports torch.
"""

from __future__ import annotations

import json
import pickletools
import zipfile
from pathlib import Path
from typing import Any

__all__ = ["content_step", "torch_save_step", "trainer_state_step"]

STEP_KEYS = ("step", "iter_num", "global_step")
FALLBACK_KEYS = ("epoch",)
TRAINER_STATE = "trainer_state.json"
MAX_PICKLE = 64 << 20  # data.pkl holds tensor references, not tensor bytes: small
MAX_JSON = 64 << 20
MAX_STEP = 10**12  # a checkpoint name holds 12 digits

_MARK = object()
_INT_OPS = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"}
_STR_OPS = {"UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
_IN_PLACE = {"SETITEM", "SETITEMS", "APPEND", "APPENDS", "ADDITEMS", "BUILD"}


class _Opaque:
    """Any value the walk does not need to know."""


class _TopDict:
    def __init__(self) -> None:
        self.items: dict[str, Any] = {}


def _valid(v: Any) -> int | None:
    if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < MAX_STEP:
        return v
    return None


def _pick(items: dict[str, Any]) -> int | None:
    for keys in (STEP_KEYS, FALLBACK_KEYS):
        for k in keys:
            if k in items and (v := _valid(items[k])) is not None:
                return v
    return None


def pickle_step(data: bytes) -> int | None:
    """The step of a pickled top-level dict (see the module doc), without unpickling."""
    stack: list[Any] = []
    memo: dict[Any, Any] = {}
    top: _TopDict | None = None
    try:
        for op, arg, _ in pickletools.genops(data):
            name = op.name
            if name in ("PROTO", "FRAME"):
                continue
            if name == "STOP":
                return _pick(top.items) if top is not None and stack == [top] else None
            if name == "EMPTY_DICT" and not stack and top is None:
                top = _TopDict()
                stack.append(top)
                continue
            if name in _PUT_OPS:
                memo[arg] = stack[-1]
                continue
            if name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
                continue
            if name in _GET_OPS:
                stack.append(memo.get(arg, _Opaque()))
                continue
            if name == "MARK":
                stack.append(_MARK)
                continue
            before = op.stack_before
            popped: list[Any] = []
            if before[-2:] == [pickletools.markobject, pickletools.stackslice]:
                while stack[-1] is not _MARK:
                    popped.insert(0, stack.pop())
                stack.pop()
                fixed = len(before) - 2
            else:
                fixed = len(before)
            base = stack[-fixed:] if fixed else []
            if fixed:
                del stack[-fixed:]
            if name in _IN_PLACE and base:
                target = base[0]
                if isinstance(target, _TopDict):
                    pairs = popped if name == "SETITEMS" else base[1:]
                    if name not in ("SETITEM", "SETITEMS") or len(pairs) % 2:
                        return None  # a top-level dict is never appended to nor built
                    for k, v in zip(pairs[::2], pairs[1::2], strict=True):
                        if isinstance(k, str):
                            target.items[k] = v
                stack.append(target)
                continue
            is_int = name in _INT_OPS and isinstance(arg, int) and not isinstance(arg, bool)
            if is_int or (name in _STR_OPS and isinstance(arg, str)):
                stack.append(arg)
            else:
                stack.extend(_Opaque() for _ in op.stack_after)
    except (ValueError, IndexError, KeyError, EOFError, TypeError):
        return None
    return None


def torch_save_step(path: Path) -> int | None:
    """The step of a ``torch.save`` zip archive (its ``*/data.pkl``), or None."""
    try:
        with zipfile.ZipFile(path) as z:
            pkls = [i for i in z.infolist()
                    if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
            if len(pkls) != 1 or pkls[0].file_size > MAX_PICKLE:
                return None
            data = z.read(pkls[0])
    except (zipfile.BadZipFile, OSError, ValueError, RuntimeError, NotImplementedError):
        return None
    return pickle_step(data)


def trainer_state_step(path: Path) -> int | None:
    """``global_step`` of a Hugging Face ``trainer_state.json``, or None."""
    try:
        if path.stat().st_size > MAX_JSON:
            return None
        state = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return _valid(state.get("global_step")) if isinstance(state, dict) else None


def _is_zip(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def content_step(root: Path, rels: list[str], version_dir: str | None = None) -> int | None:
    """The step one version's files say they hold, or None.

    ``version_dir/trainer_state.json`` first (a directory rule), then the first file (in
    ``rels`` order) that says a step: a ``trainer_state.json`` or a ``torch.save`` archive.
    """
    if version_dir is not None:
        rel = f"{version_dir}/{TRAINER_STATE}"
        if rel in rels and (step := trainer_state_step(root / rel)) is not None:
            return step
    for rel in rels:
        path = root / rel
        if rel.rsplit("/", 1)[-1] == TRAINER_STATE:
            step = trainer_state_step(path)
        elif _is_zip(path):
            step = torch_save_step(path)
        else:
            continue
        if step is not None:
            return step
    return None
