"""The package's import graph, read from the source (every import, at a module's top or inside a function): no
import cycle among mergebench's modules (sweeps and executors included), and no module outside
``mergebench.methods`` imports a method (the registry finds the built-ins by the module name it imports at
discovery, not by an import statement)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"mergebench": ROOT / "bench", "mergebench.methods": ROOT / "methods"}


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
    assert "mergebench.engine.run" in graph["mergebench.cli.run"]  # imported inside a function (the CLI is lazy)
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_among_mergebench_modules():
    assert cycles(import_graph()) == []


def test_no_module_outside_the_methods_imports_a_method():
    graph = import_graph()
    assert {"mergebench.engine.run", "mergebench.engine.transfer", "mergebench.suites.diagnose"} <= set(graph)
    offending = {m: sorted(i for i in imported if i.startswith("mergebench.methods"))
                 for m, imported in graph.items() if not m.startswith("mergebench.methods")}
    assert {m: i for m, i in offending.items() if i} == {}
