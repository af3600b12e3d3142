"""The leaderboards rendered from a fixed set of records are byte-identical to the committed reference files.

``tests/data/leaderboard/records/`` holds complete mini8 records (every built-in and the example plugin, the
sequential runs), micro runs (a smoke-budget run, marked †, a failed run, a run over a subset of the tasks, an
unreadable file) and real-suite records of ViT-B/32 over the eight tasks (the published numbers beside them);
``tests/data/leaderboard/expected/`` the Markdown, CSV and LaTeX that ``render``, ``render_sequential`` and
``write`` gave for them, in the default view and in a budget view, and the sha256 of each HTML page. Regenerate the reference files (only
when an output is meant to change) with::

    .venv/bin/python tests/test_leaderboard_golden.py --regenerate
"""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "leaderboard"
SUITES = ("mini8", "micro", "real-ViT-B-32")
VIEW = {"max_added_params": "1%", "needs": "unlabeled", "sort": "Norm"}
TEXT = (".md", ".csv", ".tex", ".html")


def render_all(out: Path) -> dict[str, str]:
    """{relative path: text} of every output, rendered from ``records/`` (run inside ``DATA``, so the paths that
    the outputs mention are relative)."""
    from mergebench import leaderboard

    outputs: dict[str, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unreadable file is reported in the outputs themselves
        for suite in SUITES:
            for fmt in ("md", "csv", "latex", "html"):
                outputs[f"{suite}/render.{fmt}"] = leaderboard.render("records", suite, fmt)
                outputs[f"{suite}/view.{fmt}"] = leaderboard.render("records", suite, fmt, **VIEW)
            outputs[f"{suite}/plots.md"] = leaderboard.render("records", suite, "md", plots=True)
            for fmt in ("md", "csv", "latex"):
                outputs[f"{suite}/sequential.{fmt}"] = leaderboard.render_sequential("records", suite, fmt)
            for plots in (False, True):
                folder = out / suite / ("write-plots" if plots else "write")
                paths = leaderboard.write("records", suite, out_dir=folder, plots=plots)
                for path in sorted(paths.values()):
                    if path.suffix in TEXT:
                        outputs[f"{suite}/{folder.name}/{path.name}"] = path.read_bytes().decode("utf-8")
    return outputs


def stored(outputs: dict[str, str]) -> dict[str, str]:
    """What the reference files hold: the text, or for the HTML pages (their inline SVG plots are large) the
    sha256 of their bytes, in ``NAME.sha256``."""
    out = {}
    for name, text in outputs.items():
        if name.endswith(".html"):
            out[name + ".sha256"] = hashlib.sha256(text.encode("utf-8")).hexdigest() + "\n"
        else:
            out[name] = text
    return out


def _rendered(tmp: Path) -> dict[str, str]:
    cwd = os.getcwd()
    os.chdir(DATA)
    try:
        return render_all(tmp)
    finally:
        os.chdir(cwd)


def test_leaderboards_are_byte_identical_to_the_reference(tmp_path, repository_methods):
    rendered = stored(_rendered(tmp_path))
    expected = {str(p.relative_to(DATA / "expected")): p.read_bytes().decode("utf-8") for p in (DATA / "expected").rglob("*")
                if p.is_file()}
    assert sorted(rendered) == sorted(expected)
    different = [name for name in expected if rendered[name] != expected[name]]
    assert not different, f"outputs differ from tests/data/leaderboard/expected: {different}"


def test_the_reference_registry_holds_the_repository_methods_only(probe, request):
    """What the golden test renders with: a method another installed plugin registers is not in it, the example
    plugin (from its source) is."""
    probe("foreign_plugin_probe", paper={"title": "A probe"})(lambda ctx: None)
    methods = request.getfixturevalue("repository_methods")
    assert "foreign_plugin_probe" not in methods and "model_breadcrumbs" in methods and "ties_merging" in methods


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit(__doc__)
    import shutil
    import tempfile

    os.environ.setdefault("MERGEBENCH_QUIET", "1")
    with tempfile.TemporaryDirectory() as tmp:
        outputs = stored(_rendered(Path(tmp)))
    shutil.rmtree(DATA / "expected", ignore_errors=True)
    for name, text in outputs.items():
        path = DATA / "expected" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("utf-8"))
    print(f"wrote {len(outputs)} files to {DATA / 'expected'}")
