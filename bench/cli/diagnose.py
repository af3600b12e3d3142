"""``mergebench diagnose [--suite SUITE] [--write]``: the mechanisms merging methods exploit, measured on a suite's
experts."""

from __future__ import annotations

import json
from pathlib import Path

from mergebench.cli import options

HELP = ("measure the mechanisms merging methods exploit on a suite's experts (trimming, low rank, input subspaces, "
        "entropy signal)")


def add_arguments(s) -> None:
    options.add_suite_arguments(s)
    options.results_option(s, help="with --write: the report goes to RESULTS/<suite>/DIAGNOSTICS.md and "
                                   "diagnostics.json")
    s.add_argument("--write", action="store_true", help="write the report next to the suite's leaderboard")
    s.add_argument("--split", default="test", choices=("val", "test"), help="where accuracies are measured")
    s.add_argument("--images", type=int, default=1000, help="at most this many images per task per accuracy")
    s.add_argument("--exemplars", type=int, default=64, help="training images per task for the layer inputs")
    s.add_argument("--steps", type=int, default=150, help="Adam steps of each layer-wise coefficient loop")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("-q", "--quiet", action="store_true")
    options.add_suite_flags(s)


def main(args) -> int:
    from mergebench.suites.diagnose import DiagnoseSettings, diagnose, markdown
    from mergebench.engine.io import atomic_write_text
    from mergebench.engine.records import DIAGNOSTICS_FILE

    suite = options.load_suite(args)
    settings = DiagnoseSettings(split=args.split, images=args.images, exemplars=args.exemplars,
                                coefficient_steps=args.steps, seed=args.seed)
    report = diagnose(suite, settings, verbose=not args.quiet)
    text = markdown(report)
    print(text, end="")
    if args.write:
        folder = Path(args.results) / suite.name
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / DIAGNOSTICS_FILE, json.dumps(report, indent=1, sort_keys=True) + "\n")
        atomic_write_text(folder / "DIAGNOSTICS.md", text)
        print(f"wrote {folder / 'DIAGNOSTICS.md'} and {folder / DIAGNOSTICS_FILE}")
    return 0
