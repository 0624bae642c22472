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

Modules, lowest layer first:

- ``backends``: :class:`Backend`, what each family of storage can do; :func:`choose_backend`.
- ``boundary``: the error boundary (:func:`translate_error`, :data:`EXTRAS`), opening a URL.
- ``marker``: the root marker (:class:`~ckptsync.remote.marker.RootMarker`): run id, keys.
- ``listing``: ``StoreBase`` (construction, reads, listing, the root marker); :class:`RemoteEntry`.
- ``writes``: create-only and durable writes (``WriteBase``); :class:`ManifestExists`.
- ``claim``: the root claimed for a run at its first push (``ClaimMixin``).
- ``nodeparts``: the digests of a multi-node checkpoint's parts checked (``PartsMixin``).
- ``commit``: ``push`` and the create-only commit (``PushMixin``).
- ``fetch``: ``pull`` and ``verify`` (``FetchMixin``).
- ``collect``: ``delete``, ``abandon``, retention and ``gc`` (``CollectMixin``).
- ``store``: :class:`RemoteStore`, the mixins composed.

Why mixins: every concern needs the same dozen helpers of one store (its paths, retried
calls, manifest reads, backend flags), and ``RemoteStore`` must stay one object with the
methods its users call. Mixins over one base keep each concern in its own module while the
imports run one way (base <- writes <- claim <- parts <- push; base <- fetch, collect), with
no cycle and no store passed around.

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
from ckptsync.remote.commit import ManifestExists
from ckptsync.remote.listing import RemoteEntry
from ckptsync.remote.store import RemoteStore

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
