"""The architecture stays honest: ckptsync's modules form layers without cycles, stay small,
compose objects instead of stacking project base classes, keep a leading underscore private
to its module, keep backend checks in the backend classes, and document their packages.

Everything is read from the source with ``ast`` (nothing is imported), so a failure names the
file and line. An import inside a function counts as much as one at the top of a module (it
runs as soon as the function does); ``if TYPE_CHECKING:`` imports, which never run, are left
out of the layering rules but not of the cycle check (a circle that only the type checker
follows is still two modules that cannot be read apart).
"""

from __future__ import annotations

import ast
import itertools
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.paths import REPO, child_env

pytestmark = pytest.mark.core

PACKAGE = REPO / "ckptsync"
MAX_LINES = 450
#: Packages that hold the client, the remote store, transfers, the zero-code model and the
#: daemon: the core modules directly in ckptsync/ are the layer below them and must not import
#: them.
UPPER = ("ckptsync.client", "ckptsync.remote", "ckptsync.transfer", "ckptsync.zerocode",
         "ckptsync.daemon")
#: The zero-code model: below the daemon, the integrations and the command line (which all
#: import it), above the core modules (manifest, local store), the only ckptsync modules it
#: may import besides its own.
ZEROCODE = "ckptsync.zerocode"
#: Core-level files that may import the packages above: entry points, and shims that keep an
#: old import path working.
UPPER_ALLOWED = {"__init__.py", "__main__.py", "cli.py", "demo.py", "watch.py"}
#: The backend classes, the one place that knows backends apart (and each one's private API),
#: and ownership.py's URL parsing.
BACKENDS_PACKAGE = "ckptsync/remote/backends/"
BACKEND_CHECKS_ALLOWED = {"ckptsync/ownership.py"}


