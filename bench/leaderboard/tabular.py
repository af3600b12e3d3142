"""CSV (every column, raw numbers) and LaTeX (booktabs, the table as shown) leaderboards."""

from __future__ import annotations

import pandas as pd

from mergebench.leaderboard.formats import Format, Page, register_format
from mergebench.leaderboard.model import (
    BUDGET_MARK, SPEED_NOTE, Board, display, display_sequential, table_note, task_columns,
)


@register_format("csv")
class Csv(Format):
    filename = "leaderboard.csv"
    sequential_filename = "leaderboard_sequential.csv"

    def render(self, page: Page) -> str:
        return page.df.to_csv(index=False)

    def render_sequential(self, board: Board) -> str:
        return board.sequential_table()[0].to_csv(index=False)

    def render_speed(self, df: pd.DataFrame, failed: list[dict], suite: str) -> str:
        return df.to_csv(index=False)


@register_format("latex")
class Latex(Format):
    filename = "leaderboard.tex"
    sequential_filename = "leaderboard_sequential.tex"

    def render(self, page: Page) -> str:
        df = page.df
        shown = display(df, task_columns(df)) if not df.empty else df
        return latex(shown, table_note(df))

    def render_sequential(self, board: Board) -> str:
        df = board.sequential_table()[0]
        return latex(display_sequential(df) if not df.empty else df, table_note(df))

    def render_speed(self, df: pd.DataFrame, failed: list[dict], suite: str) -> str:
        return latex(df, SPEED_NOTE)


def latex(shown: pd.DataFrame, note: str = "") -> str:
    """A booktabs tabular (pandas writes \\toprule, \\midrule, \\bottomrule), with ``note`` set under it."""
    if shown.empty:
        return shown.to_latex(index=False)
    text = shown.to_latex(index=False, escape=True, column_format="l" + "r" * (len(shown.columns) - 1))
    return text + (f"\\par\\smallskip\\noindent{{\\footnotesize {latex_escape(note)}}}\n" if note else "")


def latex_escape(text: str) -> str:
    for a, b in (("&", r"\&"), ("%", r"\%"), ("$", r"\$"), ("#", r"\#"),
                 ("_", r"\_"), ("{", r"\{"), ("}", r"\}"), ("~", r"\textasciitilde{}"), ("^", r"\^{}"),
                 ("<", r"$<$"), (BUDGET_MARK, r"\dag{}")):
        text = text.replace(a, b)
    return text
