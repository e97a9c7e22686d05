"""The shape of the source tree, checked: the daemon never imports the simulation, no module of
either imports itself back through others (lazy imports inside functions count too), and no file
grows past what one reader can hold (spotguard/ 600 lines, the simulation 800)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"spotguard": ROOT / "spotguard", "spotguard_sim": ROOT / "sim" / "spotguard_sim"}
MAX_LINES = {"spotguard": 600, "spotguard_sim": 800}


def _module_name(package: str, path: Path) -> str:
    parts = list(path.relative_to(PACKAGES[package]).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def _modules() -> dict[str, Path]:
    return {_module_name(package, path): path
            for package, folder in PACKAGES.items() for path in sorted(folder.rglob("*.py"))}


def _under_type_checking(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Every project module `module` imports, at any depth of its code (not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if _under_type_checking(node, parents):
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from pkg import sub` imports the submodule when there is one, else a name of pkg.
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in known and name != module)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


MODULES = _modules()
GRAPH = {name: _imports(name, path, set(MODULES)) for name, path in MODULES.items()}


def test_the_graph_sees_imports_inside_functions() -> None:
    # The CLI imports each command's module inside the function that runs it.
    assert "spotguard_sim.bench" in GRAPH["spotguard_sim.cli"]
    assert "spotguard.kube" in GRAPH["spotguard.daemon"]


def test_the_daemon_never_imports_the_simulation() -> None:
    leaks = {module: sorted(t for t in targets if t.startswith("spotguard_sim"))
             for module, targets in GRAPH.items() if module.startswith("spotguard.")}
    assert not {m: t for m, t in leaks.items() if t}


def test_no_import_circles() -> None:
    assert _cycles(GRAPH) == []


def test_the_cycle_finder_finds_a_circle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_files_stay_readable(module: str) -> None:
    lines = len(MODULES[module].read_text().splitlines())
    limit = MAX_LINES[module.split(".")[0]]
    assert lines <= limit, f"{MODULES[module].relative_to(ROOT)} has {lines} lines (limit {limit}): split it"
