"""Reading the CLI's ``--json`` output: JSON Lines, one object per item, a summary last."""

from __future__ import annotations

import json
from typing import Any


def json_lines(stdout: str) -> list[dict[str, Any]]:
    """Every line of ``stdout`` parsed: each one compact JSON object naming its ``event``,
    and exactly one ``summary``, the last (fails the test otherwise)."""
    lines = stdout.splitlines()
    assert lines, "no output"
    objs = [json.loads(line) for line in lines]
    assert all(isinstance(o, dict) and isinstance(o.get("event"), str) for o in objs), stdout
    assert [o["event"] == "summary" for o in objs] == [False] * (len(objs) - 1) + [True], stdout
    return objs


def events(stdout: str, event: str | None = None) -> list[dict[str, Any]]:
    """The item lines (all but the summary), only those of ``event`` when given."""
    return [o for o in json_lines(stdout)[:-1] if event is None or o["event"] == event]


def summary(stdout: str) -> dict[str, Any]:
    """The last line, ``{"event": "summary", "command": ..., "exit_code": ...}``, without
    its ``seconds`` (how long a transfer took: never the same twice; checked to be a number)."""
    last = dict(json_lines(stdout)[-1])
    if "seconds" in last:
        assert isinstance(last.pop("seconds"), (int, float)), stdout
    return last
