"""``mergebench status SWEEP_NAME [-v]``: done, running, failed and missing jobs of a sweep."""

from __future__ import annotations

from mergebench.cli import options

HELP = "done, running, failed and missing jobs of a sweep"


def add_arguments(s) -> None:
    s.add_argument("name", help="the sweep's name (printed by `mergebench sweep`)")
    options.results_option(s, help=None)
    s.add_argument("-v", "--verbose", action="store_true", help="list done jobs too")


def main(args) -> int:
    from mergebench.sweeps.sweep import Sweep, job_status, render_status, summarize

    sweep = Sweep.load(args.name, args.results)
    status = job_status(sweep.jobs(build=False))
    print(render_status(sweep, status, verbose=args.verbose))
    return 0 if summarize(status)["done"] == len(status) else 1
