"""What a new user reads is true and the same everywhere: one install line in the
README, the docs, the Colab notebook, the systemd unit, the Dockerfile and ``ckptsync --help``;
no placeholder URL anywhere; a README for users, under 150 lines; the one exit-code table, the
same in the README, ``--help`` and the code; the demo's hint when torch is missing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from ckptsync import cli
from tests.support.paths import REPO

pytestmark = pytest.mark.core

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
EXTRAS = set(PROJECT["optional-dependencies"])
WHEEL = f"ckptsync-{PROJECT['version']}-py3-none-any.whl"
README = REPO / "README.md"
NOTEBOOK = REPO / "deploy" / "colab" / "ckptsync_colab.ipynb"

#: The one form of the install line: the package by name, extras quoted (zsh needs the quotes).
LINE = re.compile(r'pip install "ckptsync\[([a-z0-9,]+)\]"')


def _notebook_text() -> str:
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    return "\n".join("".join(c["source"]) for c in cells)


def _help() -> str:
    return cli.build_parser().format_help()


def _places() -> dict[str, str]:
    """Where a user reads how to install ckptsync."""
    places = {str(p.relative_to(REPO)): p.read_text()
              for p in [README, *sorted((REPO / "docs").glob("*.md")),
                        REPO / "deploy" / "systemd" / "ckptsync-watch.service",
                        REPO / "deploy" / "container" / "Dockerfile"]}
    places["deploy/colab (notebook)"] = _notebook_text()
    places["ckptsync --help"] = _help()
    return places


#: The other installs the docs may show: from a clone, a wheel built from it (by its exact
#: name), the image's source tree, the development requirements.
OTHER_INSTALLS = [
    re.compile(r'pip install "\.\[([a-z0-9,]+)\]"'),
    re.compile(rf'pip install "(?:dist|/content)/{re.escape(WHEEL)}\[([a-z0-9,]+)\]"'),
    re.compile(r'pip install -c /src/constraints\.txt "ckptsync\[([a-z0-9,]+)\] @ file:///src"'),
    re.compile(r"pip install -r requirements/\S+()"),
]


def test_every_install_line_is_the_package_by_name_with_known_extras() -> None:
    seen = 0
    for where, text in _places().items():
        for m in re.finditer(r"pip install[^\n`]*", text):
            cmd = m.group(0).split("  #")[0].strip()
            if cmd == "pip install":  # the command named in prose
                continue
            match = LINE.match(cmd) or next(
                (o for p in OTHER_INSTALLS if (o := p.match(cmd))), None)
            assert match, f"{where}: {cmd!r} is not `pip install \"ckptsync[EXTRAS]\"`"
            extras = {e for e in match.group(1).split(",") if e}
            assert extras <= EXTRAS, f"{where}: {cmd!r} names unknown extras {extras - EXTRAS}"
            seen += 1
    assert seen >= 8


def test_the_readme_line_is_the_help_line_and_the_notebook_installs_by_name() -> None:
    readme = LINE.search(README.read_text())
    assert readme and readme.group(0) == 'pip install "ckptsync[torch,s3]"'
    assert readme.group(0) in _help()
    assert 'pip install "ckptsync[s3]"' in _help() and 'pip install "ckptsync[s3]"' in (
        REPO / "deploy" / "systemd" / "ckptsync-watch.service").read_text()
    code = "".join(json.loads(NOTEBOOK.read_text())["cells"][1]["source"])
    assert '"ckptsync[torch,s3,gcs,gdrive]"' in code and '"pip", "install"' in code
    assert 'pip install "ckptsync[torch,s3,gcs,gdrive]"' in _notebook_text()


def test_no_placeholder_url_anywhere() -> None:
    """``grep -rn "YOUR-ORG\\|example.com/your" .`` finds nothing but this test."""
    listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout
    files = [name for name in listing.split("\0") if name]
    assert len(files) > 100
    me = Path(__file__).resolve()
    hits = []
    for name in files:
        path = REPO / name
        if path.resolve() == me or not path.is_file():
            continue
        text = path.read_bytes().decode(errors="replace")
        hits += [f"{name}: {m.group(0)}"
                 for m in re.finditer(r"YOUR-ORG|example\.com/your", text)]
    assert not hits, hits


def test_docs_name_the_wheel_python_m_build_makes() -> None:
    texts = [README.read_text(), _notebook_text(),
             *(p.read_text() for p in (REPO / "docs").glob("*.md"))]
    named = {m for t in texts for m in re.findall(r"ckptsync-\d[^\s/\"`\[]*\.whl", t)}
    assert named == {WHEEL}, f"the docs name {named}; python -m build makes {WHEEL}"


def test_the_readme_is_short_and_for_users() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 150
    first_screen = "\n".join(text.splitlines()[:40])
    assert "## Install" in first_screen and "make " not in first_screen
    assert "docs/development.md" in text  # where `make test` and `make demo` went
    assert "```python" in text and "Checkpointer(" in text and "ckptsync demo" in text


def _readme_exit_codes() -> dict[int, str]:
    text = README.read_text()
    table = text[text.index("Exit codes, the same for every command"):]
    table = table[:table.index("\n\n", table.index("| code |"))]
    return {int(code): meaning for code, meaning in re.findall(r"^\| (\d+) \| (.+) \|$", table,
                                                                 flags=re.M)}


def test_one_exit_code_table_in_the_readme_the_help_and_the_code() -> None:
    from ckptsync.daemon import runtime

    codes = {0, cli.EXIT_FAILED, cli.EXIT_USAGE, cli.EXIT_DENIED, cli.EXIT_FELL_BACK,
             cli.EXIT_NOTHING_TO_DO, cli.EXIT_INTERRUPTED, cli.EXIT_PIPE}
    assert set(_readme_exit_codes()) == codes
    epilog = _help().split("exit codes:", 1)[1]
    assert {int(c) for c in re.findall(r"^  (\d+) ", epilog, flags=re.M)} == codes
    daemon = {runtime.EXIT_OK, runtime.EXIT_FAILED, runtime.EXIT_CONFIG, runtime.EXIT_REMOTE}
    assert daemon <= codes
    second = [p.name for p in (REPO / "docs").glob("*.md")
              if re.search(r"^\| 130 \|", p.read_text(), flags=re.M)]
    assert not second, f"a second exit-code table in {second}: link to the README's"


def test_the_demo_says_how_to_install_torch_when_it_is_missing(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['torch'] = None\n"  # None: this python cannot import torch
            "from ckptsync.cli import main\n"
            "raise SystemExit(main(['demo', '--out', sys.argv[1]]))\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True,
                       text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == cli.EXIT_USAGE, r.stderr
    assert "torch" in r.stderr and sys.executable in r.stderr
    assert 'install torch first, the way you normally do, then pip install ' \
           '"ckptsync[torch,demo]"' in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()
