"""Retention policy as pure functions, shared by the local and the remote stores.

A policy keeps the union of what each rule keeps: the last N, the best K by a metric, every
Mth step. The newest checkpoint and any protected names (the one a live run resumed from) are
always kept. Nothing here touches storage: callers pass what they listed and delete what
comes back, manifest first.

Example::

    policy = RetentionPolicy(keep_last=2, keep_best=BestRule("val_loss", "min", 1))
    doomed = select_for_deletion(infos, policy)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from ckptsync.errors import ConfigError

__all__ = ["BestRule", "CheckpointInfo", "RetentionPolicy", "keep_reasons", "parse_best",
           "select_for_deletion"]


@dataclass(frozen=True)
class CheckpointInfo:
    """What retention needs to know about one committed checkpoint."""

    name: str
    step: int | None
    sort_key: tuple[object, ...]
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class BestRule:
    """Keep the ``k`` best checkpoints by ``metric`` (``mode`` "min" or "max")."""

    metric: str
    mode: Literal["min", "max"]
    k: int

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ConfigError(f"keep-best mode must be 'min' or 'max', got {self.mode!r}")
        if self.k < 1:
            raise ConfigError(f"keep-best count must be >= 1, got {self.k}")


def parse_best(spec: str) -> BestRule:
    """Parse ``METRIC:min|max:K`` (e.g. ``val_loss:min:3``)."""
    parts = spec.rsplit(":", 2)
    if len(parts) != 3 or not parts[0] or not parts[2].isdigit():
        raise ConfigError(
            f"invalid keep-best rule {spec!r}: expected METRIC:min|max:K, e.g. val_loss:min:3"
        )
    return BestRule(parts[0], parts[1], int(parts[2]))  # type: ignore[arg-type]


@dataclass(frozen=True)
class RetentionPolicy:
    """Which checkpoints to keep. All rules None means keep everything."""

    keep_last: int | None = None
    keep_best: BestRule | None = None
    keep_every: int | None = None

    def __post_init__(self) -> None:
        if self.keep_last is not None and self.keep_last < 1:
            raise ConfigError(f"keep-last must be >= 1, got {self.keep_last}")
        if self.keep_every is not None and self.keep_every < 1:
            raise ConfigError(f"keep-every must be >= 1, got {self.keep_every}")

    @property
    def active(self) -> bool:
        return any(r is not None for r in (self.keep_last, self.keep_best, self.keep_every))


def keep_reasons(
    checkpoints: Iterable[CheckpointInfo],
    policy: RetentionPolicy,
    protect: Iterable[str] = (),
) -> dict[str, list[str]]:
    """Why each checkpoint the policy keeps is kept (name -> reasons, e.g. ``newest``,
    ``keep-last 3``, ``keep-best val_loss:min:1 (0.213)``, ``keep-every 1000``,
    ``protected``), oldest first; a name missing from the result is deleted. An inactive
    policy keeps everything (``keep everything: no rule``).

    Args: as :func:`select_for_deletion`.
    """
    ordered: Sequence[CheckpointInfo] = sorted(checkpoints, key=lambda c: c.sort_key)
    if not policy.active:
        return {c.name: ["no retention rule"] for c in ordered}
    reasons: dict[str, list[str]] = {c.name: [] for c in ordered}
    for name in protect:
        if name in reasons:
            reasons[name].append("protected (a live run resumed from it)")
    if ordered:
        reasons[ordered[-1].name].append("newest (never deleted)")
    if policy.keep_last is not None:
        for c in ordered[-policy.keep_last :]:
            reasons[c.name].append(f"keep-last {policy.keep_last}")
    if policy.keep_every is not None:
        for c in ordered:
            if c.step is not None and c.step % policy.keep_every == 0:
                reasons[c.name].append(f"keep-every {policy.keep_every}")
    if policy.keep_best is not None:
        rule = policy.keep_best
        # NaN/inf (a diverged run) never counts as "best".
        scored = [c for c in ordered
                  if rule.metric in c.metrics and math.isfinite(c.metrics[rule.metric])]
        # Ties: prefer the newer checkpoint.
        sign = 1.0 if rule.mode == "min" else -1.0
        position = {c.name: i for i, c in enumerate(ordered)}
        scored.sort(key=lambda c: (sign * c.metrics[rule.metric], -position[c.name]))
        for c in scored[: rule.k]:
            reasons[c.name].append(f"keep-best {rule.metric}:{rule.mode}:{rule.k} "
                                   f"({c.metrics[rule.metric]:.4g})")
    return {n: r for n, r in reasons.items() if r}


def select_for_deletion(
    checkpoints: Iterable[CheckpointInfo],
    policy: RetentionPolicy,
    protect: Iterable[str] = (),
) -> list[str]:
    """Names of the checkpoints the policy does not keep, oldest first.

    Args:
        checkpoints: committed, valid checkpoints (any order).
        policy: the rules; an inactive policy deletes nothing.
        protect: names never deleted (e.g. the checkpoint a running trainer resumed from).
    """
    ordered: Sequence[CheckpointInfo] = sorted(checkpoints, key=lambda c: c.sort_key)
    if not policy.active or not ordered:
        return []
    keep = keep_reasons(ordered, policy, protect)
    return [c.name for c in ordered if c.name not in keep]
