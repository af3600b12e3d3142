"""``mergebench list-suites [PATTERN]``: the registered suites with their options."""

from __future__ import annotations

HELP = "list registered suites (built-ins and plugins) with their options"


def add_arguments(s) -> None:
    s.add_argument("pattern", nargs="?", default="*", help="shell-style wildcard, e.g. 'mini*'")


def main(args) -> int:
    from tabulate import tabulate

    from mergebench.suites import get_suite_spec, list_suites

    rows = []
    for name in list_suites(args.pattern):
        spec = get_suite_spec(name)
        options = ", ".join(f"{k}={p.default!r}" for k, p in spec.options.items())
        rows.append([name, "yes" if spec.builds else "no", options, spec.description, spec.loader.__module__])
    print(tabulate(rows, headers=["name", "built here", "options", "description", "module"]))
    return 0 if rows else 1
