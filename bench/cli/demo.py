"""``mergebench demo [--suite mini8|mini8-lora] [--protocol sequential]``: every method on a suite, then the
leaderboard."""

from __future__ import annotations

import os
from pathlib import Path

from mergebench.cli import options, run

HELP = ("run every method on mini8 (the committed suite; records already made are reused), write and print the "
        "leaderboard")


def add_arguments(s) -> None:
    options.add_run_arguments(s)


def main(args) -> int:
    """Build the suite if needed, run every registered method, write and print the leaderboard."""
    from mergebench import leaderboard
    from mergebench.api.registry import list_methods
    from mergebench.engine.runspec import resolve_device
    from mergebench.engine.sequential import SEQUENTIAL_BASELINES

    args.methods, args.all, args.set, args.tune, args.leaderboard = [], True, [], [], True
    if args.jobs is None:  # every core runs a method (a method's small matrix products use one core well)
        args.jobs = min(8, len(os.sched_getaffinity(0))) if resolve_device(args.device).type == "cpu" else 1
    if args.protocol == "sequential":  # every sequential method, and the one-shot baselines through the adapter
        args.methods, args.all = list_methods(needs="sequential") + list(SEQUENTIAL_BASELINES), False
    status = run.main(args)
    print()
    print(leaderboard.render(args.results, args.suite))
    print(f"(written to {Path(args.results) / args.suite / 'LEADERBOARD.md'})")
    return status
