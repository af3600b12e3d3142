"""Leaderboards from records: one row per method pipeline (its newest ok record).

Every number in a table comes from a record, and every record from a run. :mod:`.model` turns the records of
one results folder (read once per leaderboard, :class:`Board`) into tables, views and Pareto fronts; each
output format is a module registered in ``FORMATS`` (:mod:`.formats`): Markdown, CSV, LaTeX, HTML and the
figures. What a suite knows about its own results (its sanity checks, the published numbers) comes from the
suite's registration (:mod:`mergebench.suites.registry`); the leaderboard only displays it.

Budget views (``view``): keep methods within an added-parameter budget (``"1%"`` of the
backbone or an absolute count such as ``"500k"``), within a data budget (``needs="data-free"``:
methods that use at most that kind of data), sorted by any column. The ``Pareto`` column marks
the methods on the accuracy-versus-added-parameters front of the rows shown: no other row is at
least as accurate with at most as many added parameters (and better in one). ``write`` also
draws that front and accuracy versus MACs per image (PNG and SVG) and a self-contained HTML page.
"""

from __future__ import annotations

import os
from pathlib import Path

from mergebench.errors import InputError, MissingFileError

from mergebench.leaderboard.formats import (
    FORMATS, Format, Page, UnknownFormatError, get_format, register_format, sequential_formats, text_formats,
)
from mergebench.leaderboard.model import (  # noqa: F401  (the public table model)
    BUDGET_MARK, NEEDS_ALIASES, Board, below_budget, budget_note, describe_view, parse_budget, pareto_front,
    precision_note, sequential_table, speed_table, table, table_note, task_columns, task_set, task_sets, view,
)
from mergebench.suites import REGISTRY


def resolve_suite(results_dir, suite: str) -> str:
    """The results folder that holds the records of ``suite`` as a user typed it: the folder of that name when it
    holds records, else the one folder of the registered suite's runs (``real`` -> ``real-ViT-B-32``: a real suite's
    runs go to a folder named after its backbone). Several such folders, or none at all, are an error naming what
    there is."""
    root = Path(results_dir)

    def holds_records(folder: Path) -> bool:
        return folder.is_dir() and next(folder.rglob("*.json"), None) is not None

    if holds_records(root / suite):
        return suite
    spec = REGISTRY.get(suite) if suite in REGISTRY else None
    folders = sorted(p.name for p in root.iterdir() if holds_records(p)) if root.is_dir() else []
    mine = [f for f in folders if spec is not None and spec.writes_to(f)]
    if len(mine) == 1:
        return mine[0]
    if mine:
        raise InputError(f"suite {suite!r} has records in {len(mine)} folders of {root}: {', '.join(mine)}; name "
                         f"one with --suite (e.g. --suite {mine[0]})")
    others = f" (folders with records: {', '.join(folders)})" if folders else ""
    raise MissingFileError(f"no records for suite {suite!r} in {root}{others}; run `mergebench run --suite {suite} "
                           f"...` first, or name another folder with --results")


def render(results_dir, suite: str, fmt: str = "md", max_added_params: str | float | None = None,
           needs: str | None = None, sort: str | None = None, plots: bool = False) -> str:
    """The leaderboard in a registered format: ``md`` (Markdown), ``csv``, ``latex`` (booktabs), ``html``
    (self-contained), or a plugin's.

    ``max_added_params``, ``needs`` and ``sort`` select a budget view (see ``view``); ``plots``
    (Markdown) links the plot files that ``write`` puts next to it.
    """
    page = Page(Board(results_dir, suite), {"max_added_params": max_added_params, "needs": needs, "sort": sort},
                plots)
    return _render(page, fmt)


def _render(page: Page, fmt: str) -> str:
    text = page.text(get_format(fmt))
    if text is None:
        raise InputError(f"the {fmt} format writes files (`mergebench leaderboard --write`); it prints nothing; "
                         f"printable formats: {', '.join(text_formats())}")
    return text


def render_sequential(results_dir, suite: str, fmt: str = "md") -> str:
    """The sequential runs' table as Markdown (with failed runs), ``csv`` or ``latex``."""
    board = Board(results_dir, suite)
    df, failed, _ = board.sequential_table()
    if df.empty and not failed:
        return (f"No sequential records for suite {suite!r} in {results_dir}. Run `mergebench run --suite {suite} "
                f"--protocol sequential ...` first.\n")
    text = get_format(fmt).render_sequential(board)
    if text is None:
        names = sequential_formats()
        raise InputError(f"the sequential table is written as {', '.join(names[:-1])} or {names[-1]}, not {fmt!r}")
    return text


def write(results_dir, suite: str, out_dir: str | os.PathLike | None = None, plots: bool = True,
          **view_options) -> dict[str, Path]:
    """Write every registered format's file next to the records (LEADERBOARD.md, leaderboard.csv,
    leaderboard.tex, and the sequential tables when there are sequential runs); with ``plots`` also the formats
    made with the plots (leaderboard.html, pareto_params.{png,svg}, accuracy_flops.{png,svg},
    sequential_curve.{png,svg}). The records are read once."""
    out_dir = Path(out_dir or Path(results_dir) / suite)
    board = Board(results_dir, suite)
    page = Page(board, {k: view_options.get(k) for k in ("max_added_params", "needs", "sort")}, plots)
    unknown = set(view_options) - set(page.view)
    if unknown:
        raise TypeError(f"write() got unexpected view options {sorted(unknown)}")
    formats = [get_format(n) for n in FORMATS.names()]
    has_table = not board.table()[0].empty
    has_sequential = not board.sequential_table()[0].empty
    paths: dict[str, Path] = {}
    for form in formats:  # the tables
        if not form.with_plots:
            paths.update(form.write(page, out_dir))
    if has_sequential:  # the sequential tables (and their figure, with the plots)
        for form in formats:
            if plots or not form.with_plots:
                paths.update(form.write_sequential(page, out_dir))
    if plots and has_table:  # what is made with the plots: the HTML page, the figures
        for form in formats:
            if form.with_plots:
                paths.update(form.write(page, out_dir))
    return paths


from mergebench.leaderboard import builtin  # noqa: E402,F401  (the built-in formats register on import)

__all__ = ["render", "resolve_suite", "render_sequential", "write", "table", "sequential_table", "speed_table", "view", "pareto_front",
           "parse_budget", "describe_view", "below_budget", "budget_note", "precision_note", "table_note", "task_set", "task_sets", "task_columns", "Board", "Page",
           "Format", "FORMATS", "register_format", "get_format", "text_formats", "UnknownFormatError", "BUDGET_MARK"]
