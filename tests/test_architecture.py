"""Which dpm module may import which: read from the sources (function bodies included), so a
deferred import cannot hide an arrow. docs/design.md explains the layers."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import dpm

PACKAGE = Path(dpm.__file__).resolve().parent
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(path: Path) -> set[str]:
    return names_imported_by(path.read_text(), module_name(path), path.name == "__init__.py")


def names_imported_by(source: str, name: str, is_package: bool) -> set[str]:
    """Every module name an import statement anywhere in `source` (module `name`) names, relative
    ones resolved; `from a import b` counts `a.b` too when that is a dpm module."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in MODULES)
    return found


SOURCES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
MODULES = set(SOURCES)


def dpm_imports(name: str) -> set[str]:
    """The dpm modules `name` imports (a package import counts as its __init__)."""
    out = set()
    for imported in imported_names(SOURCES[name]):
        while imported and imported not in MODULES:  # dpm.x.y where y is a name, not a module
            imported = imported.rpartition(".")[0]
        if imported and imported != name and imported != "dpm":
            out.add(imported)
    return out


GRAPH = {name: dpm_imports(name) for name in MODULES}


def within(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


# (importer layer, forbidden layers, why)
RULES = [
    (
        "dpm.pruners",
        ("dpm.run", "dpm.cli", "dpm.stages", "dpm.report", "dpm.quickstart"),
        "algorithms know nothing of the runner, the command line, the stages or the report",
    ),
    (
        "dpm.torch_pruning",
        ("dpm.run", "dpm.cli", "dpm.stages", "dpm.report", "dpm.quickstart", "dpm.pruners", "dpm.train"),
        "the Torch-Pruning wrapper is a practitioner's library: dpm.core on Torch-Pruning, below the suite",
    ),
    ("dpm.models", ("dpm.pruners",), "models are built without pruners"),
    ("dpm.data", ("dpm.pruners",), "data is loaded without pruners"),
    ("dpm.train", ("dpm.run",), "the training loop is below the runner"),
    ("dpm.report", ("dpm.train", "dpm.run"), "the report reads records, it does not train or run"),
]


@pytest.mark.parametrize("importer,forbidden,why", RULES, ids=[r[0] for r in RULES])
def test_layer_rule(importer, forbidden, why):
    bad = sorted(
        f"{m} -> {i}" for m, imports in GRAPH.items() if within(m, importer) for i in imports if within(i, *forbidden)
    )
    assert not bad, f"{why}: {bad}"


def test_core_imports_only_torch_and_itself():
    allowed = set(sys.stdlib_module_names) | {"torch", "__future__"}
    bad = []
    for name, path in SOURCES.items():
        if not within(name, "dpm.core"):
            continue
        for imported in imported_names(path):
            root = imported.split(".")[0]
            if (root == "dpm" and not within(imported, "dpm.core")) or (root != "dpm" and root not in allowed):
                bad.append(f"{name} -> {imported}")
    assert not bad, f"dpm.core imports only torch, the standard library and itself: {sorted(bad)}"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_sees_a_cycle_through_three_modules():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles():
    # A package imports its submodules (its __init__ re-exports them); a submodule importing its
    # own package's __init__ for a sibling is not a cycle of concepts, so package -> member edges go.
    graph = {m: {i for i in imports if not within(i, m)} for m, imports in GRAPH.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# Modules still over the limit, each with the split that will bring it under (issue 22). The list
# only shrinks: a new long module fails, and so does a listed one that got short (take it off).
STILL_LONG: dict[str, str] = {}


def test_no_module_over_600_lines():
    lengths = {name: len(path.read_text().splitlines()) for name, path in SOURCES.items()}
    long = {name: n for name, n in lengths.items() if n > MAX_LINES}
    new = {name: n for name, n in long.items() if name not in STILL_LONG}
    assert not new, f"modules over {MAX_LINES} lines (one concept a module: split them): {new}"
    fixed = sorted(name for name in STILL_LONG if lengths.get(name, 0) <= MAX_LINES)
    assert not fixed, f"{fixed} are within {MAX_LINES} lines now: take them off STILL_LONG"


def deferred_imports_without_reason(source: str) -> list[int]:
    """Line numbers of imports inside functions that give no reason: each function's first deferred
    import carries a `# deferred: <why>` comment (the lines of one import block after it inherit it)."""
    lines = source.splitlines()
    bad = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        imports = sorted(
            n.lineno
            for n in ast.walk(fn)
            if isinstance(n, (ast.Import, ast.ImportFrom))
            and not any(
                n in ast.walk(f)
                for f in fn.body
                if f is not n and isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            )
        )
        if imports and "# deferred:" not in lines[imports[0] - 1]:
            bad.append(imports[0])
    return bad


def test_imports_are_at_module_top_or_say_why_they_wait():
    bad = {
        name: lines for name, path in SOURCES.items() if (lines := deferred_imports_without_reason(path.read_text()))
    }
    assert not bad, f"imports inside functions without a '# deferred: <why>' comment (module, lines): {bad}"


def test_the_deferred_import_rule_sees_a_bare_one():
    source = "def f():\n    import wandb\n    return wandb\n\ndef g():\n    import scipy  # deferred: slow\n"
    assert deferred_imports_without_reason(source) == [2]


def test_the_reader_sees_deferred_and_relative_imports():
    source = (
        "import torch\n"
        "def f():\n    from dpm.run import CHECKPOINT\n    return CHECKPOINT\n"
        "class C:\n    def g(self):\n        from ..report import format_runs\n"
        "        from . import rounds\n"
    )
    names = names_imported_by(source, "dpm.pruners.probe", is_package=False)
    assert {"torch", "dpm.run", "dpm.report", "dpm.pruners.rounds"} <= names
