"""``mergebench run METHOD_SPEC... [--suite SUITE] [--all] [--set k=v] [--tune k=v1,v2] ...``: merge, evaluate and
record one or more methods."""

from __future__ import annotations

import sys
from pathlib import Path

from mergebench.cli import options

HELP = "merge, evaluate and record one or more methods"
DESCRIPTION = ("METHOD_SPEC is a name or a call: 'ties_merging(k=10)', 'surgery(base=task_arithmetic(scaling=0.3))'. "
               "The suite's options: --suite-option KEY=VALUE, or the flags the suites declare (below).")


def add_arguments(s) -> None:
    s.add_argument("methods", nargs="*", metavar="METHOD_SPEC")
    s.add_argument("--all", action="store_true", help="every registered method with its defaults")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a hyperparameter (one method)")
    s.add_argument("--tune", action="append", metavar="KEY=V1,V2", help="select on the validation split")
    s.add_argument("--leaderboard", action="store_true", help="rewrite the suite's leaderboard files afterwards")
    options.add_run_arguments(s)


def main(args) -> int:
    from mergebench.api.pipeline import MethodCall
    from mergebench.api.registry import get_method, list_methods, unmet_requirements
    from mergebench.engine.run import run_many

    specs = list(args.methods)
    if args.all:  # every method at its defaults, and the suite's showcase (its seed papers' headline configurations)
        from mergebench.suites.registry import get_suite_spec
        specs += [m for m in list_methods() + list(get_suite_spec(args.suite).showcase) if m not in specs]
    if not specs:
        print("name at least one method (or --all); `mergebench list-methods` lists them", file=sys.stderr)
        return 2
    overrides = options.key_values(args.set)
    tune = {k: v.split(",") for k, v in options.key_values(args.tune).items()} or None
    if overrides and len(specs) != 1:
        print("--set applies to one method; write name(key=value) for several", file=sys.stderr)
        return 2
    if overrides:
        specs = [str(MethodCall.parse(specs[0]).with_hparams(**overrides))]
    for spec in specs:  # a misspelled method or hyperparameter is an error before the suite loads
        call = MethodCall.parse(spec).with_budget(args.budget).resolve()
        for name, values in (tune or {}).items():
            for value in values:
                call.with_hparams(**{name: value}).resolve()
    suite = options.load_suite(args)
    if args.all:  # --all runs what the suite can run; a method named explicitly still reports its own error
        unmet = {m: unmet_requirements(get_method(MethodCall.parse(m).name), suite) for m in specs}
        for name in [m for m in specs if m not in args.methods and unmet[m]]:
            specs.remove(name)
            print(f"skipped {name}: needs {', '.join(unmet[name])} experts, "
                  f"which suite {suite.name} does not have", file=sys.stderr)
    records = run_many(specs, suite, results_dir=args.results, seed=args.seed, device=args.device, force=args.force,
                       unlabeled_split=args.unlabeled_split, data_fraction=args.data_fraction, tune=tune,
                       show_progress=not args.quiet, time_limit_s=getattr(args, "time_limit", None),
                       memory_limit_mb=getattr(args, "memory_limit", None), protocol=args.protocol,
                       orders=args.orders, budget=args.budget, precision=args.precision, jobs=args.jobs or 1)
    reused = [r["method"]["pipeline"] for r in records if r.get("skipped")]
    if reused:
        print(f"reused {len(reused)} of {len(records)} runs from the records in {Path(args.results) / suite.name} "
              f"(same configuration hash: same suite files, method and settings); `--force` runs them again")
    shown_by = f"mergebench leaderboard --suite {suite.name}" + ("" if args.results == "results" else
                                                                 f" --results {args.results}")
    print(f"records: {Path(args.results) / suite.name} (`{shown_by}` shows them)")
    if args.leaderboard:
        from mergebench import leaderboard
        leaderboard.write(args.results, suite.name)
    return 0 if all(r.get("status") == "ok" for r in records) else 1
