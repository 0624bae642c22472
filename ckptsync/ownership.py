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

A local directory records which run it belongs to in :data:`RUN_FILE` (:class:`RunFile`): the
run id of the root marker (:mod:`ckptsync.remote.marker`) it first pushed to, or restored or
pulled from. A writer of that directory (a ``Checkpointer``, ``ckptsync watch``, ``ckptsync
push``) is that run; another run's writer on the same remote root is refused.

Example::

    url = check_remote_url(os.environ.get("REMOTE", ""), "REMOTE")   # ConfigError if empty
    check_remote_outside(url, Path("checkpoints"))
    RunFile(Path("checkpoints")).read()                              # this directory's run
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ckptsync.errors import ConfigError
from ckptsync.local import PRIVATE_PREFIX, WATCH_DIR, WRITER_LOCK, storage_error, write_json_atomic
from ckptsync.redact import redact_url

__all__ = [
    "LOCAL_DIR_MARKERS",
    "ROOT_MARKER",
    "RUN_FILE",
    "RunFile",
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
#: In a local checkpoint directory: ``{"run": <run id>}``, the run it belongs to.
RUN_FILE = f"{PRIVATE_PREFIX}run.json"

log = logging.getLogger("ckptsync")


class RunFile:
    """Which run a local directory belongs to (:data:`RUN_FILE` in it; see the module
    docstring). Read afresh on every call: a restore in the trainer may record it while a
    daemon watching the same directory is running."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory).expanduser().absolute()
        self.path = self.directory / RUN_FILE

    def __repr__(self) -> str:
        return f"RunFile({str(self.directory)!r})"

    def read(self) -> str | None:
        """The run id recorded, or None (none yet, or an unreadable file: logged)."""
        try:
            run = json.loads(self.path.read_bytes()).get("run")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, AttributeError) as e:
            log.warning("%s is unreadable (%s): this directory's run is not known", self.path, e)
            return None
        return run if isinstance(run, str) and run else None

    def write(self, run: str) -> None:
        """Record ``run`` (atomically)."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, {"run": run})
        except OSError as e:
            raise storage_error(e, self.path, "record the run id in") from e

    def adopt(self, run: str) -> str:
        """The run recorded; ``run`` is recorded first when none is (restore, pull)."""
        have = self.read()
        if have is None:
            self.write(run)
            log.info("%s continues run %s", self.directory, run)
            return run
        return have


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
    if scheme is not None and scheme not in _LOCAL_SCHEMES:
        _check_object_path(url, scheme, what)
    return url


def _check_object_path(url: str, scheme: str, what: str) -> None:
    """Refuse what an object store would take literally or resolve elsewhere: a query
    string, an empty path component (``//``), ``.`` or ``..`` (a local path resolves them; a
    key does not, so the run would land under another prefix than the one read back)."""
    shown = redact_url(url)  # a query string may hold a signature: never shown
    if "?" in url or "#" in url:
        raise ConfigError(
            f"{what} {shown!r} has a query string or fragment ('?...'); a remote URL is a "
            f"path: give {shown!r} without it (options go in -o KEY=VALUE or "
            "CKPTSYNC_STORAGE_OPTIONS)")
    # A leading "/" is a custom protocol's absolute path (noisy:///tmp/x), not an empty key.
    parts = split_protocol(shown)[1].strip("/").split("/")
    bad = [p for p in parts if p in ("", ".", "..")]
    if bad:
        fixed = "/".join(p for p in parts if p not in ("", "."))
        reason = ("an empty path component ('//')" if "" in bad
                  else f"a {bad[0]!r} path component")
        hint = (f"write {scheme}://{fixed}" if ".." not in bad
                else "write the prefix out in full, without '..'")
        raise ConfigError(
            f"{what} {shown!r} has {reason}: object stores keep it literally in the key, so "
            f"the run would not be where it is read back; {hint}")


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
