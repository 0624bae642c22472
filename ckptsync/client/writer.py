"""Writing one checkpoint's files into the local store: serialized, hashed while written,
optionally encrypted at rest (``Checkpointer(encrypt_local=True)``), then committed.

Under ``encrypt_local`` each file goes serialization -> :class:`SealingWriter` (AES-256-GCM
chunks bound to the checkpoint name and path, :mod:`ckptsync.crypto`) ->
:class:`~ckptsync.hashing.HashingWriter`: the manifest's digests cover the stored bytes (so
``verify`` works without the key), each entry says how it is encrypted, plaintext never
reaches the disk, and a push sends the stored bytes as they are.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from ckptsync.client.state import serialize
from ckptsync.crypto import ALG, KeyRing
from ckptsync.errors import ConfigError
from ckptsync.hashing import HashingWriter
from ckptsync.integrity import sign_manifest
from ckptsync.local import LocalCheckpoint, LocalStore, storage_error
from ckptsync.manifest import ENC_FIELD, Encryption, FileEntry, Manifest

if TYPE_CHECKING:
    from ckptsync.client.remote_open import KeyArg
    from ckptsync.remote import RemoteStore

__all__ = ["SealingWriter", "local_keys", "write_checkpoint"]


class SealingWriter:
    """A write-only binary file (what ``torch.save`` writes to) that encrypts into a
    :class:`HashingWriter`; ``size`` counts the plaintext, :meth:`close` writes the last chunk
    and closes (fsyncs) the writer beneath."""

    def __init__(self, inner: HashingWriter, keys: KeyRing, *, name: str, relpath: str) -> None:
        self.inner = inner
        self.path = inner.path
        self._enc = keys.encryptor(inner, name=name, relpath=relpath)
        self.size = 0

    @property
    def error(self) -> OSError | None:
        return self.inner.error

    def write(self, data: Any) -> int:
        n = self._enc.write(data)
        self.size += n
        return n

    def flush(self) -> None:
        """Nothing to do: the encryptor holds at most one chunk, written by :meth:`close`."""

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self.size

    def close(self) -> None:
        self._enc.close()


def local_keys(encryption_key: KeyArg, encrypt_local: bool,
               remote: RemoteStore | None) -> KeyRing | None:
    """The keys a Checkpointer reads (and, with ``encrypt_local``, writes) local files with:
    ``encryption_key``, else the remote's, else ``CKPTSYNC_KEY`` / ``CKPTSYNC_KEY_FILE`` (a
    directory saved with ``encrypt_local`` restores without it too, given a key).

    Raises:
        ConfigError: ``encrypt_local`` without any key.
    """
    if encryption_key is not None:
        keys = KeyRing.of(encryption_key)
    elif remote is not None and remote.keys is not None:
        keys = remote.keys
    else:
        keys = KeyRing.from_env()
    if encrypt_local and keys is None:
        raise ConfigError("encrypt_local=True needs a key: pass encryption_key=... or set "
                          "CKPTSYNC_KEY / CKPTSYNC_KEY_FILE (32 bytes, 64 hex chars)")
    return keys


def write_checkpoint(
    store: LocalStore, name: str, files: dict[str, Any], *, remote: RemoteStore | None,
    seal: KeyRing | None, manifest: dict[str, Any],
) -> tuple[LocalCheckpoint, dict[str, Any]]:
    """Serialize each tree of ``files`` (object name -> state tree) as ``<name>.pt`` into a
    new checkpoint ``name`` of ``store`` and commit it with ``Manifest.new(**manifest)``.

    ``remote``: a store to stream each file to while it is written (None: no streaming).
    ``seal``: encrypt every file with its current key (``encrypt_local``).

    Returns:
        The committed checkpoint and the streams (relative path -> sink) to hand to its push.
    """
    staging = store.staging(name)
    streams: dict[str, Any] = {}
    sealed: dict[str, Encryption] = {}
    try:
        for obj_name, tree in files.items():
            relpath = f"{obj_name}.pt"
            w = staging.open(relpath)
            # With an S3 remote, large files are uploaded while they are serialized (the bytes
            # hashed are the bytes sent) as far as the link keeps up, never waited for: the
            # push sends the rest from the committed file. Nothing is visible remotely before
            # the push.
            stream = remote.stream_file(name, relpath) if remote is not None else None
            if stream is not None:
                streams[relpath] = stream
                w.tee = stream.write
            out: HashingWriter | SealingWriter = (
                w if seal is None else SealingWriter(w, seal, name=name, relpath=relpath))
            try:
                serialize(tree, out)  # hashed while written
                if seal is not None and isinstance(out, SealingWriter):
                    out.close()  # the last chunk; then the file's fsync
                    sealed[relpath] = Encryption(ALG, seal.current_id, out.size)
            except Exception:
                if w.error is not None:  # torch wraps OSError: report the real cause
                    raise storage_error(w.error, w.path, "write") from w.error
                raise
            staging.close_file(relpath)  # fsync
        entries = [_with_enc(e, sealed.get(e.path)) for e in staging.entries]
        m = Manifest.new(files=entries, name=name, **manifest)
        # Keyed like a remote one (ckptsync.integrity): a pusher without the key sends it
        # as it is, and a restore under the key refuses it altered.
        ckpt = staging.commit(sign_manifest(m, seal) if seal is not None else m)
    except BaseException:
        staging.abort()
        for stream in streams.values():
            stream.abort()
        raise
    return ckpt, streams


def _with_enc(e: FileEntry, enc: Encryption | None) -> FileEntry:
    if enc is None:
        return e
    return dataclasses.replace(e, unknown={**e.unknown, ENC_FIELD: enc.to_dict()})
