"""The engine does not reach into the methods: no module of the package outside ``mergebench.methods`` imports
it (the registry finds the built-ins by the module name it imports at discovery, not by an import statement)."""

from __future__ import annotations

import ast
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return names


def test_no_engine_module_imports_a_method():
    modules = sorted(BENCH.rglob("*.py"))
    assert len(modules) > 20 and any("transfer" in p.name for p in modules)
    offending = {str(p.relative_to(BENCH)): name for p in modules for name in _imports(p)
                 if name == "mergebench.methods" or name.startswith("mergebench.methods.")}
    assert not offending, f"engine modules import methods: {offending}"


def test_the_check_sees_an_import_of_a_method(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from mergebench.methods.ties import trim_top_k\n")
    assert "mergebench.methods.ties" in _imports(probe)
