"""Retention policy (pure functions): keep last N, best K by a metric, every Mth step."""

from __future__ import annotations

import pytest

from ckptsync.errors import ConfigError
from ckptsync.manifest import name_sort_key
from ckptsync.retention import (
    BestRule,
    CheckpointInfo,
    RetentionPolicy,
    parse_best,
    select_for_deletion,
)

pytestmark = pytest.mark.core


def infos(losses: list[float | None], steps: list[int] | None = None) -> list[CheckpointInfo]:
    steps = steps if steps is not None else [10 * (i + 1) for i in range(len(losses))]
    out = []
    for step, loss in zip(steps, losses, strict=True):
        name = f"step-{step:012d}-20260101T000000000000Z-abcdef"
        out.append(CheckpointInfo(name, step, name_sort_key(name),
                                  {} if loss is None else {"loss": loss}))
    return out


def kept(
    cs: list[CheckpointInfo], policy: RetentionPolicy, protect: tuple[str, ...] = ()
) -> list[int | None]:
    doomed = set(select_for_deletion(cs, policy, protect))
    return [c.step for c in cs if c.name not in doomed]


def test_inactive_policy_deletes_nothing() -> None:
    cs = infos([1.0] * 5)
    assert not RetentionPolicy().active
    assert select_for_deletion(cs, RetentionPolicy()) == []
    assert select_for_deletion([], RetentionPolicy(keep_last=1)) == []


def test_keep_last() -> None:
    cs = infos([1.0] * 6)
    assert kept(cs, RetentionPolicy(keep_last=2)) == [50, 60]
    assert kept(cs, RetentionPolicy(keep_last=10)) == [10, 20, 30, 40, 50, 60]


def test_deletion_list_is_oldest_first_whatever_the_input_order() -> None:
    cs = infos([1.0] * 5)
    assert select_for_deletion(list(reversed(cs)), RetentionPolicy(keep_last=2)) == [
        c.name for c in cs[:3]
    ]


def test_keep_every() -> None:
    cs = infos([1.0] * 7, steps=[0, 5, 10, 15, 20, 25, 26])
    assert kept(cs, RetentionPolicy(keep_every=10)) == [0, 10, 20, 26]  # 26: the newest


def test_keep_best_min_and_max() -> None:
    cs = infos([3.0, 1.0, 2.0, 0.5, 4.0, 5.0])
    assert kept(cs, RetentionPolicy(keep_best=BestRule("loss", "min", 2))) == [20, 40, 60]
    assert kept(cs, RetentionPolicy(keep_best=BestRule("loss", "max", 2))) == [50, 60]


def test_keep_best_ties_prefer_the_newer() -> None:
    cs = infos([1.0, 1.0, 1.0, 9.0])
    assert kept(cs, RetentionPolicy(keep_best=BestRule("loss", "min", 1))) == [30, 40]


def test_keep_best_ignores_checkpoints_without_the_metric() -> None:
    cs = infos([None, 2.0, None, 1.0, None])
    assert kept(cs, RetentionPolicy(keep_best=BestRule("loss", "min", 1))) == [40, 50]


def test_keep_best_is_not_fooled_by_a_nan_metric() -> None:
    """A diverged step logs NaN; the truly best checkpoint must survive."""
    cs = infos([1.0, float("nan"), 0.5, 2.0, 3.0])
    assert kept(cs, RetentionPolicy(keep_best=BestRule("loss", "min", 1))) == [30, 50]
    assert kept(cs, RetentionPolicy(keep_best=BestRule("loss", "max", 1))) == [50]


def test_rules_combine_as_a_union() -> None:
    cs = infos([0.1, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0])  # steps 10..80
    policy = RetentionPolicy(keep_last=2, keep_best=BestRule("loss", "min", 1), keep_every=30)
    assert kept(cs, policy) == [10, 30, 60, 70, 80]


def test_never_deletes_the_newest_even_if_it_is_the_worst() -> None:
    cs = infos([1.0, 2.0, 99.0])
    assert kept(cs, RetentionPolicy(keep_best=BestRule("loss", "min", 1))) == [10, 30]
    assert kept(cs, RetentionPolicy(keep_every=1000)) == [30]


def test_protected_names_are_kept() -> None:
    cs = infos([1.0] * 5)
    assert kept(cs, RetentionPolicy(keep_last=1), protect=(cs[1].name,)) == [20, 50]
    # Protecting a name that is not there changes nothing.
    assert kept(cs, RetentionPolicy(keep_last=1), protect=("gone",)) == [50]


def test_stepless_checkpoints_order_before_stepped_ones() -> None:
    a = "nostep-20260101T000000000000Z-aaaaaa"
    b = "nostep-20260102T000000000000Z-bbbbbb"
    c = "step-000000000001-20251231T000000000000Z-cccccc"
    cs = [CheckpointInfo(n, s, name_sort_key(n)) for n, s in ((b, None), (c, 1), (a, None))]
    assert select_for_deletion(cs, RetentionPolicy(keep_last=1)) == [a, b]


@pytest.mark.parametrize(
    ("spec", "rule"),
    [("val_loss:min:3", BestRule("val_loss", "min", 3)),
     ("acc:max:1", BestRule("acc", "max", 1)),
     ("eval:loss/x:min:2", BestRule("eval:loss/x", "min", 2))],
)
def test_parse_best(spec: str, rule: BestRule) -> None:
    assert parse_best(spec) == rule


@pytest.mark.parametrize(
    "spec", ["", "loss", "loss:min", "loss:min:", "loss:MIN:3", "loss:avg:3", ":min:3",
             "loss:min:0", "loss:min:-1", "loss:min:x"],
)
def test_parse_best_refuses_malformed_rules(spec: str) -> None:
    with pytest.raises(ConfigError, match="keep-best"):
        parse_best(spec)


@pytest.mark.parametrize("kwargs", [{"keep_last": 0}, {"keep_every": 0}, {"keep_last": -2}])
def test_policy_refuses_non_positive_counts(kwargs: dict[str, int]) -> None:
    with pytest.raises(ConfigError):
        RetentionPolicy(**kwargs)  # type: ignore[arg-type]


def test_best_rule_refuses_bad_mode_and_count() -> None:
    with pytest.raises(ConfigError, match="min' or 'max"):
        BestRule("loss", "median", 1)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=">= 1"):
        BestRule("loss", "min", 0)
