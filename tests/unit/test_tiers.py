"""Every test module is in exactly one tier (tests/support/tiers.py): ``make test`` runs the
``core`` tier, ``make test-full`` every tier, and a module without a tier would run in neither
or be forgotten by one."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support.paths import REPO, TESTS, child_env
from tests.support.tiers import module_tiers, tier_problems

pytestmark = pytest.mark.core


def _pytest(probe: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """pytest on one module outside tests/, with this suite's hooks (tests/conftest.py) as a
    plugin."""
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-p", "tests.conftest", *args, str(probe)], capture_output=True,
                          text=True, cwd=probe.parent, env=child_env(), timeout=120)


def test_every_test_module_declares_exactly_one_tier() -> None:
    problems = tier_problems(TESTS.rglob("test_*.py"), REPO)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(("source", "tiers"), [
    ("import pytest\npytestmark = pytest.mark.core\n", ["core"]),
    ("import pytest\npytestmark = [pytest.mark.usefixtures('x'), pytest.mark.full]\n", ["full"]),
    ("import pytest\npytestmark: list = [pytest.mark.full, pytest.mark.serial]\n", ["full"]),
    ("import pytest\n\ndef test_x():\n    pass\n", []),
    ("import pytest\npytestmark = pytest.mark.usefixtures('no_process_leak')\n", []),
    ("import pytest\npytestmark = [pytest.mark.core, pytest.mark.full]\n", ["core", "full"]),
])
def test_module_tiers_reads_the_module_level_pytestmark(source: str, tiers: list[str]) -> None:
    assert module_tiers(source) == tiers


def test_a_module_without_a_tier_or_with_two_is_named(tmp_path: Path) -> None:
    (tmp_path / "test_none.py").write_text("def test_x():\n    pass\n")
    (tmp_path / "test_two.py").write_text(
        "import pytest\npytestmark = [pytest.mark.core, pytest.mark.full]\n")
    (tmp_path / "test_one.py").write_text("import pytest\npytestmark = pytest.mark.core\n")
    problems = tier_problems(tmp_path.glob("test_*.py"), tmp_path)
    assert len(problems) == 2
    assert problems[0].startswith("test_none.py: no tier; put exactly one of pytest.mark.core")
    assert problems[1].startswith("test_two.py: 2 tiers (core, full)")


def test_pytest_refuses_to_run_a_test_without_a_tier(tmp_path: Path) -> None:
    """The collection hook is the second guard: a test that reaches pytest without a tier
    (a module outside tests/, say) stops the run instead of silently running in no tier."""
    probe = tmp_path / "test_probe.py"
    probe.write_text("def test_untiered():\n    pass\n")
    p = _pytest(probe)
    assert p.returncode != 0
    assert "have no tier" in p.stdout + p.stderr


def test_each_tier_runs_its_own_tests_and_all_runs_both(tmp_path: Path) -> None:
    probe = tmp_path / "test_probe.py"
    probe.write_text(textwrap.dedent("""\
        import pytest
        pytestmark = pytest.mark.core

        def test_core():
            pass

        @pytest.mark.full
        def test_full():
            pass

        @pytest.mark.parametrize("b", ["file", pytest.param("moto", marks=pytest.mark.full)])
        def test_param(b):
            pass
    """))
    runs = {tier: _pytest(probe, "--tier", tier) for tier in ("core", "full", "all")}
    assert "2 passed, 2 deselected" in runs["core"].stdout, runs["core"].stdout
    assert "2 passed, 2 deselected" in runs["full"].stdout, runs["full"].stdout
    assert "4 passed" in runs["all"].stdout, runs["all"].stdout
