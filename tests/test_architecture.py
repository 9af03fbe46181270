"""The structure stays easy to see: imports flow one way between packages, no module imports
itself in a circle, and no module grows past about 350 lines."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "metacl"

ALLOWED = {  # package -> the metacl packages it may import (besides itself)
    "core": set(),
    "models": {"core", "scenes"},  # scenes: the feature vocabulary (scenes/features.py) only
    "scenes": {"core"},
    "mastery": {"core", "models", "scenes"},
    "meta": {"core", "models"},
    "launch": {"core"},
    "cli": {"core", "scenes", "mastery", "meta", "launch"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The metacl modules `path` imports (a `from X import name` counts X.name when that is a
    module, else X)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in MODULES else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.startswith("metacl") and m in MODULES and m != name}


FILES = sorted(PACKAGE.rglob("*.py"))
MODULES = {module_name(path) for path in FILES}
GRAPH = {module_name(path): imports(path) for path in FILES}


def top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_packages_import_only_the_layers_below():
    wrong = [
        f"{m} imports {t}"
        for m, targets in GRAPH.items()
        for t in targets
        if top(m) in ALLOWED and top(t) not in (top(m), "") and top(t) not in ALLOWED[top(m)]
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    """Tarjan's strongly connected components over the module graph: all of size one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in GRAPH:
        if module not in index:
            visit(module)
    # a package __init__ that re-exports its own submodules is not a cycle worth a test
    cycles = [c for c in cycles if not all(m.startswith(c[0]) for m in c)]
    assert not cycles, cycles


def test_modules_stay_short():
    long = {module_name(p): n for p in FILES if (n := len(p.read_text().splitlines())) > 380}
    assert not long, long