@dataclass(frozen=True)
class Import:
    """One import statement of ``source`` that names a ckptsync module (``target``)."""

    source: str
    target: str
    where: str  # "ckptsync/x.py:12"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST, type_only: bool = False
                  ) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, except under ``if TYPE_CHECKING:`` (unless
    ``type_only``)."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node) and not type_only:
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _existing(name: str, modules: dict[str, Path]) -> str | None:
    """``name`` or its longest prefix that is a ckptsync module."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _imports(modules: dict[str, Path], type_only: bool = False) -> list[Import]:
    out: list[Import] = []
    for source, path in modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in _import_nodes(tree, type_only):
            where = f"{_rel(path)}:{node.lineno}"
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base = source.split(".")
                    drop = node.level - 1 if is_package else node.level
                    base = base[: len(base) - drop] if drop else base
                    base_name = ".".join([*base, node.module] if node.module else base)
                else:
                    base_name = node.module or ""
                for alias in node.names:
                    sub = f"{base_name}.{alias.name}"
                    targets.append(sub if sub in modules else base_name)
            for t in targets:
                if t == "ckptsync" or t.startswith("ckptsync."):
                    found = _existing(t, modules)
                    if found is not None and found != source:
                        out.append(Import(source, found, where))
    return out


def _cycles(imports: list[Import]) -> list[list[str]]:
    """One cycle (as a closed path of modules) for every strongly connected component with
    more than one module (Tarjan's algorithm)."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        graph.setdefault(imp.source, set()).add(imp.target)
        graph.setdefault(imp.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    sccs: list[set[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.add(w)
                if w == v:
                    break
            if len(scc) > 1:
                sccs.append(scc)

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for v in sorted(graph):
            if v not in index:
                strongconnect(v)
    finally:
        sys.setrecursionlimit(limit)

    cycles = []
    for scc in sccs:
        start = min(scc)
        # Shortest path back to start inside the component (breadth first).
        prev: dict[str, str] = {}
        frontier = [start]
        found = None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & scc):
                    if w == start:
                        found = v
                        break
                    if w not in prev:
                        prev[w] = v
                        nxt.append(w)
                if found is not None:
                    break
            frontier = nxt
        assert found is not None
        path = [found]
        while path[-1] != start:
            path.append(prev[path[-1]])
        cycles.append([*reversed(path), start])
    return cycles


def test_no_import_cycle_among_ckptsync_modules() -> None:
    imports = _imports(_modules(), type_only=True)
    where = {(i.source, i.target): i.where for i in imports}
    problems = []
    for cycle in _cycles(imports):
        steps = [f"{a} -> {b} ({where[(a, b)]})" for a, b in itertools.pairwise(cycle)]
        problems.append("import cycle:\n    " + "\n    ".join(steps))
    assert not problems, "\n".join(problems)


def test_no_ckptsync_module_is_over_450_lines() -> None:
    """One concept per file: a module over the limit is split by concern, not where a line
    limit hits."""
    sizes = {_rel(p): len(p.read_text().splitlines()) for p in _modules().values()}
    over = {f: n for f, n in sizes.items() if n > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines (split one by concern): {over}"


def _ckptsync_names(tree: ast.Module) -> tuple[set[str], set[str]]:
    """The class names a module defines or imports from ckptsync, and the names it binds to
    ckptsync modules (``import ckptsync.x as y``, ``from ckptsync import x``)."""
    classes = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
    modules: set[str] = set()
    for node in _import_nodes(tree, type_only=True):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ckptsync") \
                and not node.level:
            classes |= {a.asname or a.name for a in node.names}
            modules |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level:
            classes |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            modules |= {(a.asname or a.name).split(".")[0] for a in node.names
                        if a.name.startswith("ckptsync")}
    return classes, modules


def test_no_class_has_two_ckptsync_base_classes() -> None:
    """Compose, do not stack mixins (DESIGN.md, "Shape of the code"): a class may extend one
    ckptsync class (and builtins or library classes besides, as ``ConfigError(CkptSyncError,
    ValueError)`` does)."""
    defined = {n.name for p in _modules().values()
               for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.ClassDef)}
    problems = []
    for path in _modules().values():
        tree = ast.parse(path.read_text(), filename=str(path))
        names, modules = _ckptsync_names(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef):
                continue
            ours = []
            for base in node.bases:
                if isinstance(base, ast.Name) and base.id in names and base.id in defined:
                    ours.append(base.id)
                elif isinstance(base, ast.Attribute) and base.attr in defined:
                    root = base.value
                    while isinstance(root, ast.Attribute):
                        root = root.value
                    if isinstance(root, ast.Name) and root.id in modules:
                        ours.append(base.attr)
            if len(ours) > 1:
                problems.append(f"{_rel(path)}:{node.lineno}: class {node.name} extends "
                                f"{len(ours)} ckptsync classes ({', '.join(ours)}): compose "
                                "objects that each own their state instead")
    assert not problems, "\n".join(problems)


def test_core_modules_do_not_import_client_remote_transfer_zerocode_or_daemon() -> None:
    modules = _modules()
    problems = set()
    for imp in _imports(modules):
        path = modules[imp.source]
        if path.parent != PACKAGE or path.name in UPPER_ALLOWED:
            continue
        if any(imp.target == u or imp.target.startswith(u + ".") for u in UPPER):
            problems.add(f"{imp.where}: core module {imp.source} imports {imp.target}")
    assert not problems, "\n".join(sorted(problems))


def test_zerocode_imports_only_itself_and_core_modules() -> None:
    """Below the daemon and the integrations, above manifest/local: a zero-code module imports
    no upper package (client, remote, transfer, daemon, integrations) and no entry point."""
    modules = _modules()
    problems = set()
    for imp in _imports(modules):
        if not (imp.source == ZEROCODE or imp.source.startswith(ZEROCODE + ".")):
            continue
        if imp.target == ZEROCODE or imp.target.startswith(ZEROCODE + "."):
            continue
        path = modules[imp.target]
        if path.parent != PACKAGE or path.name in UPPER_ALLOWED:
            problems.add(f"{imp.where}: zero-code module {imp.source} imports {imp.target}")
    assert not problems, "\n".join(sorted(problems))


def test_no_module_imports_another_modules_private_name() -> None:
    """A leading underscore means private to its module (``__version__`` and the like are
    not private)."""
    modules = _modules()
    problems = []
    for path in modules.values():
        for node in _import_nodes(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith(
                    "ckptsync"):
                continue
            for alias in node.names:
                private = alias.name.startswith("_") and not alias.name.endswith("__")
                if private:
                    problems.append(f"{_rel(path)}:{node.lineno}: imports {alias.name} from "
                                    f"{node.module}")
    assert not problems, "\n".join(problems)


def _backend_checks(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """``scheme ==``/``!=``/``in``, ``type(fs).__name__`` and ``getattr(fs, ...)`` /
    ``hasattr(fs, ...)`` (of a filesystem: a name or attribute ``fs`` or ``*_fs``, not an
    exception's), ``type(x) is``/``is not`` and ``isinstance(x, LocalFileSystem)``."""

    def name_of(node: ast.AST) -> str:
        return node.id if isinstance(node, ast.Name) else (
            node.attr if isinstance(node, ast.Attribute) else "")

    def named(node: ast.AST, name: str) -> bool:
        return name_of(node) == name

    def a_filesystem(node: ast.AST) -> bool:
        n = name_of(node)
        return n == "fs" or n.endswith("_fs")

    def a_type_call(node: ast.AST) -> bool:
        return (isinstance(node, ast.Call) and named(node.func, "type")
                and len(node.args) == 1)

    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and named(node.left, "scheme") and any(
                isinstance(op, ast.Eq | ast.NotEq | ast.In | ast.NotIn) for op in node.ops):
            yield node.lineno, "scheme compared"
        elif isinstance(node, ast.Compare) and any(
                isinstance(op, ast.Is | ast.IsNot) for op in node.ops) and any(
                a_type_call(x) for x in (node.left, *node.comparators)):
            yield node.lineno, "type(...) is"
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "hasattr") and node.args
              and a_filesystem(node.args[0])):
            yield node.lineno, f"{node.func.id}(fs, ...)"
        elif (isinstance(node, ast.Attribute) and node.attr == "__name__"
              and isinstance(node.value, ast.Call) and named(node.value.func, "type")
              and len(node.value.args) == 1 and a_filesystem(node.value.args[0])):
            yield node.lineno, "type(...).__name__"
        elif (isinstance(node, ast.Call) and named(node.func, "isinstance")
              and len(node.args) == 2):
            kinds = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
            if any(named(k, "LocalFileSystem") for k in kinds):
                yield node.lineno, "isinstance(..., LocalFileSystem)"


def test_backend_checks_only_in_the_backend_classes() -> None:
    """What a backend is, and every private API of its library, is its class's business."""
    problems = []
    for path in _modules().values():
        rel = _rel(path)
        if rel in BACKEND_CHECKS_ALLOWED or rel.startswith(BACKENDS_PACKAGE):
            continue
        for line, what in _backend_checks(ast.parse(path.read_text(), filename=str(path))):
            problems.append(f"{rel}:{line}: {what} (belongs in a class of {BACKENDS_PACKAGE})")
    assert not problems, "\n".join(problems)


#: Where ckptsync writes to stdout or stderr itself: the one output module. (The packaged
#: example trainer is a user's script; the demo narrates between its progress bars through
#: tqdm; logging goes through handlers.)
PRINTS_ALLOWED = {"ckptsync/output.py"}
PRINTS_ALLOWED_UNDER = "ckptsync/examples/"


def _prints(tree: ast.AST) -> Iterator[int]:
    """Lines of ``print(...)`` and ``sys.stdout/stderr.write(...)`` calls."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        printed = isinstance(f, ast.Name) and f.id == "print"
        written = (isinstance(f, ast.Attribute) and f.attr == "write"
                   and isinstance(f.value, ast.Attribute) and f.value.attr in ("stdout", "stderr")
                   and isinstance(f.value.value, ast.Name) and f.value.value.id == "sys")
        if printed or written:
            yield node.lineno


def test_every_command_prints_through_the_output_module() -> None:
    problems = []
    for path in _modules().values():
        rel = _rel(path)
        if rel in PRINTS_ALLOWED or rel.startswith(PRINTS_ALLOWED_UNDER):
            continue
        for line in _prints(ast.parse(path.read_text(), filename=str(path))):
            problems.append(f"{rel}:{line}: prints (ckptsync/output.py writes every line)")
    assert not problems, "\n".join(problems)


def test_every_package_init_has_a_docstring_of_two_lines_or_more() -> None:
    problems = []
    for init in sorted(PACKAGE.rglob("__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        if len(doc.strip().splitlines()) < 2:
            problems.append(f"{_rel(init)}: docstring of {len(doc.strip().splitlines())} line(s)")
    assert not problems, "\n".join(problems)


def test_import_ckptsync_does_not_import_torch() -> None:
    script = ("import sys\nimport ckptsync\n"
              "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    proc = subprocess.run([sys.executable, "-c", script], env=child_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", f"import ckptsync imported {proc.stdout.strip()}"
