"""The remote checkpoint store over any fsspec URL, and its commit protocol.

Layout under the remote root (DESIGN.md, "Remote side")::

    <root>/<name>/<files...>
    <root>/<name>/ckptsync.json     the manifest: its presence is the commit
    <root>/LATEST                   {"name": ..., "step": ...}: a hint, never trusted alone
    <root>/ckptsync-root.json       the marker, written at the first push: this root is ours

Commit protocol (:meth:`RemoteStore.push`): upload every file (parallel, streamed, retried),
check each remote size, write the manifest with a create-only write, then update ``LATEST``.
A reader treats the manifest's presence as the commit, so a push that dies at any point
leaves either nothing committed or a complete checkpoint. Deletion removes the manifest
first, so a half-deleted checkpoint is merely uncommitted and ``gc`` collects it. Every delete
touches only what ckptsync wrote (:mod:`ckptsync.ownership`).

Backend exceptions are translated in one place, :func:`translate_error`, into
:class:`~ckptsync.errors.CkptSyncError` subclasses that keep the backend exception as
``__cause__`` and never mention credentials (nor does the cause: see :mod:`ckptsync.redact`).

:class:`RemoteStore` is one object composed of parts that each own their state
(:mod:`ckptsync.remote.store` wires them). Modules, lowest layer first:

- ``backends``: one class per family of storage, owning its specifics and any private API of
  its library (:func:`choose_backend`, the one scheme table).
- ``boundary``: the error boundary (:func:`translate_error`, :data:`EXTRAS`), opening a URL.
- ``location``: :class:`~ckptsync.remote.location.Location`, the root: the filesystem, its
  paths and URLs, the backend, the one retried call, the raw listings.
- ``manifests``, ``listing``: reading manifests and ``LATEST``; what is there
  (:class:`RemoteEntry`, ``scan``, ``iter_committed``).
- ``visibility``: how a checkpoint becomes visible, one class per way (a directory's rename,
  an object store's create-only write, check-then-write), chosen once from the backend;
  :class:`ManifestExists`.
- ``marker``, ``claim``: the root marker, and the run a store pushes as.
- ``commit``, ``nodeparts``: the commit of one writer's checkpoint, and of a multi-node one.
- ``routes``: how one file goes up, one object per route, chosen by ``is_compatible``.
- ``push``, ``fetch`` (with ``filedrop``), ``collect``: pushing; pulling and verifying;
  deleting, retention and ``gc``.
- ``encrypted``: what a key changes in the remote manifest.
- ``store``: :class:`RemoteStore`, the parts composed.

Example::

    store = RemoteStore("s3://bucket/runs/exp1")
    store.push(LocalStore("ckpts").list()[-1])
    newest = store.newest_valid()
    store.pull(None, LocalStore("/tmp/restore"))   # newest valid, every digest verified
"""

from __future__ import annotations

from ckptsync.redact import redact_url
from ckptsync.remote.backends import Backend, choose_backend
from ckptsync.remote.boundary import EXTRAS, translate_error
from ckptsync.remote.listing import RemoteEntry
from ckptsync.remote.store import RemoteStore
from ckptsync.remote.visibility import ManifestExists

__all__ = [
    "EXTRAS",
    "Backend",
    "ManifestExists",
    "RemoteEntry",
    "RemoteStore",
    "choose_backend",
    "redact_url",
    "translate_error",
]
