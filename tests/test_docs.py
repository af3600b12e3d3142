"""The docs cannot drift: the method pages match the registry, and the tutorial's plugin works."""

import re
import subprocess
import sys
from pathlib import Path

from mergebench import docs, registry
from mergebench.conformance import check_method
from mergebench.scaffold import new_method

ROOT = Path(__file__).resolve().parents[1]


def test_method_pages_are_up_to_date():
    stale = docs.stale(ROOT / "docs" / "methods")
    assert not stale, f"docs/methods is out of date ({', '.join(stale)}): run `mergebench docs --out docs/methods`"
    builtins = [n for n in registry.list_methods() if registry.get_method(n).source == "built-in"]
    index = (ROOT / "docs" / "methods" / "README.md").read_text()
    assert all(f"({n}.md)" in index for n in builtins)
    ta = (ROOT / "docs" / "methods" / "task_arithmetic.md").read_text()
    assert "arXiv 2212.04089" in ta and "| `scaling` | float | `0.3` |" in ta and "`nothing`" in ta


def test_docs_write_and_detect_drift(tmp_path):
    docs.write(tmp_path)
    assert docs.stale(tmp_path) == []
    page = tmp_path / "task_arithmetic.md"
    page.write_text(page.read_text().replace("`0.3`", "`0.4`"))
    (tmp_path / "removed_method.md").write_text(docs.HEADER + "old\n")
    assert docs.stale(tmp_path) == ["removed_method.md", "task_arithmetic.md"]
    docs.write(tmp_path)
    assert docs.stale(tmp_path) == [] and not (tmp_path / "removed_method.md").exists()


def test_tutorial_ends_in_a_working_plugin(tmp_path, monkeypatch, micro):
    text = (ROOT / "docs" / "writing-a-method.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    assert '"norm_balanced"' in code
    root = new_method("norm_balanced", tmp_path)
    (root / "mergebench_norm_balanced" / "method.py").write_text(code)
    out = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--target", str(tmp_path / "site"), str(root)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    sys.modules.pop("mergebench_norm_balanced.method", None)
    registry.discover_plugins(force=True)
    try:
        report = check_method("norm_balanced", suite=micro)
        assert report.ok, report.render()
    finally:
        registry.unregister_method("norm_balanced")
