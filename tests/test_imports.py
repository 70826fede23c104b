"""The import graph of the package has no circles, counting the imports inside functions too (they
are how a command avoids paying for the others' libraries, not a way around a circle)."""

from __future__ import annotations

import ast

from conftest import ROOT


def import_graph() -> dict[str, set[str]]:
    """Each tunekit module and the tunekit modules it imports (`from tunekit.methods import sft` is an
    import of tunekit.methods.sft)."""
    package = ROOT / "tunekit"
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in package.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tunekit"):
                edges |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                          for a in node.names}
            elif isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name.startswith("tunekit")}
        graph[name] = {e for e in edges if e in files and e != name}
    return graph


def find_circle(graph: dict[str, set[str]]) -> list[str]:
    """One circle of imports (first module repeated at the end), or [] when there is none."""
    state: dict[str, str] = {}  # "open" while on the path, "done" after

    def visit(module: str, path: list[str]) -> list[str]:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (circle := visit(target, [*path, target])):
                return circle
        state[module] = "done"
        return []

    for module in sorted(graph):
        if module not in state and (circle := visit(module, [module])):
            return circle
    return []


def test_find_circle_finds_one():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    graph = import_graph()
    assert "tunekit.config" in graph["tunekit.training"]  # the graph is read at all
    assert find_circle(graph) == []
