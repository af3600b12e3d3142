"""The HTML leaderboard has every section of the Markdown one, and its tables sort by the numbers behind their labels
in a real browser (headless Chromium: Debian's package, which `make test` installs where it runs as root)."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest

from mergebench import leaderboard

RECORDS = Path(__file__).resolve().parent / "data" / "leaderboard" / "records"
SUITES = ("mini8", "micro", "real-ViT-B-32")


def _render(suite: str, fmt: str, **kw) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return leaderboard.render(RECORDS, suite, fmt, **kw)


@pytest.mark.parametrize("suite", SUITES)
def test_the_html_page_has_every_section_of_the_markdown(suite):
    md, page = _render(suite, "md", plots=True), _render(suite, "html")
    md_sections = [h.replace("&lt;", "<") for h in re.findall(r"^## (.*)$", md, re.M)]
    html_sections = [html.unescape(h) for h in re.findall(r"<h2>(.*?)</h2>", page)]
    assert md_sections == html_sections
    assert len(md_sections) >= 3
    for line in re.findall(r"^- (.*)$", md, re.M):  # every list item (sanity checks, failed runs, unreadable files)
        words = re.sub(r"[`*]", "", line.replace("&lt;", "<"))
        assert html.escape(words.split(": ")[-1]) in page or html.escape(words) in page, line


def _browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("no headless Chromium on this machine: `make test` installs Debian's chromium package where it runs "
                "as root with apt-get (apt-get install chromium)")


# Clicks headers as a user would and writes what each click left in the table into the page, for --dump-dom.
_PROBE = """
<script>
const table = document.querySelector('table.lb');
const header = name => [...table.tHead.rows[0].cells].find(th => th.textContent === name);
const column = name => [...table.tBodies[0].rows].map(r => r.cells[header(name).cellIndex].textContent);
const out = {};
for (const [name, clicks] of [['Added params', 1], ['Added params', 1], ['Method', 1], ['Avg', 2], ['Merge s', 1]]) {
  for (let i = 0; i < clicks; i++) header(name).click();
  out[name + ' ' + header(name).dataset.dir] = {shown: column(name), method: column('Method')};
}
const pre = document.createElement('pre');
pre.id = 'probe';
pre.textContent = JSON.stringify(out);
document.body.appendChild(pre);
</script>
"""


def test_the_html_table_sorts_by_the_numbers_behind_the_labels_in_a_browser(tmp_path):
    browser = _browser()
    page = _render("mini8", "html")
    probe = tmp_path / "leaderboard.html"
    probe.write_text(page.replace("</body></html>", _PROBE + "</body></html>"))
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", probe.as_uri()],
                          capture_output=True, text=True, timeout=180, env={**os.environ, "HOME": str(tmp_path)})
    found = re.search(r"<pre id=\"probe\">(.*?)</pre>", done.stdout, re.S)
    assert found, f"Chromium gave no result (exit {done.returncode}): {done.stderr[-2000:]}"
    clicks = json.loads(html.unescape(found.group(1)))

    df = leaderboard.Board(RECORDS, "mini8").table()[0]
    by_method = dict(zip(df["Method"], df["Added params"]))
    up = clicks["Added params asc"]
    counts = [by_method[m] for m in up["method"]]
    assert counts == sorted(counts), up["shown"]
    order = [label.split(" ")[0] for label in up["shown"]]
    assert order.index("12.4k") < order.index("8.63M") < order.index("11.10M"), order
    down = clicks["Added params desc"]
    assert [by_method[m] for m in down["method"]] == sorted(counts, reverse=True)
    assert down["shown"][0].startswith("11.10M")
    assert clicks["Method asc"]["shown"] == sorted(df["Method"], key=str.lower)
    avg = dict(zip(df["Method"], df["Avg"]))
    assert [avg[m] for m in clicks["Avg desc"]["method"]] == sorted(df["Avg"], reverse=True)
    merge = dict(zip(df["Method"], df["Merge s"]))
    assert [merge[m] for m in clicks["Merge s asc"]["method"]] == sorted(df["Merge s"])


# ------------------------------------------------------------------ the plots
def _pareto_axes(suite: str):
    from mergebench.leaderboard.figures import figures

    page = leaderboard.Page(leaderboard.Board(RECORDS, suite))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        figs = figures(page.df, suite)
    return figs, figs["pareto_params"].axes[0], len(page.df)


@pytest.mark.parametrize("suite", SUITES)
def test_plot_labels_do_not_overlap_each_other_or_the_legend(suite):
    figs, ax, rows = _pareto_axes(suite)
    fig = figs["pareto_params"]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    labels = [t for t in ax.texts if t.get_text()]
    assert len(labels) >= rows // 2  # one label per point (methods at the same point share one)
    boxes = [t.get_window_extent(renderer) for t in labels]
    inside, legend = ax.get_window_extent(renderer), ax.get_legend().get_window_extent(renderer)
    for i, (text, box) in enumerate(zip(labels, boxes)):
        assert box.x0 >= inside.x0 - 1 and box.x1 <= inside.x1 + 1 and box.y0 >= inside.y0 - 1 \
            and box.y1 <= inside.y1 + 1, f"{text.get_text()!r} leaves the axes"
        assert not box.overlaps(legend), f"the legend covers {text.get_text()!r}"
        for other, obox in zip(labels[i + 1:], boxes[i + 1:]):
            assert not box.overlaps(obox), f"{text.get_text()!r} overlaps {other.get_text()!r}"
    assert ax.yaxis.get_offset_text().get_text() == ""


def test_a_plot_whose_x_values_are_all_equal_is_not_drawn_and_the_page_says_why(tmp_path):
    figs, _, _ = _pareto_axes("mini8")  # every mini8 method costs 21.06 MMACs per image, to within 0.02%
    assert set(figs) == {"pareto_params"}
    stale = tmp_path / "accuracy_flops.png"
    stale.write_bytes(b"a plot of an earlier leaderboard")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paths = leaderboard.write(RECORDS, "mini8", out_dir=tmp_path)
    assert "accuracy_flops_png" not in paths and not stale.exists()
    why = "Accuracy vs MACs per image is not plotted: every method costs 21.06 MMACs per image (to within 0.02%)."
    md = paths["md"].read_text()
    assert why in md and "accuracy_flops" not in md
    assert why in paths["html"].read_text()


def test_accuracy_versus_macs_has_no_offset_axis():
    from mergebench.leaderboard.figures import figures

    page = leaderboard.Page(leaderboard.Board(RECORDS, "mini8"))
    df = page.df.copy()
    df["MMACs/img"] = [21.06 + 0.5 * i for i in range(len(df))]  # costs that differ by more than 1%
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fig = figures(df, "mini8")["accuracy_flops"]
    fig.canvas.draw()
    ax = fig.axes[0]
    assert ax.xaxis.get_offset_text().get_text() == "" and ax.yaxis.get_offset_text().get_text() == ""
    assert any(t.get_text().startswith("2") for t in ax.get_xticklabels())  # 21.06... as written, no "+2.1e1"
