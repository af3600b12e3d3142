"""The HTML leaderboard: one self-contained page with every section of the Markdown one, each table sortable (click
a header: by the number behind each label, "8.63M (700.00%)" by 8630000), and the plots as inline SVG."""

from __future__ import annotations

import html
import math
import numbers

import pandas as pd

from mergebench.leaderboard.formats import Format, Page, register_format
from mergebench.leaderboard.model import (
    SEQUENTIAL_NOTE, SPEED_NOTE, SUBSET_NOTE, column_notes, display, display_sequential, equal_costs_note,
    explain_columns, over_other_tasks, subset_label, table_note, task_columns,
)
from mergebench.leaderboard.figures import plot_svgs, sequential_svg

e = html.escape


@register_format("html")
class Html(Format):
    filename = "leaderboard.html"
    with_plots = True  # the page holds the plots: ``write`` makes it with them

    def render(self, page: Page) -> str:
        board, df = page.board, page.df
        parts = [f"<p>{e(explain_columns())} Pareto = &#9733; (bold rows) {e(column_notes()['Pareto'])}. "
                 "Click a column header to sort.</p>"]
        experts = board.experts()
        if experts:
            parts.append(f"<p>Experts: {e('; '.join(experts))}.</p>")
        if page.filters:
            parts.append(f"<p><b>View:</b> {e(page.filters)}</p>")
        tasks = task_columns(df)
        if len(board.task_sets) > 1 and not df.empty:
            parts.append(f"<p>Tasks: {e(', '.join(tasks))} ({len(tasks)}); runs over other task sets are in their own "
                         "tables below.</p>")
        if not df.empty:
            parts.append(table_html(display(df, tasks), df, note=table_note(df)))
            if board.notes:  # the folder's NOTES.md, as its text
                parts.append(f"<div class='notes'>{e(board.notes)}</div>")
            svgs = plot_svgs(df, page.suite)
            parts.append("<h2>Budgets</h2><div class='plots'>" + "".join(svgs.values()) + "</div>")
            if equal_costs_note(df):
                parts.append(f"<p>{e(equal_costs_note(df))}</p>")
        checks = board.sanity(df)
        if checks:
            parts.append("<h2>Benchmark sanity (from the measured numbers above)</h2>" + bullets(checks))
        for ts, sub in board.subset_tables(page.view):
            parts.append(f"<h2>Runs over {e(subset_label(ts, board.main_tasks))}</h2><p>{e(SUBSET_NOTE)}</p>"
                         + table_html(display(sub, task_columns(sub)), sub, note=table_note(sub)))
        published = board.published(df)
        if published is not None:
            title, note, table = published
            parts.append(f"<h2>{e(title)}</h2><p>{e(note)}</p>" + table_html(table, table, pareto=False))
        seq_df, seq_failed, seq_ok = page.sequential
        if not seq_df.empty or seq_failed:
            parts.append(f"<h2>Sequential protocol (continual merging)</h2><p>{e(SEQUENTIAL_NOTE)}</p>")
            if not seq_df.empty:
                parts.append(table_html(display_sequential(seq_df), seq_df, pareto=False, note=table_note(seq_df)))
                parts.append(f"<div class='plots'>{sequential_svg(seq_ok, page.suite)}</div>")
            if seq_failed:
                parts.append("<p>Failed sequential runs:</p>" + failed_html(seq_failed))
        speed_df, speed_failed = board.speed_table()
        if not speed_df.empty or speed_failed:
            parts.append(speed_html(speed_df, speed_failed, "h2", "Speed"))
        if page.failed:
            parts.append("<h2>Failed runs</h2>" + failed_html(page.failed, board.main_tasks))
        if board.unreadable:
            parts.append("<h2>Unreadable record files (skipped)</h2>"
                         + bullets(f"{p}: {why}" for p, why in board.unreadable))
        return html_page(f"mergebench leaderboard: {page.suite}", parts)

    def render_speed(self, df, failed: list[dict], suite: str) -> str:
        return html_page(f"mergebench speed: {suite}", [speed_html(df, failed)])


