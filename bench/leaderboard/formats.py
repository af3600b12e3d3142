"""The registry of leaderboard output formats, and the page every format renders.

A format is a class registered with ``@register_format``; ``render`` gives the leaderboard as text (``None``
for a format that only writes files, such as the figures), ``render_sequential`` the table of sequential runs
(formats that have one), ``filename`` / ``sequential_filename`` what ``write`` names them, and
``with_plots=True`` marks what ``write`` produces only with its plots (the HTML page, the figures). A new format
is one module with one such class, plus its import in :mod:`mergebench.leaderboard` (built-ins) or an entry point
in the group ``mergebench.leaderboard_formats`` (external packages)::

    @register_format("json")
    class Json(Format):
        filename = "leaderboard.json"

        def render(self, page):
            return page.df.to_json(orient="records", indent=1) + "\\n"
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import pandas as pd

from mergebench.api.catalog import Registry, UnknownNameError
from mergebench.engine.io import atomic_write_text
from mergebench.leaderboard.model import Board, describe_view, view

ENTRY_POINT_GROUP = "mergebench.leaderboard_formats"


class UnknownFormatError(UnknownNameError):
    pass


@dataclass
class Page:
    """What one leaderboard shows: the board (records, read once), the budget view and whether plots sit beside it."""

    board: Board
    view: dict = field(default_factory=dict)   # max_added_params, needs, sort (``model.view``)
    plots: bool = False                        # Markdown links the plot files ``write`` puts next to it

    @property
    def suite(self) -> str:
        return self.board.suite

    @cached_property
    def filters(self) -> str:
        """The view in words ("" for the default view); raises on a budget, data kind or column it cannot read."""
        return describe_view(**self.view)

    @cached_property
    def _main(self) -> tuple[pd.DataFrame, list[dict]]:
        df, failed = self.board.table()
        self.filters  # noqa: B018  (a bad view is an error before any table is shown)
        return (view(df, **self.view) if not df.empty else df), failed

    @property
    def df(self) -> pd.DataFrame:
        """The main table's rows in the view (raw numbers; ``model.display`` formats them)."""
        return self._main[0]

    @property
    def failed(self) -> list[dict]:
        return self._main[1]

    @property
    def sequential(self) -> tuple[pd.DataFrame, list[dict], list[dict]]:
        return self.board.sequential_table()

    @property
    def nothing(self) -> bool:
        """No rows, no failed runs of either protocol and no unreadable file."""
        df, failed = self.board.table()
        seq_df, seq_failed, _ = self.sequential
        return df.empty and not failed and seq_df.empty and not seq_failed and not self.board.unreadable

    def text(self, form: "Format") -> str | None:
        """``form``'s rendering of this page (a line saying how to make records when there are none; only the costs
        when every run is on synthetic data)."""
        if self.nothing:
            speed_df, speed_failed = self.board.speed_table()
            if not speed_df.empty or speed_failed:
                return form.render_speed(speed_df, speed_failed, self.suite)
            return (f"No records for suite {self.suite!r} in {self.board.results_dir}. Run `mergebench run --suite "
                    f"{self.suite} ...` first.\n")
        return form.render(self)


class Format:
    """An output format of the leaderboard (see the module docstring)."""

    name = ""
    filename: str | None = None              # what ``write`` names the leaderboard in this format
    sequential_filename: str | None = None   # and the sequential table
    with_plots = False                       # ``write`` produces it only with plots (and a main table)

    def render(self, page: Page) -> str | None:
        """The leaderboard as text (``None``: this format only writes files)."""
        return None

    def render_sequential(self, board: Board) -> str | None:
        """The sequential runs' table as text (``None``: this format has none)."""
        return None

    def render_speed(self, df: pd.DataFrame, failed: list[dict], suite: str) -> str | None:
        """The speed table of runs on synthetic data (``model.speed_rows``) as text (``None``: this format has none)."""
        return None

    def write(self, page: Page, out_dir: Path) -> dict[str, Path]:
        text = page.text(self) if self.filename else None
        return {} if text is None else {self.name: atomic_write_text(out_dir / self.filename, text)}

    def write_sequential(self, page: Page, out_dir: Path) -> dict[str, Path]:
        if not self.sequential_filename:
            return {}
        text = self.render_sequential(page.board)
        return {} if text is None else {f"sequential_{self.name}": atomic_write_text(out_dir / self.sequential_filename,
                                                                                     text)}


FORMATS: Registry[Format] = Registry("leaderboard format", group=ENTRY_POINT_GROUP,
                                     builtins="mergebench.leaderboard.builtin", error=UnknownFormatError,
                                     identity=lambda f: f"{type(f).__module__}.{type(f).__qualname__}")


def register_format(name: str | type | None = None, *, aliases: tuple | list = ()):
    """Register a :class:`Format` subclass (an instance of it serves every call) under ``name`` (default: the
    class's ``name`` attribute, else its lower-cased class name)."""
    if isinstance(name, type):
        return register_format()(name)

    def decorator(cls: type) -> type:
        key = name or cls.name or cls.__name__.lower()
        instance = cls()
        instance.name = key
        FORMATS.add(key, instance, aliases=aliases, module=cls.__module__)
        return cls

    return decorator


def get_format(name: str) -> Format:
    return FORMATS.get(name)


def text_formats() -> list[str]:
    """The formats ``render`` can print (``--format`` choices), in registration order."""
    return [n for n in FORMATS.names() if type(FORMATS.get(n)).render is not Format.render]


def sequential_formats() -> list[str]:
    return [n for n in FORMATS.names() if type(FORMATS.get(n)).render_sequential is not Format.render_sequential]
