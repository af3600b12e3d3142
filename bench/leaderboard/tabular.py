"""CSV (every column, raw numbers) and LaTeX (booktabs, the table as shown) leaderboards."""

from __future__ import annotations

import pandas as pd

from mergebench.leaderboard.formats import Format, Page, register_format
from mergebench.leaderboard.model import (
    BUDGET_MARK, DATA_MARK, SPEED_NOTE, Board, display, display_sequential, table_note, task_columns,
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
    """A booktabs tabular (pandas writes \\toprule, \\midrule, \\bottomrule) with every text cell and header
    escaped (``latex_escape``), and ``note`` set under it."""
    if shown.empty:
        return shown.to_latex(index=False)
    escaped = shown.rename(columns=lambda c: latex_escape(c) if isinstance(c, str) else c)
    escaped = escaped.apply(lambda col: col.map(lambda v: latex_escape(v) if isinstance(v, str) else v))
    text = escaped.to_latex(index=False, escape=False, column_format="l" + "r" * (len(shown.columns) - 1))
    return text + (f"\\par\\smallskip\\noindent{{\\footnotesize {latex_escape(note)}}}\n" if note else "")


# what each character LaTeX reads as markup is set as, in text mode (< > | through math: the same glyph in every
# font encoding); the marks as \dag and \ddag, which every engine sets
_LATEX_TEXT = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
               "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}", "<": "$<$", ">": "$>$", "|": "$|$",
               BUDGET_MARK: r"\dag{}", DATA_MARK: r"\ddag{}", "\n": " ", "\r": " "}


def latex_escape(text: str) -> str:
    """``text`` as LaTeX that sets it as written."""
    return "".join(_LATEX_TEXT.get(ch, ch) for ch in str(text))
