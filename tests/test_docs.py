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


# ------------------------------------------------------------------ the README (an entry point) and the docs site
def _shell_commands(text: str, program: str) -> list[list[str]]:
    """The ``program ...`` command lines of a Markdown text's bash blocks, continuation lines joined, comments cut."""
    import shlex

    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == [program]:
                commands.append(words[1:])
    return commands


def _markdown_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_every_documented_command_is_one_the_cli_and_the_makefile_accept():
    from mergebench.cli import build_parser

    targets = set(re.findall(r"^([\w.-]+(?: [\w.-]+)*):", (ROOT / "Makefile").read_text(), re.M))
    targets = {t for group in targets for t in group.split()} | {f"{a}-artifact" for a in
                                                                 ("mini8", "micro", "mini8-lora", "micro-lora")}
    seen = 0
    for page in _markdown_pages():
        text = page.read_text()
        for argv in _shell_commands(text, "mergebench"):
            try:
                build_parser().parse_args(argv)
            except SystemExit:
                raise AssertionError(f"{page.relative_to(ROOT)}: `mergebench {' '.join(argv)}` is not a valid command")
            seen += 1
        for argv in _shell_commands(text, "make"):
            assert set(argv) <= targets, f"{page.relative_to(ROOT)}: `make {' '.join(argv)}`: no such target"
    assert seen > 40  # the pages do document commands: the check is not vacuous


def test_readme_is_an_entry_point_whose_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    # the two commands, and CI runs the same test command before building the site
    assert ["demo"] in _shell_commands(readme, "make") and ["test"] in _shell_commands(readme, "make")
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert ci.index("make test") < ci.index("make docs-site")
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        if not re.match(r"[a-z]+://", target):
            assert (ROOT / target).exists(), f"README links to {target}, which does not exist"


def test_readme_method_is_the_registered_task_arithmetic():
    import inspect

    from mergebench.registry import get_method

    readme = (ROOT / "README.md").read_text()
    shown = readme.split("## A method", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert shown == inspect.getsource(get_method("task_arithmetic").fn)


def _table_rows(text: str) -> dict[str, dict[str, str]]:
    """{method: {column: cell}} of the first Markdown table whose header starts with `Method`."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[0] == "Method"
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != len(header):
            break
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def test_readme_results_are_the_committed_leaderboards_top_rows():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Results on mini8", 1)[1].split("\n## ", 1)[0]
    shown = _table_rows(section)
    board = (ROOT / "results" / "mini8" / "LEADERBOARD.md").read_text()
    committed = _table_rows(board)
    assert list(shown) == list(committed)[:len(shown)] and len(shown) >= 5
    for method, cells in shown.items():
        for column, value in cells.items():
            assert committed[method][column] == value, (method, column)
    baselines = re.search(r"Further down the same table: (.*?)\.\s", section, re.S).group(1)
    assert len(re.findall(r"\d+\.\d", baselines)) == 3
    for name, avg in re.findall(r"([A-Z][\w ]+?) (\d+\.\d)\b", baselines):
        row = committed.get(name) or next(v for k, v in committed.items() if k.lower().startswith(name.lower()))
        assert row["Avg"] == avg, (name, avg)


def test_every_docs_page_has_a_place_in_the_site():
    import yaml

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def pages(nav):
        for item in nav:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            yield from pages(value) if isinstance(value, list) else [value]

    listed = list(pages(config["nav"]))
    in_nav = set(listed)
    assert len(listed) == len(in_nav), f"a page is twice in mkdocs.yml's nav: {sorted(listed)}"
    top_level = {p.name for p in (ROOT / "docs").glob("*.md")} | {
        f"{d.name}/README.md" for d in (ROOT / "docs").iterdir() if (d / "README.md").exists()}
    assert top_level <= in_nav, f"pages missing from mkdocs.yml's nav: {sorted(top_level - in_nav)}"
    assert all((ROOT / "docs" / page).exists() for page in in_nav)
