"""Test tiers: every test belongs to exactly one tier, chosen by a marker.

===========  ===============================================================================
tier         what runs it
===========  ===============================================================================
``core``     ``make test`` (the README's test command; ``make test-full`` runs it first):
             unit tests, the conformance suite on ``file://`` and SeaweedFS, and one
             end-to-end proof of each capability. Under 10 minutes on a quiet 2-core machine.
``full``     ``make test-full`` only, after ``make test`` (what CI runs): every other
             backend, every framework test, the packaged demo, the notebook, the README
             examples, soak-lite, the fault suites.
===========  ===============================================================================

A test module declares its tier once, at module level (``pytestmark = pytest.mark.core``, or
a list holding exactly one of the tier marks); :func:`module_tiers` reads it from the source
and ``tests/unit/test_tiers.py`` fails for a module with none or with two. A single test, a
class or a parameter may move to another tier with its own mark (``pytest.param("moto",
marks=pytest.mark.full)``): the mark closest to the test decides (:func:`tier_of`).

``serial`` is not a tier: it marks a test that depends on timing (a kill at a moment, pacing,
a deadline raced against work). ``make test``/``make test-full`` run such tests after the
parallel pass, alone, so that a busy neighbour on two cores cannot make them flaky.

``pytest --tier core`` runs the core tier, ``--tier full`` the full tier alone, ``--tier all``
(the default) both.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path
from typing import Any

TIERS = ("core", "full")
SERIAL = "serial"
#: ``--tier X`` runs the tests of these tiers.
SELECTS = {"core": {"core"}, "full": {"full"}, "all": {"core", "full"}}


def _mark_names(node: ast.expr) -> list[str]:
    """The ``pytest.mark.NAME`` names a ``pytestmark`` value holds (a mark, a call of one, or
    a list or tuple of them)."""
    if isinstance(node, ast.List | ast.Tuple):
        return [n for elt in node.elts for n in _mark_names(elt)]
    if isinstance(node, ast.Call):
        return _mark_names(node.func)
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) \
            and node.value.attr == "mark":
        return [node.attr]
    return []


def module_tiers(source: str) -> list[str]:
    """The tier marks in the module-level ``pytestmark`` of a test module's ``source``."""
    found: list[str] = []
    for stmt in ast.parse(source).body:
        targets: list[ast.expr] = []
        value: ast.expr | None = None
        if isinstance(stmt, ast.Assign):
            targets, value = stmt.targets, stmt.value
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            targets, value = [stmt.target], stmt.value
        if value is not None and any(isinstance(t, ast.Name) and t.id == "pytestmark"
                                     for t in targets):
            found += [n for n in _mark_names(value) if n in TIERS]
    return found


def tier_problems(paths: Iterable[Path], root: Path) -> list[str]:
    """One line per test module whose source declares no tier, or more than one."""
    problems = []
    for path in sorted(paths):
        tiers = module_tiers(path.read_text())
        if len(tiers) != 1:
            what = "no tier" if not tiers else f"{len(tiers)} tiers ({', '.join(tiers)})"
            problems.append(f"{path.relative_to(root)}: {what}; put exactly one of "
                            f"{', '.join(f'pytest.mark.{t}' for t in TIERS)} in its "
                            "module-level pytestmark (tests/support/tiers.py says which)")
    return problems


def tier_of(item: Any) -> str | None:
    """The tier of a collected test: its closest tier mark (a parameter's or the test's own
    before its class's, before its module's)."""
    for mark in item.iter_markers():  # closest first
        if mark.name in TIERS:
            return str(mark.name)
    return None
