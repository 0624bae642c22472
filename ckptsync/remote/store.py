"""The public :class:`RemoteStore`: the store's concerns, composed.

Each concern is a mixin over :class:`~ckptsync.remote.listing.StoreBase` (construction and
reads), in its own module: pushing and the commit protocol (:mod:`.commit`), pulling and
verifying (:mod:`.fetch`), deleting, retention and gc (:mod:`.collect`).
"""

from __future__ import annotations

from ckptsync.remote.collect import CollectMixin
from ckptsync.remote.commit import PushMixin
from ckptsync.remote.fetch import FetchMixin

__all__ = ["RemoteStore"]


class RemoteStore(PushMixin, FetchMixin, CollectMixin):
    """Committed checkpoints under one fsspec URL.

    Args:
        url: ``s3://bucket/prefix``, ``gs://...``, ``gdrive://...``, ``file:///path``,
            ``memory://...`` or a plain local path.
        storage_options: passed to fsspec unchanged (credentials, endpoint, ...).
        fs: an fsspec filesystem to use instead of the one the URL names (a fault seam for
            tests, or a pre-built client); ``url`` still names the root.
        config: transfer settings (default: :meth:`TransferConfig.resolve`).
        ops: the file system calls made where the remote is a local path (``file://``, a
            mounted drive): its fsyncs make every file durable before the manifest (a fault
            seam for tests).

    Raises:
        ConfigError: unknown scheme, or the backend's optional package is missing.
        RemoteError: the backend cannot be set up.

    Example::

        store = RemoteStore("s3://bucket/runs/exp1")
        store.push(LocalStore("ckpts").list()[-1])
        store.pull(None, LocalStore("/tmp/restore"))   # newest valid, every digest verified
    """
