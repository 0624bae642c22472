"""What ckptsync owns, and the guards that keep every write and delete inside it.

ckptsync deletes (retention, ``gc``, aborted multipart uploads, local clean-up) only what it
wrote itself (DESIGN.md, "Deletion"):

- entries whose names parse as checkpoint names (:func:`ckptsync.manifest.parse_name`) or,
  locally, as staging names of such a name (``.staging-<name>``, ``.deleting-<name>``);
- under a remote root that carries ckptsync's marker (:data:`ROOT_MARKER`, written at the
  first push) or, for roots written before the marker existed, at least one committed
  ckptsync checkpoint. A root with neither is not ckptsync's: ``gc`` says so and deletes
  nothing.

The URL guards here refuse, before anything is touched, an empty remote URL (an unset shell
variable must never mean "the current directory") and a remote that is, or lies inside, a
local checkpoint directory (its retention would delete the trainer's checkpoints).

Example::

    url = check_remote_url(os.environ.get("REMOTE", ""), "REMOTE")   # ConfigError if empty
    check_remote_outside(url, Path("checkpoints"))
"""

from __future__ import annotations

import os
from pathlib import Path

from ckptsync.errors import ConfigError
from ckptsync.local import WATCH_DIR, WRITER_LOCK
from ckptsync.redact import redact_url

__all__ = [
    "LOCAL_DIR_MARKERS",
    "ROOT_MARKER",
    "check_not_local_checkpoint_dir",
    "check_remote_outside",
    "check_remote_url",
    "local_path_of",
]

#: Written under a remote root at its first push: ``{"format", "created", "writer"}``.
ROOT_MARKER = "ckptsync-root.json"
#: Files a local checkpoint directory holds (the trainer's writer lock, the daemon's folder).
LOCAL_DIR_MARKERS = (WRITER_LOCK, WATCH_DIR)
_LOCAL_SCHEMES = ("file", "local")


def split_protocol(url: str) -> tuple[str | None, str]:
    """``("s3", "bucket/run")`` for ``s3://bucket/run``; ``(None, url)`` for a plain path.

    (fsspec has the same function; this one keeps ``import ckptsync`` free of fsspec.)
    """
    scheme, sep, path = url.partition("://")
    return (scheme, path) if sep and scheme else (None, url)


def check_remote_url(url: str | None, what: str = "the remote URL") -> str:
    """``url`` unchanged, or :class:`ConfigError` if it is missing, blank or has no path.

    ``what`` names the argument in the message (``REMOTE``, ``remote=``, ...).
    """
    if url is None or not str(url).strip():
        raise ConfigError(
            f"{what} is empty (an unset shell variable?); give an fsspec URL such as "
            "s3://bucket/run, gs://bucket/run or file:///mnt/backup/run. An empty URL never "
            "means the current directory"
        )
    url = str(url)
    scheme, path = split_protocol(url)
    if scheme is not None and not path.strip("/ "):
        example = "file:///mnt/backup/run" if scheme in _LOCAL_SCHEMES else f"{scheme}://bucket/run"
        raise ConfigError(
            f"{what} {redact_url(url)!r} names no bucket or path; give e.g. {example}")
    return url


def local_path_of(url: str) -> Path | None:
    """The local directory a ``file://`` or plain-path URL names (absolute), else None."""
    scheme, path = split_protocol(url)
    if scheme is not None and scheme not in _LOCAL_SCHEMES:
        return None
    return Path(os.path.abspath(os.path.expanduser(path)))


def _resolved(p: Path) -> Path:
    return p.resolve(strict=False)


def check_remote_outside(url: str, local_dir: str | os.PathLike[str],
                         what: str = "the remote URL") -> None:
    """Refuse a remote that is ``local_dir`` or lies inside it (``push``, ``watch``, the client).

    Raises:
        ConfigError: naming both paths.
    """
    path = local_path_of(url)
    if path is None:
        return
    local = _resolved(Path(local_dir).expanduser().absolute())
    remote = _resolved(path)
    if remote == local or local in remote.parents:
        raise ConfigError(
            f"{what} {redact_url(url)!r} is inside the local checkpoint directory {local}: its "
            "retention and gc would delete the trainer's checkpoints. Choose a remote outside it"
        )


def check_not_local_checkpoint_dir(url: str, what: str = "the remote URL") -> None:
    """Refuse a remote that is, or lies inside, a local checkpoint directory (``gc``).

    A local checkpoint directory is one holding a trainer's writer lock or the daemon's
    folder (:data:`LOCAL_DIR_MARKERS`).

    Raises:
        ConfigError: naming the local checkpoint directory.
    """
    path = local_path_of(url)
    if path is None:
        return
    path = _resolved(path)
    for d in (path, *path.parents):
        if any((d / m).exists() for m in LOCAL_DIR_MARKERS):
            raise ConfigError(
                f"{what} {redact_url(url)!r} is {'' if d == path else 'inside '}the local "
                f"checkpoint directory {d}; gc works on a remote. Local checkpoints follow the "
                "trainer's own retention (Checkpointer(keep_last=...)) or the daemon's"
            )
