"""The built-in leaderboard formats: importing this module registers them (one line per format module)."""

from mergebench.leaderboard import markdown  # noqa: F401  (md)
from mergebench.leaderboard import tabular  # noqa: F401  (csv, latex)
from mergebench.leaderboard import html  # noqa: F401  (html)
from mergebench.leaderboard import figures  # noqa: F401  (figures: PNG and SVG, written with the plots)
