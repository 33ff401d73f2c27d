"""The library's subpackages import one way: the package graph has no cycle, and io imports none of the others.

Read from the source with ast (every import, at module level or inside a function), so an import added
lazily to dodge a cycle counts as much as one at the top.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import moeforge

ROOT = Path(moeforge.__file__).parent
SUBPACKAGES = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file())


def _unit(module: str) -> str:
    """The subpackage a dotted module belongs to, or the top-level module's own name."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "moeforge":
            if node.module == "moeforge":
                found |= {f"moeforge.{alias.name}" for alias in node.names if alias.name != "__version__"}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "moeforge"}
    return found


def package_graph() -> dict[str, set[str]]:
    """unit -> the units it imports (a unit: a subpackage, or a top-level module)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        unit = parts[1]
        for module in _imports(path):
            if "." in module and _unit(module) != unit:
                graph[unit].add(_unit(module))
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path, or None."""
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_the_package_graph_has_no_cycle():
    assert _cycle(package_graph()) is None, " -> ".join(_cycle(package_graph()) or [])


def test_the_cycle_finder_finds_a_cycle():
    """The check above can fail: a two-way pair is reported."""
    found = _cycle({"io": set(), "plan": {"gates", "io"}, "gates": {"plan"}})
    assert found is not None and found[0] == found[-1] and set(found) == {"plan", "gates"}


def test_io_imports_only_errors():
    assert package_graph().get("io", set()) <= {"errors"}


def test_the_shared_engine_is_a_package_below_its_users():
    graph = package_graph()
    assert "runtime" in SUBPACKAGES
    for user in ("gates", "check"):
        assert "runtime" in graph[user]
    assert not graph["runtime"] & {"gates", "check", "build", "plan", "demo"}


def test_the_top_level_keeps_few_modules():
    modules = [p.name for p in ROOT.glob("*.py")]
    assert len(modules) <= 12, sorted(modules)


def test_every_name_the_rule_scripts_import_exists():
    """A rule script that imports a moved or removed name fails only when its job runs: caught here."""
    import importlib

    scripts = Path(__file__).resolve().parents[1] / "workflow" / "scripts"
    for script in sorted(scripts.glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "moeforge":
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{script.name}: {node.module} has no {alias.name}"
