"""Transfer configuration: a frozen dataclass; arguments > ``CKPTSYNC_*`` env > defaults.

Example::

    cfg = TransferConfig.resolve(max_workers=4)          # CKPTSYNC_RETRIES etc. still apply
    store = RemoteStore("s3://bucket/run1", config=cfg)

Environment variables (each optional): ``CKPTSYNC_MAX_WORKERS``, ``CKPTSYNC_CHUNK_SIZE``,
``CKPTSYNC_BLOCK_SIZE``, ``CKPTSYNC_RETRIES``, ``CKPTSYNC_BACKOFF_INITIAL``,
``CKPTSYNC_BACKOFF_MAX``, ``CKPTSYNC_GRACE``, ``CKPTSYNC_RANGED_MIN_SIZE``,
``CKPTSYNC_PART_SIZE``, ``CKPTSYNC_PARTS_IN_FLIGHT``, ``CKPTSYNC_DIGEST_ATTEMPTS``,
``CKPTSYNC_CONNECT_TIMEOUT``, ``CKPTSYNC_READ_TIMEOUT``; for the client,
``CKPTSYNC_CLOSE_TIMEOUT`` (:func:`resolve_close_timeout`) and ``CKPTSYNC_UPLOAD_NICE``
(:func:`ckptsync.remote.process.upload_nice`).

The remote URL comes from ``CKPTSYNC_REMOTE`` (:func:`remote_from_env`) where no argument
gives one. Storage options (fsspec's, passed through unchanged) come from
``CKPTSYNC_STORAGE_OPTIONS`` (:func:`storage_options_from_env`) and ``-o KEY=VALUE`` flags
(:func:`parse_storage_options`, the one parser every command uses, ``watch`` included); both
apply to ``Checkpointer(...)`` too when its ``remote=``/``storage_options=`` are not given.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ckptsync.errors import ConfigError

__all__ = [
    "ENV_PREFIX",
    "TransferConfig",
    "parse_storage_option",
    "parse_storage_options",
    "remote_from_env",
    "resolve_close_timeout",
    "storage_options_from_env",
]

ENV_PREFIX = "CKPTSYNC_"
MiB = 1024 * 1024
DEFAULT_CLOSE_TIMEOUT = 60.0


@dataclass(frozen=True)
class TransferConfig:
    """How remote transfers run.

    Attributes:
        max_workers: files transferred in parallel (a bounded thread pool).
        chunk_size: bytes read or written per call while streaming; memory per transfer is
            about ``chunk_size`` plus the backend's buffer (``block_size``).
        block_size: the backend file buffer: the S3 multipart part size (S3 allows 10,000
            parts, so 32 MiB parts reach 312 GiB per file), the GCS resumable upload chunk,
            the read-ahead for downloads. At most ``max_workers * block_size`` bytes are
            buffered at once.
        retries: attempts per operation on retryable errors (1 = no retry).
        backoff_initial: seconds of the first back-off; doubles per attempt, with full jitter.
        backoff_max: cap of one back-off, in seconds.
        grace_s: default age, in seconds, after which ``gc`` removes an uncommitted upload.
        ranged_min_size: files at least this large are downloaded as ``block_size`` ranges
            fetched in parallel (still written and hashed in order).
        part_size: on S3, a file larger than this is uploaded as a parallel multipart upload
            of ``part_size`` parts (raised where needed to stay under S3's 10,000 parts).
        parts_in_flight: multipart parts held in memory and sent at once, across every file
            of one push: upload memory is about ``part_size * parts_in_flight``.
        digest_attempts: downloads of one file whose bytes do not match its manifest (a
            short body, a flipped byte), and reads of one manifest that does not verify, before
            its checkpoint is declared corrupt: damage in transit is not damage at rest (1 = no
            second read).
        connect_timeout: seconds to wait for a connection to the remote before the attempt
            fails (and is retried): a black-holed endpoint never hangs a command.
        read_timeout: seconds to wait for the next bytes on an open connection. It bounds one
            socket read, not a whole request, so a large part on a slow link does not hit it;
            only a connection that stopped moving does. Both apply to the S3 and GCS clients
            ckptsync builds, where ``storage_options`` do not set them already.
    """

    max_workers: int = 8
    chunk_size: int = 8 * MiB
    block_size: int = 32 * MiB
    retries: int = 5
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    grace_s: float = 24 * 3600.0
    ranged_min_size: int = 64 * MiB
    part_size: int = 16 * MiB
    parts_in_flight: int = 4
    digest_attempts: int = 3
    connect_timeout: float = 10.0
    read_timeout: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_workers", "chunk_size", "block_size", "retries", "ranged_min_size",
                     "part_size", "parts_in_flight", "digest_attempts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"transfer setting {name} must be an integer >= 1, got {value!r}")
        # S3 refuses multipart parts under 5 MiB (except the last one).
        if self.block_size < 5 * MiB:
            raise ConfigError(f"block_size must be at least 5 MiB, got {self.block_size}")
        if self.part_size < 5 * MiB:
            raise ConfigError(f"part_size must be at least 5 MiB, got {self.part_size}")
        for name in ("connect_timeout", "read_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ConfigError(f"transfer setting {name} must be a number of seconds > 0, "
                                  f"got {value!r}")
        for name in ("backoff_initial", "backoff_max", "grace_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"transfer setting {name} must be a number >= 0, got {value!r}")

    @classmethod
    def resolve(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> TransferConfig:
        """Build a config: explicit ``overrides`` (None ignored) > ``CKPTSYNC_*`` env > defaults.

        Raises:
            ConfigError: an unknown override or an environment value that does not parse.
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        known = {f.name: f for f in dataclasses.fields(cls)}
        for key in overrides:
            if key not in known:
                raise ConfigError(f"unknown transfer setting {key!r}; known: {', '.join(known)}")
        for name, f in known.items():
            if overrides.get(name) is not None:
                values[name] = overrides[name]
                continue
            var = ENV_PREFIX + ("GRACE" if name == "grace_s" else name.upper())
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                continue
            kind = int if f.type in ("int", int) else float
            try:
                values[name] = kind(raw)
            except ValueError:
                raise ConfigError(
                    f"environment variable {var}={raw!r} is not a valid {kind.__name__}"
                ) from None
        return cls(**values)


def remote_from_env(env: Mapping[str, str] | None = None) -> str | None:
    """``CKPTSYNC_REMOTE`` (stripped); None when unset or blank, as for the daemon."""
    raw = (os.environ if env is None else env).get(ENV_PREFIX + "REMOTE")
    return raw.strip() if raw is not None and raw.strip() else None


def storage_options_from_env(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``CKPTSYNC_STORAGE_OPTIONS`` (a JSON object) as a dict; {} when unset.

    Flags (``-o KEY=VALUE``) override it key by key: the caller merges.

    Raises:
        ConfigError: the variable is not a JSON object.
    """
    name = ENV_PREFIX + "STORAGE_OPTIONS"
    raw = (os.environ if env is None else env).get(name)
    if not raw or not raw.strip():
        return {}
    try:
        opts = json.loads(raw)
    except ValueError as e:
        raise ConfigError(f"{name} must be a JSON object: {e}") from e
    if not isinstance(opts, dict):
        raise ConfigError(f"{name} must be a JSON object, got {type(opts).__name__}")
    return opts


def parse_storage_option(text: str, index: int | None = None) -> tuple[str, Any]:
    """``k=v`` where ``v`` is JSON when it parses (``anon=true``, ``client_kwargs={...}``).

    Raises:
        ConfigError: no ``=`` or no key; the message names the option's ``index`` (1-based)
            and never echoes its text, which may be a secret typed without its ``KEY=``.
    """
    key, eq, value = text.partition("=")
    if not eq or not key:
        which = f" #{index}" if index is not None else ""
        raise ConfigError(f"storage option{which} (-o) is not KEY=VALUE (its text is not "
                          "shown: it may hold a secret)")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def parse_storage_options(items: Sequence[str]) -> dict[str, Any]:
    """``-o KEY=VALUE`` flags as a dict (a later key wins), each by :func:`parse_storage_option`.

    Raises:
        ConfigError: an option is not ``KEY=VALUE`` (named by its 1-based number, not shown).

    Example::

        parse_storage_options(["anon=true", "endpoint_url=http://127.0.0.1:9000"])
    """
    return dict(parse_storage_option(text, i) for i, text in enumerate(items, 1))


def resolve_close_timeout(value: float | None, env: Mapping[str, str] | None = None) -> float:
    """How long ``Checkpointer.close()``/``wait()`` wait for a failing or stalled remote.

    ``value`` > ``CKPTSYNC_CLOSE_TIMEOUT`` > 60 seconds; ``math.inf`` waits for ever.

    Raises:
        ConfigError: a negative or non-numeric value.
    """
    name = ENV_PREFIX + "CLOSE_TIMEOUT"
    if value is None:
        raw = (os.environ if env is None else env).get(name)
        if raw is None or not raw.strip():
            return DEFAULT_CLOSE_TIMEOUT
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"environment variable {name}={raw!r} is not a number of "
                              "seconds") from None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
        raise ConfigError(f"close timeout must be a number of seconds >= 0, got {value!r}")
    return float(value)
