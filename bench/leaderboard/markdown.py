"""The Markdown leaderboard (``LEADERBOARD.md``): the main table, the suite's sanity checks and published
numbers, the tables over other task sets, the sequential runs, failed runs and unreadable record files."""

from __future__ import annotations

import re

import pandas as pd

from mergebench.leaderboard.formats import Format, Page, register_format
from mergebench.leaderboard.model import (
    FIGURES, SEQUENTIAL_NOTE, SPEED_NOTE, SUBSET_NOTE, Board, column_notes, display, display_sequential,
    equal_costs_note, explain_columns, over_other_tasks, subset_label, table_note, task_columns,
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
            lines += [md_text(f"Experts: {'; '.join(experts)}."), ""]
        if page.filters:
            lines += [md_text(f"View: {page.filters}."), ""]
        if len(board.task_sets) > 1 and not shown.empty:  # which task set this table is over; the others follow
            lines += [md_text(f"Tasks: {', '.join(tasks)} ({len(tasks)}); runs over other task sets are in their own "
                              f"tables below."), ""]
        if not shown.empty:
            lines.append(md_table(shown))
            if table_note(df):
                lines += ["", md_text(table_note(df))]
            if board.notes:  # the maintainers' own Markdown (the folder's NOTES.md), shown as written
                lines += ["", board.notes]
        if page.plots and not df.empty:
            drawn = [key for key in FIGURES if key != "accuracy_flops" or not equal_costs_note(df)]
            lines += ["", "## Budgets", ""] + [f"![{FIGURES[key]}]({key}.svg)" for key in drawn]
            if equal_costs_note(df):
                lines += ["", equal_costs_note(df)]
            lines += ["", f"Also as PNG ({', '.join(f'`{key}.png`' for key in drawn)}) and as a sortable page "
                      "(`leaderboard.html`)."]
        checks = board.sanity(df)
        if checks:
            lines += ["", "## Benchmark sanity (from the measured numbers above)", ""] + [f"- {md_text(c)}"
                                                                                          for c in checks]
        lines += subset_sections(board, page.view)
        lines += published_section(board, df)
        if not seq_df.empty or seq_failed:
            lines += [""] + sequential_lines(seq_df, seq_failed, page.plots)
        speed_df, speed_failed = board.speed_table()
        if not speed_df.empty or speed_failed:  # synthetic runs beside real ones: their costs only
            lines += [""] + self.render_speed(speed_df, speed_failed, suite).replace("# mergebench speed", "## Speed",
                                                                                     1).splitlines()
        if page.failed:
            lines += ["", "## Failed runs", ""] + failed_lines(page.failed, board.main_tasks)
        if board.unreadable:
            lines += ["", "## Unreadable record files (skipped)", ""] + [f"- {md_text(p)}: {md_text(why)}"
                                                                         for p, why in board.unreadable]
        return "\n".join(lines) + "\n"

    def render_sequential(self, board: Board) -> str:
        df, failed, _ = board.sequential_table()
        return "\n".join(sequential_lines(df, failed, plots=False)) + "\n"

    def render_speed(self, df: pd.DataFrame, failed: list[dict], suite: str) -> str:
        lines = [f"# mergebench speed: {suite}", "", SPEED_NOTE, ""]
        if not df.empty:
            lines.append(md_table(df))
        if failed:
            lines += ["", "## Failed runs", ""] + failed_lines(failed)
        return "\n".join(lines) + "\n"


def subset_sections(board: Board, view_options: dict | None = None) -> list[str]:
    """One table per other task set (runs with ``--tasks``), each with its own Pareto marks. They never share the
    main table's stars or sit beside the published numbers."""
    lines = []
    for ts, df in board.subset_tables(view_options):
        lines += ["", f"## Runs over {md_text(subset_label(ts, board.main_tasks))}", "", SUBSET_NOTE, "",
                  md_table(display(df, task_columns(df)))]
        if table_note(df):
            lines += ["", md_text(table_note(df))]
    return lines


def published_section(board: Board, df: pd.DataFrame) -> list[str]:
    """Each published number the suite gives beside the measured one of the same method (``Board.published``)."""
    published = board.published(df)
    if published is None:
        return []
    title, note, table = published
    return ["", f"## {md_text(title)}", "", md_text(note), "", md_table(table)]


def sequential_lines(df: pd.DataFrame, failed: list[dict], plots: bool) -> list[str]:
    lines = ["## Sequential protocol (continual merging)", "", SEQUENTIAL_NOTE, ""]
    if not df.empty:
        lines.append(md_table(display_sequential(df)))
        if table_note(df):
            lines += ["", md_text(table_note(df))]
    if plots and not df.empty:
        lines += ["", "![Accuracy on the tasks seen after each expert](sequential_curve.svg)"]
    if failed:
        lines += ["", "Failed sequential runs:", ""] + failed_lines(failed)
    return lines


def failed_lines(failed: list[dict], main_tasks: tuple[str, ...] = ()) -> list[str]:
    """One list item per failed run: its pipeline (and its tasks when they are not ``main_tasks``) and its error."""
    return [f"- {md_code(r['method']['pipeline'])}{md_text(over_other_tasks(r, main_tasks))}: "
            f"{md_text(r.get('error', '?'))}" for r in failed]


def md_text(text) -> str:
    """Text from a record as Markdown that shows it as written, on one line: a ``<`` that would open raw HTML or an
    autolink is ``&lt;``, an ``&`` that would open an entity is ``&amp;``."""
    text = re.sub(r"\s*[\r\n]+\s*", " ", str(text))
    text = re.sub(r"&(?=#?\w+;)", "&amp;", text)
    return re.sub(r"<(?=[A-Za-z/!?])", "&lt;", text)


def md_cell(text) -> str:
    """``md_text`` for a table cell: a ``|`` is ``\\|``."""
    return md_text(text).replace("|", "\\|")


def md_code(text) -> str:
    """``text`` as an inline code span (shown literally), fenced by more backticks than any run of them inside."""
    text = re.sub(r"\s*[\r\n]+\s*", " ", str(text))
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def md_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of ``df`` with every text cell and header escaped (``md_cell``)."""
    shown = df.rename(columns=lambda c: md_cell(c) if isinstance(c, str) else c)
    shown = shown.apply(lambda col: col.map(lambda v: md_cell(v) if isinstance(v, str) else v))
    return shown.to_markdown(index=False)
