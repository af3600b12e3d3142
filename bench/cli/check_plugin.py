"""``mergebench check-plugin NAME [--suite SUITE]``: the conformance kit for a method or a plugin's methods."""

from __future__ import annotations

from mergebench.cli import options

HELP = "conformance kit for a method (or every method of a plugin)"


def add_arguments(s) -> None:
    s.add_argument("name", help="method name, wildcard, or plugin distribution / entry-point name")
    options.add_suite_arguments(s, default="micro")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--time-limit", type=options.seconds, default=600.0, metavar="SECONDS",
                   help="fail the checks of a method whose runs take longer than this (default 600; the process is "
                        "killed at the deadline)")
    s.add_argument("-q", "--quiet", action="store_true")
    options.add_suite_flags(s)


def main(args) -> int:
    from mergebench.api.conformance import check_plugin

    suite = None
    if args.suite != "micro":
        suite = options.load_suite(args)
    reports = check_plugin(args.name, suite=suite, seed=args.seed, time_limit_s=args.time_limit)
    for report in reports:
        print(report.render())
    return 0 if all(r.ok for r in reports) else 1
