"""The Python examples of the README (the quickstart) and of docs/ (Hugging Face Trainer,
Lightning, Accelerate, ...) run as written, and resume from the remote on a "fresh machine".

A ```python block in README.md or docs/*.md right after a line ``<!-- runnable: NAME -->``
(an HTML comment: GitHub and PyPI do not show it) is a complete script. It runs twice in a
sandbox, with the same substitution as the documents' shell commands
(``s3://my-bucket/`` -> ``file://<tmp>/bucket/``):

1. in ``machine-1/``: it trains, checkpoints and uploads; it must exit 0;
2. in a fresh empty ``machine-2/`` (nothing local survives, only the bucket): it must exit 0
   and print ``resumed from step N`` with N > 0, the line every example prints after it
   resumed, so that a user sees the resume happen.

A block marked this way that does not resume fails here; an integration with no marked block
fails ``test_every_integration_has_a_readme_example``; a ```python block with neither that
mark nor ``<!-- not runnable: WHY -->`` above it fails ``test_every_python_block_is_marked``,
so that no example silently stops running.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import REPO, child_env

pytestmark = pytest.mark.full

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MARK = re.compile(r"^<!-- runnable: ([\w-]+) -->\n```python\n(.*?)^```", re.S | re.M)


def readme_examples() -> dict[str, str]:
    """Every runnable example of the README and docs/, by name (names are unique)."""
    found = [m for path in DOCS for m in MARK.findall(path.read_text())]
    names = [name for name, _ in found]
    assert len(names) == len(set(names)), f"two examples share a name: {sorted(names)}"
    return dict(found)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_python_block_is_marked(path: Path) -> None:
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.strip() == "```python":
            above = lines[i - 1] if i else ""
            assert re.fullmatch(r"<!-- (runnable: [\w-]+|not runnable: .+) -->", above), (
                f"{path.name}:{i + 1}: a python block needs <!-- runnable: NAME --> (it is then "
                "run twice) or <!-- not runnable: WHY --> on the line above")


def test_the_readme_quickstart_is_runnable() -> None:
    assert "quickstart" in dict(MARK.findall((REPO / "README.md").read_text()))


def integrations() -> list[str]:
    pkg = REPO / "ckptsync" / "integrations"
    if not pkg.is_dir():
        return []
    modules = [p.stem for p in pkg.glob("*.py")]
    packages = [p.parent.name for p in pkg.glob("*/__init__.py")]
    return sorted(name for name in modules + packages if not name.startswith("_"))


@pytest.mark.core
def test_every_integration_has_a_readme_example() -> None:
    missing = [name for name in integrations() if name not in readme_examples()]
    assert not missing, f"ckptsync.integrations modules with no README example: {missing}"


def _run(script: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    cwd.mkdir()
    return subprocess.run([sys.executable, str(script)], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env=child_env(CKPTSYNC_CLOSE_TIMEOUT="60"))


@pytest.mark.parametrize("name", sorted(readme_examples()) or ["<none>"])
def test_readme_example_trains_then_resumes_on_a_fresh_machine(name: str,
                                                              tmp_path: Path) -> None:
    examples = readme_examples()
    if name == "<none>":
        assert not examples
        return
    body = examples[name].replace("s3://my-bucket/", f"file://{tmp_path}/bucket/")
    # Not NAME.py: the script's folder comes first on sys.path, and a transformers.py there
    # would shadow the transformers package it imports.
    script = tmp_path / f"readme_example_{name}.py"
    script.write_text(body)
    first = _run(script, tmp_path / "machine-1")
    assert first.returncode == 0, f"{name} run 1:\n{first.stdout}\n{first.stderr[-4000:]}"
    second = _run(script, tmp_path / "machine-2")
    assert second.returncode == 0, f"{name} run 2:\n{second.stdout}\n{second.stderr[-4000:]}"
    resumed = re.findall(r"resumed from step (\d+)", second.stdout)
    assert resumed and int(resumed[-1]) > 0, (
        f"{name}: the fresh machine did not print 'resumed from step N':\n{second.stdout}")