def html_page(title: str, parts: list[str]) -> str:
    """A self-contained page: ``title`` as its heading, then ``parts`` (HTML), and the script that sorts its tables."""
    head = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title>"
            "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}"
            "table{border-collapse:collapse;font-size:13px}th,td{padding:3px 8px;border-bottom:1px solid #ddd;"
            "text-align:right}td:first-child,th:first-child{text-align:left}th{cursor:pointer;background:#f4f4f4}"
            "th[data-dir=asc]::after{content:' \\25B2'}th[data-dir=desc]::after{content:' \\25BC'}"
            "tr.pareto td:first-child{font-weight:bold}.notes{white-space:pre-wrap}.plots svg{width:100%;max-width:1100px;height:auto}"
            "</style></head><body>")
    return "\n".join([head, f"<h1>{e(title)}</h1>", *parts, f"<script>{SORT_JS}</script></body></html>"]) + "\n"


# A header click sorts its table's rows by that column: a cell's key is the number in its data-v (the number behind a
# label such as "8.63M (700.00%)") or else its text, a number where the whole text is one; numbers come before text,
# and empty or NaN cells stay last in either direction.
SORT_JS = """
document.querySelectorAll('table.lb th').forEach(th => th.addEventListener('click', () => {
  const col = th.cellIndex, body = th.closest('table').tBodies[0];
  const asc = th.dataset.dir !== 'asc';
  th.closest('tr').querySelectorAll('th').forEach(h => delete h.dataset.dir);
  th.dataset.dir = asc ? 'asc' : 'desc';
  const key = td => {
    const v = (td.dataset.v ?? td.textContent).trim(), n = Number(v);
    if (v === '' || v === 'NaN') return [2, 0];
    return isNaN(n) ? [1, v.toLowerCase()] : [0, n];
  };
  [...body.rows].map(r => [key(r.cells[col]), r]).sort(([a], [b]) => a[0] - b[0]
      || (a[0] === 2 ? 0 : (a[1] < b[1] ? -1 : a[1] > b[1] ? 1 : 0) * (asc ? 1 : -1)))
    .forEach(([, r]) => body.appendChild(r));
}));
"""


def table_html(shown: pd.DataFrame, raw: pd.DataFrame, pareto: bool = True, note: str = "") -> str:
    """``shown`` (the cells as text) as a sortable table; a cell whose column ``raw`` holds a number carries it in
    ``data-v``, which the sort reads. With ``pareto``, the rows on the front are bold and their mark is a star."""
    cols = list(shown.columns)
    rows = []
    for i, row in shown.iterrows():
        cells = []
        for c in cols:
            value = raw.at[i, c] if c in raw.columns else None
            if c == "Pareto":
                text, value = ("&#9733;" if row[c] else ""), int(bool(raw.at[i, "Pareto"]))
            else:
                text = e(str(row[c]))
            number = isinstance(value, numbers.Real) and not isinstance(value, bool)
            cells.append(f"<td data-v='{js_number(value)}'>{text}</td>" if number else f"<td>{text}</td>")
        mark = " class='pareto'" if pareto and "Pareto" in raw.columns and raw.at[i, "Pareto"] else ""
        rows.append(f"<tr{mark}>" + "".join(cells) + "</tr>")
    out = ("<table class='lb'><thead><tr>" + "".join(f"<th>{e(str(c))}</th>" for c in cols) + "</tr></thead><tbody>\n"
           + "\n".join(rows) + "\n</tbody></table>")
    return out + (f"\n<p class='budget'>{e(note)}</p>" if note else "")


def js_number(value) -> str:
    """``value`` as JavaScript's ``Number()`` reads it back."""
    value = float(value)
    if math.isnan(value):
        return "NaN"
    return repr(value) if math.isfinite(value) else ("Infinity" if value > 0 else "-Infinity")


def bullets(items) -> str:
    return "<ul>" + "".join(f"<li>{e(str(item))}</li>" for item in items) + "</ul>"


def failed_html(failed: list[dict], main_tasks: tuple[str, ...] = ()) -> str:
    return "<ul>" + "".join(f"<li><code>{e(r['method']['pipeline'])}</code>{e(over_other_tasks(r, main_tasks))}: "
                            f"{e(str(r.get('error', '?')))}</li>" for r in failed) + "</ul>"


def speed_html(df: pd.DataFrame, failed: list[dict], level: str = "p", title: str = "") -> str:
    """The speed table of runs on synthetic data (``model.speed_rows``) with its note and failed runs."""
    parts = [f"<{level}>{e(title)}</{level}>" if title else "", f"<p>{e(SPEED_NOTE)}</p>"]
    if not df.empty:
        parts.append(table_html(df, df, pareto=False))
    if failed:
        parts.append("<p>Failed runs:</p>" + failed_html(failed))
    return "".join(parts)
