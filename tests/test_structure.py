"""The codebase's shape, checked: what a newcomer may rely on when changing it.

No import cycle between our modules; no long functions in the core; every graph name and every
preprocessing constant written once (in `plugins/blip/graphs.py`), so a rename cannot miss a copy.
"""

from __future__ import annotations

import ast
from pathlib import Path

from plugins.blip import graphs
from tests.conftest import REPO

PACKAGES = ("converter_core", "plugins", "benchmarks")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _top_level_imports(path: Path, known: set[str]) -> set[str]:
    """Modules of ours imported when `path` is imported: module level, not under TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    imported: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for child in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node]:
            if isinstance(child, ast.Import):
                imported |= {alias.name for alias in child.names}
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                imported.add(child.module)
                imported |= {f"{child.module}.{alias.name}" for alias in child.names}
    return {name for name in imported if name in known}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle a depth-first walk meets, as the chain of modules that closes it."""
    state: dict[str, str] = {}
    cycles: list[list[str]] = []

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for nxt in sorted(graph.get(name, ())):
            if state.get(nxt) == "open":
                cycles.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return cycles


def test_no_import_cycle_between_our_modules():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]  # the check can fail
    modules = _modules()
    graph = {name: _top_level_imports(path, set(modules)) - {name} for name, path in modules.items()}
    assert len(graph["converter_core.pipeline"]) >= 5  # the walk sees real edges
    assert not find_cycles(graph), f"import cycles: {find_cycles(graph)}"


def test_no_function_in_the_core_is_longer_than_50_lines():
    long = []
    for path in sorted((REPO / "converter_core").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length >= 50:
                    long.append(f"{path.name}:{node.name} ({length} lines)")
    assert not long, long


def _string_constants(path: Path) -> list[tuple[int, str]]:
    return [(node.lineno, node.value) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)]


def _float_constants(path: Path) -> set[float]:
    return {node.value for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, float)}


def test_graph_names_and_preprocessing_constants_are_defined_once():
    home = REPO / "plugins" / "blip" / "graphs.py"
    names = {*graphs.GRAPHS, graphs.PROMPT}
    constants = {*graphs.IMAGE_MEAN, *graphs.IMAGE_STD}
    copies = []
    for path in _modules().values():
        if path == home:
            continue
        copies += [f"{path.relative_to(REPO)}:{line} {value!r}" for line, value in _string_constants(path)
                   if value in names]
        copies += [f"{path.relative_to(REPO)}: {value!r}" for value in _float_constants(path) & constants]
    assert not copies, "write these through plugins.blip.graphs: " + "; ".join(copies)
