"""The HTML leaderboard: one self-contained page, a sortable table (click a header) and the plots as inline SVG."""

from __future__ import annotations

import html

from mergebench.leaderboard.formats import Format, Page, register_format
from mergebench.leaderboard.model import SPEED_NOTE, column_notes, display, explain_columns, table_note, task_columns


@register_format("html")
class Html(Format):
    filename = "leaderboard.html"
    with_plots = True  # the page holds the plots: ``write`` makes it with them

    def render(self, page: Page) -> str:
        from mergebench.leaderboard.figures import plot_svgs

        df = page.df
        return to_html(df, page.failed, page.board.unreadable, page.suite, page.filters,
                       plot_svgs(df, page.suite) if not df.empty else {})

    def render_speed(self, df, failed: list[dict], suite: str) -> str:
        return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>mergebench speed: {html.escape(suite)}"
                f"</title></head><body><h1>mergebench speed: {html.escape(suite)}</h1><p>{html.escape(SPEED_NOTE)}</p>"
                + (df.to_html(index=False) if not df.empty else "") + "</body></html>\n")


_SORT_JS = """
document.querySelectorAll('table.lb th').forEach((th, col) => th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0];
  const asc = th.dataset.dir !== 'asc';
  th.closest('tr').querySelectorAll('th').forEach(h => delete h.dataset.dir);
  th.dataset.dir = asc ? 'asc' : 'desc';
  const key = td => { const v = td.dataset.v ?? td.textContent; const n = parseFloat(v);
                      return isNaN(n) ? v.toLowerCase() : n; };
  [...body.rows].sort((a, b) => { const x = key(a.cells[col]), y = key(b.cells[col]);
    return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1); }).forEach(r => body.appendChild(r));
}));
"""


def to_html(df: pd.DataFrame, failed: list, unreadable: list, suite: str, filters: str = "",
            svgs: dict | None = None) -> str:
    """One self-contained page: a sortable table (click a header) and the plots as inline SVG."""
    e = html.escape
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>mergebench leaderboard: {e(suite)}</title>",
             "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}"
             "table{border-collapse:collapse;font-size:13px}th,td{padding:3px 8px;border-bottom:1px solid #ddd;"
             "text-align:right}td:first-child,th:first-child{text-align:left}th{cursor:pointer;background:#f4f4f4}"
             "th[data-dir=asc]::after{content:' \\25B2'}th[data-dir=desc]::after{content:' \\25BC'}"
             "tr.pareto td:first-child{font-weight:bold}.plots svg{max-width:48%;height:auto}</style></head><body>",
             f"<h1>mergebench leaderboard: {e(suite)}</h1>",
             f"<p>{e(explain_columns())} Pareto = &#9733; (bold rows) {e(column_notes()['Pareto'])}. "
             "Click a column header to sort.</p>"]
    if filters:
        parts.append(f"<p><b>View:</b> {e(filters)}</p>")
    if not df.empty:
        tasks = task_columns(df)
        shown = display(df, tasks)
        cols = list(shown.columns)
        parts.append("<table class='lb'><thead><tr>" + "".join(f"<th>{e(c)}</th>" for c in cols) + "</tr></thead><tbody>")
        raw_of = {"Added params": "Added params"}
        for i, row in shown.iterrows():
            cells = []
            for c in cols:
                text = "&#9733;" if c == "Pareto" and row[c] else e(str(row[c]))
                raw = df.loc[i, raw_of.get(c, c)] if c in df.columns and c not in ("Method",) else None
                attr = f" data-v='{float(raw)}'" if isinstance(raw, (int, float)) and not isinstance(raw, bool) else ""
                if c == "Pareto":
                    attr = f" data-v='{int(bool(df.loc[i, 'Pareto']))}'"
                cells.append(f"<td{attr}>{text}</td>")
            cls = " class='pareto'" if df.loc[i, "Pareto"] else ""
            parts.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
        parts.append("</tbody></table>")
        if table_note(df):
            parts.append(f"<p class='budget'>{e(table_note(df))}</p>")
    if svgs:
        parts.append("<h2>Budgets</h2><div class='plots'>" + "".join(svgs.values()) + "</div>")
    if failed:
        parts.append("<h2>Failed runs</h2><ul>" + "".join(
            f"<li><code>{e(r['method']['pipeline'])}</code>: {e(str(r.get('error', '?')))}</li>" for r in failed) + "</ul>")
    if unreadable:
        parts.append("<h2>Unreadable record files (skipped)</h2><ul>" + "".join(
            f"<li>{e(str(p))}: {e(why)}</li>" for p, why in unreadable) + "</ul>")
    parts.append(f"<script>{_SORT_JS}</script></body></html>")
    return "\n".join(parts) + "\n"
