"""What a key changes in push and pull: the remote manifest of an encrypted checkpoint.

A checkpoint pushed under a :class:`~ckptsync.crypto.KeyRing` has, remotely, one entry per file
with the size and digest of the *stored* (encrypted) bytes, plus ``enc`` (algorithm, key id,
plaintext size): :func:`sealed_manifest`. Everything else in the manifest (name, step, metrics,
meta) stays readable, so ``ls``, ``verify``, ``gc`` and retention need no key. A pull decrypts
while downloading and commits locally the plaintext manifest of what it wrote
(:func:`plain_manifest`): local checkpoints stay plaintext, unless asked
(``encrypt_local=True``: then a pull keeps the stored bytes and the remote manifest as they are,
and the push of such a checkpoint sends its stored bytes as they are).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from ckptsync.crypto import ALG, Encryptor, KeyRing, missing_key
from ckptsync.errors import CorruptCheckpointError, UnsupportedFormatError
from ckptsync.integrity import strip_mac
from ckptsync.manifest import ENC_FIELD, Encryption, FileEntry, Manifest, with_requires

__all__ = ["check_keys", "plain_manifest", "same_content", "sealed_manifest"]


def _plain_view(m: Manifest) -> list[tuple[str, int]]:
    return [(f.path, f.encryption.size if f.encryption else f.size) for f in m.files]


def same_content(remote: Manifest, local: Manifest) -> bool:
    """Whether ``remote`` is ``local``'s checkpoint. Names are unique and never reused; an
    encrypted copy differs in every digest (a fresh salt per upload), so there it is the same
    files with the same plaintext sizes."""
    if remote.files == local.files:
        return True
    if not any(f.encryption for f in (*remote.files, *local.files)):
        return False
    return _plain_view(remote) == _plain_view(local)


def sealed_manifest(m: Manifest, stored: Mapping[str, Encryptor], keys: KeyRing) -> Manifest:
    """The remote manifest of local ``m`` whose plaintext files were uploaded through
    ``stored`` (relative path -> the encryptor of its completed upload). A file that ``m``
    already lists as encrypted (``encrypt_local=True``) went up as it is stored: its entry is
    kept. Each file sealed here also gets the keyed MAC of its plaintext digest
    (:func:`~ckptsync.crypto.content_mac`), by which the daemon knows its own upload again."""
    files = []
    kid = keys.current_id
    for f in m.files:
        if f.encryption is not None:
            files.append(f)
            continue
        w = stored[f.path]
        enc = Encryption(ALG, kid, f.size, keys.mac(kid, m.name, f.path, f.algo, f.digest))
        files.append(FileEntry(f.path, w.size, w.algo, w.hexdigest(),
                               {**f.unknown, ENC_FIELD: enc.to_dict()}))
    return with_requires(dataclasses.replace(m, files=tuple(files)))


def check_keys(m: Manifest, keys: KeyRing | None, where: str) -> None:
    """Raise before any download unless every encrypted file of ``m`` can be decrypted.

    Raises:
        EncryptionKeyError: a key id none of ``keys`` has (or no keys): names both.
        UnsupportedFormatError: an encryption this version does not know.
    """
    for f in m.files:
        enc = f.encryption
        if enc is None:
            continue
        if enc.alg != ALG:
            raise UnsupportedFormatError(
                f"{where}: file {f.path!r} is encrypted with {enc.alg!r}, which this ckptsync "
                f"does not know (it knows {ALG}); upgrade ckptsync to read it")
        if keys is None or keys.get(enc.key_id) is None:
            raise missing_key(enc.key_id, m.name, where, keys)


def plain_manifest(m: Manifest, written: Iterable[FileEntry], where: str) -> Manifest:
    """The local manifest of remote ``m`` once its files were decrypted into ``written``.

    Raises:
        CorruptCheckpointError: a decrypted size differs from the one ``m`` lists.
    """
    by_path = {e.path: e for e in written}
    files = []
    for f in m.files:
        got = by_path[f.path]
        want = f.encryption.size if f.encryption else f.size
        if got.size != want:
            raise CorruptCheckpointError(
                f"{where}/{f.path}: decrypts to {got.size} bytes, its manifest lists {want}",
                path=f"{where}/{f.path}")
        if f.encryption is None:
            got = f
        files.append(FileEntry(got.path, got.size, got.algo, got.digest,
                               {k: v for k, v in f.unknown.items() if k != ENC_FIELD}))
    # Plaintext now: no encryption/1, and no MAC (it covered the stored bytes' digests).
    return strip_mac(dataclasses.replace(m, files=tuple(files)))
