"""``mergebench list-methods [PATTERN] [--needs KIND] [-v] [--json]``: the registered methods."""

from __future__ import annotations

import json
import sys

from mergebench.api.registry import NEEDS

HELP = "list registered methods (built-ins and plugins)"


def add_arguments(s) -> None:
    s.add_argument("pattern", nargs="?", default="*", help="shell-style wildcard, e.g. 'ada*'")
    s.add_argument("--needs", choices=list(NEEDS), help="filter by data needs")
    s.add_argument("-v", "--verbose", action="store_true", help="show hyperparameters and papers")
    s.add_argument("--json", action="store_true", help="machine-readable metadata")


def main(args) -> int:
    from tabulate import tabulate

    from mergebench.api.registry import discover_plugins, get_method, list_methods

    discover_plugins()  # a plugin that fails to load is a warning (mergebench.api.catalog)
    names = list_methods(args.pattern or "*", needs=args.needs)
    if args.json:
        print(json.dumps([get_method(n).summary() for n in names], indent=1))
        return 0
    rows = []
    for n in names:
        s = get_method(n)
        hp = ", ".join(f"{k}={v.default!r}" for k, v in s.hyperparameters.items())
        row = [n, s.display_name, s.needs, "yes" if s.adds_params else "no", s.source]
        if args.verbose:
            row += [hp, s.paper.cite() if s.paper else ""]
        rows.append(row)
    headers = ["name", "display name", "needs", "adds params", "source"] + (["hyperparameters", "paper"] if args.verbose else [])
    print(tabulate(rows, headers=headers))
    if not names:
        print(f"no method matches {args.pattern!r}", file=sys.stderr)
        return 1
    return 0
