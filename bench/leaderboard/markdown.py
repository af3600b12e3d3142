"""The Markdown leaderboard (``LEADERBOARD.md``): the main table, the suite's sanity checks and published
numbers, the tables over other task sets, the sequential runs, failed runs and unreadable record files."""

from __future__ import annotations

import pandas as pd

from mergebench.leaderboard.formats import Format, Page, register_format
from mergebench.leaderboard.model import (
    SEQUENTIAL_NOTE, SPEED_NOTE, Board, column_notes, display, display_sequential, explain_columns, subset_label,
    table_note, task_columns, view,
)


@register_format("md")
class Markdown(Format):
    filename = "LEADERBOARD.md"

    def render(self, page: Page) -> str:
        board, df, suite = page.board, page.df, page.suite
        seq_df, seq_failed, _ = page.sequential
        tasks = task_columns(df)
        shown = display(df, tasks) if not df.empty else df
        lines = [f"# mergebench leaderboard: {suite}", "",
                 explain_columns() + " Generated from the run records in this folder by `mergebench leaderboard`."
                 + f" Pareto = * {column_notes()['Pareto']}.", ""]
        experts = board.experts()
        if experts:  # e.g. LoRA experts (mini8-lora): say what was merged
            lines += [f"Experts: {'; '.join(experts)}.", ""]
        if page.filters:
            lines += [f"View: {page.filters}.", ""]
        if len(board.task_sets) > 1 and not shown.empty:  # which task set this table is over; the others follow
            lines += [f"Tasks: {', '.join(tasks)} ({len(tasks)}); runs over other task sets are in their own tables "
                      f"below.", ""]
        if not shown.empty:
            lines.append(shown.to_markdown(index=False))
            if table_note(df):
                lines += ["", table_note(df)]
            if board.notes:
                lines += ["", board.notes]
        if page.plots and not df.empty:
            lines += ["", "## Budgets", "", "![Accuracy vs added parameters](pareto_params.svg)",
                      "![Accuracy vs MACs per image](accuracy_flops.svg)",
                      "", "Also as PNG (`pareto_params.png`, `accuracy_flops.png`) and as a sortable page "
                      "(`leaderboard.html`)."]
        checks = board.sanity(df)
        if checks:
            lines += ["", "## Benchmark sanity (from the measured numbers above)", ""] + [f"- {c}" for c in checks]
        lines += subset_sections(board, page.view)
        lines += published_section(board, df)
        if not seq_df.empty or seq_failed:
            lines += [""] + sequential_lines(seq_df, seq_failed, page.plots)
        speed_df, speed_failed = board.speed_table()
        if not speed_df.empty or speed_failed:  # synthetic runs beside real ones: their costs only
            lines += [""] + self.render_speed(speed_df, speed_failed, suite).replace("# mergebench speed", "## Speed",
                                                                                     1).splitlines()
        if page.failed:
            lines += ["", "## Failed runs", ""] + [f"- `{r['method']['pipeline']}`: {r.get('error', '?')}"
                                                   for r in page.failed]
        if board.unreadable:
            lines += ["", "## Unreadable record files (skipped)", ""] + [f"- {p}: {why}" for p, why in board.unreadable]
        return "\n".join(lines) + "\n"

    def render_sequential(self, board: Board) -> str:
        df, failed, _ = board.sequential_table()
        return "\n".join(sequential_lines(df, failed, plots=False)) + "\n"

    def render_speed(self, df: pd.DataFrame, failed: list[dict], suite: str) -> str:
        lines = [f"# mergebench speed: {suite}", "", SPEED_NOTE, ""]
        if not df.empty:
            lines.append(df.to_markdown(index=False))
        if failed:
            lines += ["", "## Failed runs", ""] + [f"- `{r['method']['pipeline']}`: {r.get('error', '?')}" for r in failed]
        return "\n".join(lines) + "\n"


def subset_sections(board: Board, view_options: dict | None = None) -> list[str]:
    """One table per other task set (runs with ``--tasks``), each with its own Pareto marks. They never share the
    main table's stars or sit beside the published numbers."""
    sets = board.task_sets
    lines = []
    for ts in sets[1:]:
        df = view(board.table(tasks=ts)[0], **(view_options or {}))
        if df.empty:
            continue
        lines += ["", f"## Runs over {subset_label(ts, sets[0])}", "",
                  "Not comparable with the main table (another task set): Avg, Norm and Pareto are over these tasks "
                  "only.", "", display(df, task_columns(df)).to_markdown(index=False)]
        if table_note(df):
            lines += ["", table_note(df)]
    return lines


def published_section(board: Board, df: pd.DataFrame) -> list[str]:
    """Each published number the suite gives (``register_suite(references=...)``) beside the measured one of the
    same method (its best row in the main table)."""
    refs = board.references(df)
    if refs is None or not refs.rows:
        return []
    measured = {} if df.empty else {r["Pipeline"].split("(")[0]: r["Avg"] for _, r in df.iloc[::-1].iterrows()}
    table = pd.DataFrame([{"Method": r["display"], "Published Avg": f"{r['avg']:.1f}",
                           "Measured Avg": f"{measured[r['method']]:.1f}" if r["method"] in measured else "-",
                           "Verified": "yes" if r.get("verified") else "no", "Source": r["source"]} for r in refs.rows])
    return ["", f"## {refs.title}", "", refs.note, "", table.to_markdown(index=False)]


def sequential_lines(df: pd.DataFrame, failed: list[dict], plots: bool) -> list[str]:
    lines = ["## Sequential protocol (continual merging)", "", SEQUENTIAL_NOTE, ""]
    if not df.empty:
        lines.append(display_sequential(df).to_markdown(index=False))
        if table_note(df):
            lines += ["", table_note(df)]
    if plots and not df.empty:
        lines += ["", "![Accuracy on the tasks seen after each expert](sequential_curve.svg)"]
    if failed:
        lines += ["", "Failed sequential runs:", ""] + [f"- `{r['method']['pipeline']}`: {r.get('error', '?')}"
                                                        for r in failed]
    return lines
