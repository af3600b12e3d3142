"""``mergebench leaderboard [--suite SUITE] [--format md|csv|latex|...] [--write]``: the leaderboard from the
records."""

from __future__ import annotations

import sys
from pathlib import Path

from mergebench.cli import options
from mergebench.api.registry import NEEDS

HELP = "render the leaderboard from the records"


def add_arguments(s) -> None:
    from mergebench.leaderboard import sequential_formats, text_formats

    s.add_argument("--suite", default="mini8")
    options.results_option(s, help=None)
    s.add_argument("--format", choices=text_formats(), default="md",
                   help="the output format (registered formats: mergebench.leaderboard.FORMATS)")
    s.add_argument("--write", action="store_true",
                   help="write LEADERBOARD.md, leaderboard.csv, .tex, .html and the plots (PNG, SVG)")
    s.add_argument("--max-added-params", metavar="BUDGET", help="keep methods within '1%%' of the backbone or a count "
                                                                "('0', '500k', '2M')")
    s.add_argument("--needs", metavar="KIND", help="keep methods using at most this data: data-free, "
                                                   + ", ".join(k for k in NEEDS if k not in ("nothing", "sequential")))
    s.add_argument("--sort", metavar="COLUMN[:asc|desc]", help="sort by any column (e.g. Norm, 'Added params', "
                                                                "MMACs/img)")
    s.add_argument("--protocol", choices=["one-shot", "sequential"], default="one-shot",
                   help="sequential: print the table of sequential runs (final average over orders +- std, average "
                        "over steps) in --format " + "|".join(sequential_formats()))


def main(args) -> int:
    from mergebench import leaderboard

    view = {"max_added_params": args.max_added_params, "needs": args.needs, "sort": args.sort}
    typed, args.suite = args.suite, leaderboard.resolve_suite(args.results, args.suite)
    if args.suite != typed:
        print(f"suite {typed}: the records in {Path(args.results) / args.suite}", file=sys.stderr)
    if args.protocol == "sequential" and not args.write:
        print(leaderboard.render_sequential(args.results, args.suite, args.format), end="")
        return 0
    if args.write:
        paths = leaderboard.write(args.results, args.suite, **view)
        print(paths["md"].read_text())
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    else:
        print(leaderboard.render(args.results, args.suite, args.format, **view), end="")
    return 0
