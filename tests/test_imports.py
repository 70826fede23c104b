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


def folder_of(module: str) -> str:
    """tunekit.data.cache -> tunekit.data; a module directly under tunekit/ stands for itself."""
    parts = module.split(".")
    return ".".join(parts[:2])


def folder_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    folders: dict[str, set[str]] = {}
    for module, targets in graph.items():
        edges = folders.setdefault(folder_of(module), set())
        edges |= {folder_of(t) for t in targets} - {folder_of(module)}
    for targets in list(folders.values()):
        for target in targets:
            folders.setdefault(target, set())
    return folders


def test_folder_graph_merges_modules():
    graph = {"tunekit.a.x": {"tunekit.b.y"}, "tunekit.b.y": {"tunekit.a.z"}, "tunekit.a.z": set()}
    assert find_circle(folder_graph(graph)) == ["tunekit.a", "tunekit.b", "tunekit.a"]


def test_no_circles_between_folders():
    folders = folder_graph(import_graph())
    assert {"tunekit.data", "tunekit.runs", "tunekit.serving", "tunekit.rl", "tunekit.methods"} <= set(folders)
    assert find_circle(folders) == []


def test_methods_and_rl_stay_in_their_layers():
    """A command's module imports no other command's module (shared pieces live lower), and nothing
    in rl/ imports methods/. methods/__init__ is the one place that lists every method."""
    graph = import_graph()
    wrong = []
    for module, targets in graph.items():
        if module.startswith("tunekit.methods."):
            wrong += [(module, t) for t in targets if t.startswith("tunekit.methods.")]
        if module.startswith("tunekit.rl"):
            wrong += [(module, t) for t in targets if t.startswith("tunekit.methods")]
    assert wrong == []
