"""The README's exit-code table, the ``--help`` texts and the tests
agree. The README's table is :data:`ckptsync.exits.EXIT_TABLE` (each code, and each
command's own meaning where the README gives one), and every code in it is produced by a named
test that runs a real command and asserts that very code."""

from __future__ import annotations

import ast
import re

import pytest

from ckptsync.cli import build_parser
from ckptsync.exits import EXIT_TABLE, exit_help
from tests.support.paths import REPO

pytestmark = pytest.mark.core

#: code -> the tests that make a real command exit with it: (file, test, what it asserts).
PRODUCED: dict[int, list[tuple[str, str, str]]] = {
    0: [("tests/unit/test_cli.py", "test_push_ls_pull_verify_gc", "p.returncode == 0"),
        ("tests/integration/test_cli_status.py", "test_status_exit_codes_gate_a_script",
         "code == 0")],
    1: [("tests/integration/test_cli_typos.py", "test_a_typo_is_not_a_fresh_start",
         "p.returncode == 1"),
        ("tests/integration/test_cli_status.py", "test_status_exit_codes_gate_a_script",
         "code == 1"),
        ("tests/e2e/test_hangs.py",
         "test_ls_against_a_black_hole_ends_at_its_deadline_naming_the_endpoint",
         "r.returncode == 1")],
    2: [("tests/integration/test_cli_scripting.py",
         "test_usage_errors_exit_2_with_the_subcommands_usage", "p.returncode == 2"),
        ("tests/integration/test_cli_typos.py",
         "test_watch_refuses_a_missing_directory_and_status_of_one_exits_2",
         "p.returncode == 2")],
    3: [("tests/integration/test_cli_conventions.py", "test_wrong_credentials_exit_3",
         "p.returncode == EXIT_DENIED"),
        ("tests/integration/test_cli_status.py",
         "test_status_exit_3_when_the_last_attempt_failed", "code == 3")],
    4: [("tests/unit/test_cli.py", "test_verify_reports_corruption_with_nonzero_exit",
         "p.returncode == 4")],
    5: [("tests/integration/test_cli_typos.py",
         "test_a_run_that_exists_and_is_empty_is_a_fresh_start", "p.returncode == 5")],
    130: [("tests/integration/test_cli_conventions.py", "test_sigint_exits_130",
           "proc.returncode == EXIT_INTERRUPTED")],
    141: [("tests/integration/test_cli_pipes.py",
           "test_a_reader_that_closes_at_once_ends_every_command_with_141", "(141,)")],
}


def readme_table() -> dict[int, str]:
    text = (REPO / "README.md").read_text()
    table = text[text.index("Exit codes, the same for every command"):]
    table = table[:table.index("\n\n", table.index("| code |"))]
    return {int(c): m for c, m in re.findall(r"^\| (\d+) \| (.+) \|$", table, flags=re.M)}


def test_the_readme_table_is_the_code_table() -> None:
    readme = readme_table()
    assert list(readme) == [row.code for row in EXIT_TABLE]
    for row in EXIT_TABLE:
        for command in row.commands:
            if command in ("status", "watch"):  # the daemon's own meanings are spelled out
                assert f"`{command}" in readme[row.code], (row.code, command)
    assert "`status`: checkpoints pending" in readme[1]
    assert "`status`: the last upload attempt failed" in readme[3]


def test_every_help_lists_the_codes_of_the_table() -> None:
    codes = {row.code for row in EXIT_TABLE}
    listed = {int(c) for c in re.findall(r"^  (\d+) ", exit_help(), flags=re.M)}
    assert listed == codes
    assert build_parser().epilog is not None and exit_help() in build_parser().epilog


def _function_source(path: str, name: str) -> str:
    source = (REPO / path).read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return ast.get_source_segment(source, node) or ""
    raise AssertionError(f"{path} has no test {name}")


@pytest.mark.parametrize("code", [row.code for row in EXIT_TABLE])
def test_each_code_is_produced_by_a_test(code: int) -> None:
    assert code in readme_table()
    assert PRODUCED.get(code), f"no test produces exit code {code}"
    for path, name, asserted in PRODUCED[code]:
        body = _function_source(path, name)
        assert asserted in body, f"{path}::{name} does not assert {asserted!r}"
