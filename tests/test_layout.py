"""The package's import graph, read from the source (every import, at a module's top or inside a function): no
import cycle among mergebench's modules, and the harness never imports a method (``mergebench.methods``)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"mergebench": ROOT / "bench", "mergebench.methods": ROOT / "methods"}
# the rooms that run methods without knowing any: they reach methods through the registry only
HARNESS = ("mergebench.engine", "mergebench.api", "mergebench.sweeps", "mergebench.leaderboard")


def modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the mergebench modules it imports (``from mergebench.x import y`` counts as ``mergebench.x.y`` when
    that is a module, else as ``mergebench.x``)."""
    mods = modules()

    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in mods.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported |= {known(a.name) for a in node.names if a.name.startswith("mergebench")}
            elif isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level:
                    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    module = ".".join(base[:len(base) - node.level + 1] + ([module] if module else []))
                if module.startswith("mergebench"):
                    imported |= {f"{module}.{a.name}" if f"{module}.{a.name}" in mods else known(module)
                                 for a in node.names}
        graph[name] = imported - {None, name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_walk_sees_imports_inside_functions_and_finds_a_cycle():
    graph = import_graph()
    assert "mergebench.engine.execution" in graph["mergebench.engine.worker"]  # imported inside a function
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_among_mergebench_modules():
    assert cycles(import_graph()) == []


def test_the_harness_imports_no_method():
    graph = import_graph()
    offending = {m: sorted(i for i in imported if i.startswith("mergebench.methods"))
                 for m, imported in graph.items() if m.startswith(HARNESS)}
    assert {m: i for m, i in offending.items() if i} == {}
