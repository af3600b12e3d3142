"""The ``mergebench`` command line.

    mergebench list-methods [PATTERN] [--needs KIND] [-v]
    mergebench build [SUITE]                           mergebench list-suites
    mergebench run METHOD_SPEC... [--suite mini8] [--all] [--set k=v] [--tune k=v1,v2] [--seed N] [--force]
    mergebench leaderboard [--suite mini8] [--format md|csv|latex] [--write]
    mergebench run METHOD_SPEC... --suite real --manifest M.yaml --data-root DIR [--trust-pickle] [--tasks A,B]
    mergebench data check|prepare --root DIR [--tasks A,B] [--verify] [--image-size 224] [--splits test]
    mergebench zoo init DIR | --hf-cache DIR [--out M.yaml]      mergebench zoo hash PATH
    mergebench demo [--suite mini8|mini8-lora] [--protocol sequential]
    mergebench run METHOD_SPEC... --protocol sequential [--orders 3]      mergebench leaderboard --protocol sequential
    mergebench sweep METHOD_SPEC... [--config sweep.yaml] [--grid k=v1,v2] [--seeds 0,1] [--executor local|slurm] [--jobs N]
    mergebench status SWEEP_NAME [-v]
    mergebench new-method NAME [--dir D]      mergebench check-plugin NAME      mergebench docs [--out docs/methods]
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import sys
import warnings
from pathlib import Path

from mergebench.errors import InputError, MergebenchError, MissingFileError, disk_full_message
from mergebench.registry import NEEDS, HyperparameterError


def _kv(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise HyperparameterError(f"expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def cmd_list_methods(args) -> int:
    from mergebench.registry import discover_plugins, get_method, list_methods

    discover_plugins()  # a plugin that fails to load is a warning (mergebench.catalog)
    names = list_methods(args.pattern or "*", needs=args.needs)
    if args.json:
        print(json.dumps([get_method(n).summary() for n in names], indent=1))
        return 0
    from tabulate import tabulate

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


def cmd_build(args) -> int:
    from mergebench.suites import get_suite

    if args.artifact:
        from mergebench.build import mini8, mini8_lora  # the build tool, only when asked for
        from mergebench.suites.mini8 import CONFIGS, LORA_CONFIGS

        builders = {**{n: mini8.build_artifact for n in CONFIGS}, **{n: mini8_lora.build_artifact for n in LORA_CONFIGS}}
        if args.suite not in builders:
            raise InputError(f"--artifact builds the committed suites ({', '.join(builders)}), not {args.suite!r}")
        print(f"{args.suite}: artifact written to {builders[args.suite](args.suite, jobs=args.jobs)}")
        return 0
    if args.jobs is not None:
        os.environ["MERGEBENCH_BUILD_JOBS"] = str(args.jobs)
    suite = get_suite(args.suite)
    print(f"{suite.name}: {len(suite.tasks)} tasks ({', '.join(suite.tasks)}), build info {suite.info.get('build')}")
    return 0


def cmd_list_suites(args) -> int:
    from tabulate import tabulate

    from mergebench.suites import get_suite_spec, list_suites

    rows = []
    for name in list_suites(args.pattern):
        spec = get_suite_spec(name)
        options = ", ".join(f"{k}={p.default!r}" for k, p in spec.options.items())
        rows.append([name, "yes" if spec.builds else "no", options, spec.description, spec.loader.__module__])
    print(tabulate(rows, headers=["name", "built here", "options", "description", "module"]))
    return 0 if rows else 1


# the suite options that have flags of their own (the real suite's, the synthetic ones'); any other:
# --suite-option KEY=VALUE
SUITE_FLAGS = ("manifest", "data_root", "trust_pickle", "tasks", "fraction")


def _suite_options(args) -> dict:
    """The options given for the suite: ``--suite-option KEY=VALUE`` and the flags of ``SUITE_FLAGS``."""
    options = _kv(getattr(args, "suite_option", None))
    for flag in SUITE_FLAGS:
        value = getattr(args, flag, None)
        if value not in (None, False):
            options[flag] = value
    return options


def _suite(args):
    from mergebench.suites import get_suite_spec

    spec = get_suite_spec(args.suite)
    options = spec.parse_options(_suite_options(args))
    return spec.load(verbose=not getattr(args, "quiet", False), **options)


def cmd_data(args) -> int:
    """``data check``: per dataset, what is present, missing and how to get it (never downloads).
    ``data prepare``: fill the preprocessing cache (decoded, resized, center-cropped uint8 images)."""
    from mergebench.suites.real import cards as cardlib

    from mergebench.suites.real import imagecache
    from mergebench.suites.base import SPLITS

    all_cards = cardlib.load_cards()
    chosen = [cardlib.resolve_task(t, all_cards) for t in args.tasks.split(",")] if args.tasks else list(all_cards.values())
    if not Path(args.root).is_dir():
        raise MissingFileError(f"data root {args.root} does not exist (or is not a folder); pass the folder that holds "
                               f"the datasets in the cards' layouts (datasets/*.yaml) or a Hugging Face cache (the HF "
                               f"home, its hub/ folder, or a folder holding datasets--ORG--NAME/)")
    splits = list(SPLITS) if args.splits == "all" else [s.strip() for s in args.splits.split(",")]
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        print(f"error: unknown split {unknown[0]!r}; --splits takes test, val, train (comma-separated) or all",
              file=sys.stderr)
        return 2
    if args.action == "check":
        reports = [cardlib.check_dataset(c, args.root, verify=args.verify) for c in chosen]
        totals = {"test": 0, "other": 0, "to_write": 0}
        for card, r in zip(chosen, reports):
            space = imagecache.space(card, args.root, args.image_size, r["sizes"], r.get("unavailable", ()))
            r["space"], counts = _space_line(space, splits)
            for k in totals:
                totals[k] += counts[k]
        print(cardlib.format_check(reports), end="")
        if all(r["status"] == "missing" and not r["present"] for r in reports):
            from mergebench.suites.checkpoints import hf_cache
            repo = next((cardlib.hf_spec(c)["repos"][0] for c in chosen if cardlib.hf_spec(c)), None)
            example = f", e.g. datasets--{repo.replace('/', '--')}" if repo else ""
            print(f"nothing found under {args.root}: looked for each card's layout there (e.g. "
                  f"{Path(args.root) / chosen[0].layout.get('root', chosen[0].name)}) and for Hugging Face datasets "
                  f"(datasets--ORG--NAME/{example}) in {', '.join(str(d) for d in hf_cache.hub_dirs_searched(args.root))}; Hugging Face copies "
                  f"are accepted: --root may be the HF home or its hub/ folder")
        print(f"preprocessing cache at {args.image_size} px ($MERGEBENCH_CACHE/real/data): `data prepare` (--splits "
              f"{','.join(splits)}) writes {_gb(totals['to_write'])} more; every run needs the test splits "
              f"({_gb(totals['test'])} in all), train and val ({_gb(totals['other'])} more) only methods that read "
              f"them (and --tune)")
        return 0 if all(r["status"] == "ok" for r in reports) else 1
    for card in chosen:
        directory = imagecache.cache_dir(card, args.root, args.image_size)
        imagecache.load_or_build(card, args.root, args.image_size, workers=args.workers, splits=splits)
        print(f"{card.name}: {', '.join(splits)} cached in {directory}")
    return 0


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else (f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB")


def _space_line(space: dict, splits: list[str]) -> tuple[str, dict]:
    """One line of ``data check``: per split, images and cache bytes (cached or not); and the byte counts."""
    parts, counts = [], {"test": 0, "other": 0, "to_write": 0}
    for split, s in space["splits"].items():
        if s["images"] is None:
            parts.append(f"{split} {'?' if s['available'] else 'not in the data'}")
            continue
        counts["test" if split == "test" else "other"] += s["bytes"]
        if split in splits and not s["cached"]:
            counts["to_write"] += s["bytes"]
        state = "cached" if s["cached"] else ("to write" if split in splits else "on first use")
        parts.append(f"{split} {s['images']:,} images {_gb(s['bytes'])} ({state}"
                     f"{'' if s['counted'] else ', protocol size'})")
    return f"cache at {space['size']} px: " + "; ".join(parts), counts


def cmd_zoo(args) -> int:
    """``zoo init``: write a manifest from a folder of checkpoints or a Hugging Face cache; ``zoo hash``: the sha256
    a manifest entry expects for a file or folder."""
    from mergebench.suites.real import zoo_init

    if args.action == "hash":
        if not args.path:
            print("error: zoo hash PATH [PATH...]", file=sys.stderr)
            return 2
        for path in args.path:
            print(zoo_init.describe_hash(path))
        return 0
    if bool(args.path) == bool(args.hf_cache):
        print("error: zoo init takes a folder (zoo init DIR) or --hf-cache DIR", file=sys.stderr)
        return 2
    model_config = None
    if args.model_config:
        model_config = json.loads(Path(args.model_config).read_text())
    quick_gelu = True if args.quick_gelu else (False if args.gelu else None)
    try:
        if args.hf_cache:
            written = zoo_init.init_hf_cache(args.hf_cache, args.out, args.model, quick_gelu, args.data_root, args.name)
        else:
            if len(args.path) != 1:
                print("error: zoo init takes one folder", file=sys.stderr)
                return 2
            written = [zoo_init.init_folder(args.path[0], args.out, args.model, model_config, args.backbone, quick_gelu,
                                            args.data_root, args.trust_pickle, args.name)]
    except (zoo_init.InitError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    incomplete = False
    for path, messages in written:
        print(f"wrote {path}")
        for m in messages:
            print(f"  {m}")
            incomplete |= m.startswith("INCOMPLETE")
        print(f"  next: mergebench run task_arithmetic --suite real --manifest {path} --data-root DATA")
    return 1 if incomplete else 0


def cmd_run(args) -> int:
    from mergebench.registry import list_methods
    from mergebench.run import run_many

    specs = list(args.methods)
    if args.all:
        specs += [m for m in list_methods() if m not in specs]
    if not specs:
        print("name at least one method (or --all); `mergebench list-methods` lists them", file=sys.stderr)
        return 2
    overrides = _kv(args.set)
    tune = {k: v.split(",") for k, v in _kv(args.tune).items()} or None
    if overrides and len(specs) != 1:
        print("--set applies to one method; write name(key=value) for several", file=sys.stderr)
        return 2
    from mergebench.pipeline import MethodCall

    if overrides:
        specs = [str(MethodCall.parse(specs[0]).with_hparams(**overrides))]
    for spec in specs:  # a misspelled method or hyperparameter is an error before the suite loads
        call = MethodCall.parse(spec).with_budget(args.budget).resolve()
        for name, values in (tune or {}).items():
            for value in values:
                call.with_hparams(**{name: value}).resolve()
    suite = _suite(args)
    if args.all:  # --all runs what the suite can run; a method named explicitly still reports its own error
        from mergebench.registry import get_method, unmet_requirements
        for name in [m for m in specs if m not in args.methods and unmet_requirements(get_method(m), suite)]:
            specs.remove(name)
            print(f"skipped {name}: needs {', '.join(unmet_requirements(get_method(name), suite))} experts, "
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


def cmd_diagnose(args) -> int:
    from mergebench.diagnose import DiagnoseSettings, diagnose, markdown
    from mergebench.io import atomic_write_text
    from mergebench.records import DIAGNOSTICS_FILE

    suite = _suite(args)
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


def cmd_leaderboard(args) -> int:
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


def cmd_demo(args) -> int:
    """Build the suite if needed, run every registered method, write and print the leaderboard."""
    args.methods, args.all, args.set, args.tune, args.leaderboard = [], True, [], [], True
    if args.jobs is None:  # every core runs a method (a method's small matrix products use one core well)
        from mergebench.run import resolve_device
        args.jobs = min(8, len(os.sched_getaffinity(0))) if resolve_device(args.device).type == "cpu" else 1
    if args.protocol == "sequential":  # every sequential method, and the one-shot baselines through the adapter
        from mergebench.registry import list_methods
        from mergebench.sequential import SEQUENTIAL_BASELINES
        args.methods, args.all = list_methods(needs="sequential") + list(SEQUENTIAL_BASELINES), False
    status = cmd_run(args)
    from mergebench import leaderboard

    print()
    print(leaderboard.render(args.results, _suite_name(args)))
    print(f"(written to {Path(args.results) / _suite_name(args) / 'LEADERBOARD.md'})")
    return status


def _suite_name(args):
    return args.suite


def cmd_sweep(args) -> int:
    """Expand methods x suites x seeds x grid into jobs and run the missing or failed ones."""
    from mergebench.executors import make_executor
    from mergebench.sweep import Sweep, job_status, render_status, run_sweep, summarize

    grid = {k: v.split(",") for k, v in _kv(args.grid).items()}
    seeds = args.seeds or None
    suites = args.suite.split(",") if args.suite else None
    options = _suite_options(args)
    if options:  # the same options for every suite named (e.g. --suite real --manifest M --data-root D)
        suites = [{"name": name, **options} for name in (suites or ["mini8"])]
    over = {"methods": list(args.methods), "suites": suites, "seeds": seeds, "grid": grid, "name": args.name,
            "device": None if args.device == "auto" else args.device, "time_limit_s": args.time_limit,
            "precision": None if args.precision == "auto" else args.precision,
            "results_dir": args.results}
    executor_cfg = {}
    if args.config:
        sweep, executor_cfg = Sweep.from_config(args.config, **over)
    else:
        sweep = Sweep(**{k: v for k, v in over.items() if v not in (None, [], {})})
    slurm = dict(executor_cfg.get("slurm") or {})
    for key in ("partition", "gpus", "time", "mem", "cpus", "account"):
        if getattr(args, f"slurm_{key}") is not None:
            slurm[key] = getattr(args, f"slurm_{key}")
    kind = args.executor or executor_cfg.get("executor", "local")
    jobs = args.jobs or executor_cfg.get("jobs", 1)
    try:
        executor = None if args.dry_run else make_executor(
            kind, jobs=jobs, folder=Path(sweep.results_dir) / "sweeps" / "submitit" / sweep.name, slurm=slurm,
            wait=True if args.wait else None)
    except ValueError as e:  # e.g. no Slurm on this machine
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_sweep(sweep, executor, dry_run=args.dry_run)  # a refused submission: one line (SubmissionError), exit 2
    if args.dry_run:
        return 0
    status = job_status(sweep.jobs(build=False))
    print(render_status(sweep, status))
    counts = summarize(status)
    if counts["queued"] or counts["running"]:
        print(f"follow them with `mergebench status {sweep.name}`; running the sweep again submits only the "
              f"missing and failed jobs")
    # queued and running jobs are a successful submission; failed or missing ones are not
    return 0 if counts["failed"] == counts["missing"] == 0 else 1


def cmd_new_method(args) -> int:
    from mergebench.scaffold import new_method

    try:
        root = new_method(args.name, args.dir, force=args.force)
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {root}\nnext: pip install -e {root} && mergebench check-plugin {args.name}")
    return 0


def cmd_check_plugin(args) -> int:
    from mergebench.conformance import check_plugin

    suite = None
    if args.suite != "micro":
        suite = _suite(args)
    reports = check_plugin(args.name, suite=suite, seed=args.seed, time_limit_s=args.time_limit)
    for report in reports:
        print(report.render())
    return 0 if all(r.ok for r in reports) else 1


def cmd_docs(args) -> int:
    from mergebench import docs

    if args.check:
        stale = docs.stale(args.out)
        if stale:
            print(f"out of date in {args.out}: {', '.join(stale)}; run `mergebench docs --out {args.out}`",
                  file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    paths = docs.write(args.out)
    print(f"wrote {len(paths)} pages to {args.out}")
    return 0


def cmd_status(args) -> int:
    from mergebench.sweep import Sweep, job_status, render_status, summarize

    sweep = Sweep.load(args.name, args.results)
    status = job_status(sweep.jobs(build=False))
    print(render_status(sweep, status, verbose=args.verbose))
    return 0 if summarize(status)["done"] == len(status) else 1


def budget_option(s):
    from mergebench.registry import BUDGETS

    s.add_argument("--budget", choices=BUDGETS, default="paper",
                   help="paper (default): every method's defaults, which are its paper's steps, batch sizes and data; "
                        "smoke: each method's declared few-step values (tests, quick checks; marked on the leaderboard "
                        "as below the paper's budget)")


def precision_option(s):
    from mergebench.context import PRECISIONS

    s.add_argument("--precision", choices=list(PRECISIONS), default="auto",
                   help="test-time adaptation loops' forward and backward passes: bf16 (bfloat16 autocast; merge, "
                        "trained parameters, optimizer and loss in float32), fp32 (as the official codes), or auto "
                        "(default): bf16 where the device multiplies bfloat16 in hardware (CUDA, AMX, AVX-512 BF16), "
                        "else fp32")


def seconds(text: str) -> float:
    """``--time-limit``: a positive, finite number of seconds (checked when the arguments are parsed)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def fraction(text: str) -> float:
    """``--data-fraction``: a number in (0, 1] (checked when the arguments are parsed)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}") from None
    if not (0 < value <= 1):  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1] (1 = all of the split), got {text!r}")
    return value


def seed_list(text: str) -> list[int]:
    """``--seeds``: comma-separated integers."""
    seeds = []
    for item in text.split(","):
        try:
            seeds.append(int(item))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,1,2; {item.strip()!r} in "
                                             f"{text!r} is not one") from None
    return seeds


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; given the command line ``argv``, only the named command's arguments are built (the others
    list their one-line help), so ``mergebench --help`` and ``--version`` import neither torch nor the suites."""
    from mergebench import __version__

    p = argparse.ArgumentParser(prog="mergebench", description="Benchmark model-merging methods on CLIP ViT encoders.")
    p.add_argument("--version", action="version", version=f"mergebench {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    named = None if argv is None else next((a for a in argv if not a.startswith("-")), "")

    def wanted(command: str) -> bool:
        return named is None or named == command

    def list_suites(*args, **kwargs):
        from mergebench.suites import list_suites

        return list_suites(*args, **kwargs)

    s = sub.add_parser("list-methods", help="list registered methods (built-ins and plugins)")
    if wanted("list-methods"):
        s.add_argument("pattern", nargs="?", default="*", help="shell-style wildcard, e.g. 'ada*'")
        s.add_argument("--needs", choices=list(NEEDS), help="filter by data needs")
        s.add_argument("-v", "--verbose", action="store_true", help="show hyperparameters and papers")
        s.add_argument("--json", action="store_true", help="machine-readable metadata")
        s.set_defaults(fn=cmd_list_methods)

    s = sub.add_parser("build", help="build (or load from cache) a suite")
    if wanted("build"):
        s.add_argument("suite", nargs="?", default="mini8", choices=list_suites(builds=True))
        s.add_argument("--artifact", action="store_true",
                       help="mini8, micro, mini8-lora, micro-lora: rebuild from nothing and write the committed artifact "
                            "(bench/suites/artifacts/SUITE: checkpoints, sha256, the accuracies measured at build)")
        s.add_argument("--jobs", type=int, metavar="N",
                       help="mini8 suites: fine-tune the experts (or LoRA adapters) in N processes at once, each with "
                            "the threads this one has (same bytes: each expert's run is seeded on its own; default "
                            "$MERGEBENCH_BUILD_JOBS, else 1)")
        s.set_defaults(fn=cmd_build)

    s = sub.add_parser("list-suites", help="list registered suites (built-ins and plugins) with their options")
    if wanted("list-suites"):
        s.add_argument("pattern", nargs="?", default="*", help="shell-style wildcard, e.g. 'mini*'")
        s.set_defaults(fn=cmd_list_suites)

    def suite_options(s, default="mini8"):
        s.add_argument("--suite", default=default, metavar="SUITE",
                       help=f"{', '.join(list_suites())} (`mergebench list-suites` describes them; default {default})")
        s.add_argument("--suite-option", action="append", metavar="KEY=VALUE",
                       help="an option of the suite's loader (`mergebench list-suites` lists them)")
        s.add_argument("--manifest", help="real suite: the model-zoo manifest (YAML) of backbone and experts")
        s.add_argument("--data-root", help="real suite: the folder holding the datasets (see `mergebench data check`)")
        s.add_argument("--trust-pickle", action="store_true",
                       help="real suite: read pickled checkpoints (task-vectors format) with a restricted unpickler "
                            "(tensor data only, model classes as inert placeholders; docs/reliability.md); "
                            "converted once to safetensors")
        s.add_argument("--tasks", help="real suite: comma-separated subset of tasks (default: every expert)")
        s.add_argument("--fraction", type=float, default=None,
                       help="synthetic suites (synthetic-vitb32, -vitb16, -vitl14): share of the real test-set sizes "
                            "(default 1: 87,433 test images)")

    def run_options(s):
        suite_options(s)
        s.add_argument("--results", default=os.environ.get("MERGEBENCH_RESULTS", "results"), help="records folder")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
        s.add_argument("--force", action="store_true", help="rerun configurations that already have an ok record")
        from mergebench.suites.base import SPLITS

        s.add_argument("--unlabeled-split", default="test", choices=list(SPLITS),
                       help="split that unlabeled streams draw from")
        s.add_argument("--data-fraction", type=fraction, default=1.0,
                       help="fraction of that split a method may see, in (0, 1]")
        s.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
        s.add_argument("--time-limit", type=seconds, default=None, metavar="SECONDS",
                       help="record a method as failed when its merge runs longer than this")
        s.add_argument("--memory-limit", type=seconds, default=None, metavar="MB",
                       help="record a method as failed when its process (with those it started) holds more resident "
                            "memory than this")
        s.add_argument("--protocol", choices=["one-shot", "sequential"], default=None,
                       help="sequential: experts arrive one at a time, evaluated after each on the tasks seen, over "
                            "--orders task orders (default: sequential for methods that need it, else one-shot)")
        s.add_argument("--orders", type=int, default=3, metavar="N",
                       help="sequential protocol: number of seeded random task orders (default 3)")
        precision_option(s)
        budget_option(s)
        s.add_argument("--jobs", type=int, default=None, metavar="N",
                       help="methods run at once, each in its own single-threaded CPU process, longest first "
                            "(default: 1 for run; for demo on a CPU, one per core up to 8)")

    s = sub.add_parser("run", help="merge, evaluate and record one or more methods",
                       description="METHOD_SPEC is a name or a call: 'ties_merging(k=10)', "
                                   "'surgery(base=task_arithmetic(scaling=0.3))'.")
    if wanted("run"):
        s.add_argument("methods", nargs="*", metavar="METHOD_SPEC")
        s.add_argument("--all", action="store_true", help="every registered method with its defaults")
        s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a hyperparameter (one method)")
        s.add_argument("--tune", action="append", metavar="KEY=V1,V2", help="select on the validation split")
        s.add_argument("--leaderboard", action="store_true", help="rewrite the suite's leaderboard files afterwards")
        run_options(s)
        s.set_defaults(fn=cmd_run)

    s = sub.add_parser("leaderboard", help="render the leaderboard from the records")
    if wanted("leaderboard"):
        s.add_argument("--suite", default="mini8")
        s.add_argument("--results", default=os.environ.get("MERGEBENCH_RESULTS", "results"))
        from mergebench.leaderboard import sequential_formats, text_formats

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
        s.set_defaults(fn=cmd_leaderboard)

    s = sub.add_parser("diagnose", help="measure the mechanisms merging methods exploit on a suite's experts "
                                        "(trimming, low rank, input subspaces, entropy signal)")
    if wanted("diagnose"):
        suite_options(s)
        s.add_argument("--results", default=os.environ.get("MERGEBENCH_RESULTS", "results"),
                       help="with --write: the report goes to RESULTS/<suite>/DIAGNOSTICS.md and diagnostics.json")
        s.add_argument("--write", action="store_true", help="write the report next to the suite's leaderboard")
        s.add_argument("--split", default="test", choices=("val", "test"), help="where accuracies are measured")
        s.add_argument("--images", type=int, default=1000, help="at most this many images per task per accuracy")
        s.add_argument("--exemplars", type=int, default=64, help="training images per task for the layer inputs")
        s.add_argument("--steps", type=int, default=150, help="Adam steps of each layer-wise coefficient loop")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("-q", "--quiet", action="store_true")
        s.set_defaults(fn=cmd_diagnose)

    s = sub.add_parser("data", help="real-suite datasets: check what is on disk, or prepare the preprocessing cache")
    if wanted("data"):
        s.add_argument("action", choices=["check", "prepare"])
        s.add_argument("--root", required=True, help="the data root (layouts in datasets/*.yaml)")
        s.add_argument("--tasks", help="comma-separated datasets (default: all eight)")
        s.add_argument("--verify", action="store_true", help="check: also verify md5 checksums of files stored as published")
        s.add_argument("--image-size", type=int, default=224, help="the model's input size (check: the space a prepare "
                                                                    "takes at that size)")
        s.add_argument("--splits", default="test", help="prepare: comma-separated splits to cache, or all (default test: "
                                                        "what every run reads; train and val are cached on first use by "
                                                        "the methods that read them)")
        s.add_argument("--workers", type=int, default=None, help="prepare: decoding threads")
        s.set_defaults(fn=cmd_data)

    s = sub.add_parser("zoo", help="model-zoo manifests: write one from your files (init), or hash a file (hash)",
                       description="zoo init DIR: scan a folder of checkpoints (task names from file names, formats "
                                   "from content, sha256 of every file) and write DIR/manifest.yaml. zoo init "
                                   "--hf-cache DIR: the same from a Hugging Face cache (openai/clip-vit-* backbones, "
                                   "<org>/clip-vit-*_<task> experts). zoo hash PATH: the sha256 a manifest expects. "
                                   "Fields: docs/manifest.md.")
    if wanted("zoo"):
        s.add_argument("action", choices=["init", "hash"])
        s.add_argument("path", nargs="*", help="init: the folder to scan; hash: files or folders")
        s.add_argument("--hf-cache", metavar="DIR", help="init: a Hugging Face cache folder (hub, or the folder holding it)")
        s.add_argument("--out", "-o", help="init: the manifest to write (default DIR/manifest.yaml; --hf-cache: "
                                           "./<model>.yaml)")
        s.add_argument("--model", help="init: the open_clip model config name (default: matched by tensor shapes)")
        s.add_argument("--model-config", metavar="FILE.json", help="init: open_clip.CLIP arguments for an architecture "
                                                                   "open_clip has no name for")
        s.add_argument("--backbone", metavar="FILE", help="init: the full CLIP checkpoint (default: found in the folder)")
        g = s.add_mutually_exclusive_group()
        g.add_argument("--quick-gelu", action="store_true", help="init: the backbone uses QuickGELU (OpenAI's weights)")
        g.add_argument("--gelu", action="store_true", help="init: the backbone uses GELU (LAION, DataComp weights)")
        s.add_argument("--data-root", help="init: write this data root into the manifest")
        s.add_argument("--name", help="init: the suite name (real-NAME; default: the model)")
        s.add_argument("--trust-pickle", action="store_true", help="init: the backbone is a pickled model you trust")
        s.set_defaults(fn=cmd_zoo)

    s = sub.add_parser("sweep", help="methods x suites x seeds x hyperparameter grid as independent jobs",
                       description="Each job writes its own record; running the same sweep again runs only the "
                                   "missing or failed jobs. Settings can come from --config (YAML).")
    if wanted("sweep"):
        s.add_argument("methods", nargs="*", metavar="METHOD_SPEC")
        s.add_argument("--config", help="YAML with methods, suites, seeds, grid, time_limit, executor, jobs, slurm: {...}")
        s.add_argument("--name", help="sweep name (default: a hash of its definition); `mergebench status NAME`")
        s.add_argument("--suite", help="comma-separated suites (backbones), default mini8; a suite with options: "
                                       "--suite-option KEY=VALUE or the real suite's flags, or the YAML config's "
                                       "suites: [{name: real, manifest: M.yaml, data_root: DIR}]")
        s.add_argument("--suite-option", action="append", metavar="KEY=VALUE", help="an option of the suites' loader")
        s.add_argument("--manifest", help="real suite: the model-zoo manifest")
        s.add_argument("--data-root", help="real suite: the datasets' folder")
        s.add_argument("--trust-pickle", action="store_true", help="real suite: allow pickled checkpoints")
        s.add_argument("--tasks", help="real suite: comma-separated subset of tasks")
        s.add_argument("--seeds", type=seed_list, help="comma-separated seeds, default 0")
        s.add_argument("--grid", action="append", metavar="KEY=V1,V2", help="hyperparameter values (KEY or method.KEY)")
        s.add_argument("--executor", choices=["local", "slurm", "submitit-local"], help="default local")
        s.add_argument("--jobs", type=int, help="local: processes at a time")
        precision_option(s)
        s.add_argument("--partition", dest="slurm_partition", help="slurm partition")
        s.add_argument("--gpus", dest="slurm_gpus", type=int, help="slurm: GPUs per job (default: none)")
        s.add_argument("--time", dest="slurm_time", type=int, help="slurm: minutes per job (default 60)")
        s.add_argument("--mem", dest="slurm_mem", help="slurm: memory per job, e.g. 32GB")
        s.add_argument("--cpus", dest="slurm_cpus", type=int, help="slurm: CPUs per job")
        s.add_argument("--account", dest="slurm_account", help="slurm account")
        s.add_argument("--wait", action="store_true", help="slurm: wait for the jobs to finish")
        s.add_argument("--dry-run", action="store_true", help="list the jobs that would run; writes nothing")
        s.add_argument("--results", default=os.environ.get("MERGEBENCH_RESULTS", "results"))
        s.add_argument("--device", default="auto")
        s.add_argument("--time-limit", type=seconds, default=None, metavar="SECONDS", help="per-job merge time limit")
        s.set_defaults(fn=cmd_sweep)

    s = sub.add_parser("new-method", help="scaffold an installable method plugin package")
    if wanted("new-method"):
        s.add_argument("name", help="the method's registry name, e.g. my_merging")
        s.add_argument("--dir", default=".", help="where to create mergebench-NAME/ (default: here)")
        s.add_argument("--force", action="store_true", help="overwrite an existing folder")
        s.set_defaults(fn=cmd_new_method)

    s = sub.add_parser("check-plugin", help="conformance kit for a method (or every method of a plugin)")
    if wanted("check-plugin"):
        s.add_argument("name", help="method name, wildcard, or plugin distribution / entry-point name")
        suite_options(s, default="micro")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--time-limit", type=seconds, default=600.0, metavar="SECONDS",
                       help="fail the checks of a method whose runs take longer than this (default 600; the process is "
                            "killed at the deadline)")
        s.add_argument("-q", "--quiet", action="store_true")
        s.set_defaults(fn=cmd_check_plugin)

    s = sub.add_parser("docs", help="write one reference page per built-in method from the registry")
    if wanted("docs"):
        s.add_argument("--out", default="docs/methods")
        s.add_argument("--check", action="store_true", help="only report pages that are out of date")
        s.set_defaults(fn=cmd_docs)

    s = sub.add_parser("status", help="done, running, failed and missing jobs of a sweep")
    if wanted("status"):
        s.add_argument("name", help="the sweep's name (printed by `mergebench sweep`)")
        s.add_argument("--results", default=os.environ.get("MERGEBENCH_RESULTS", "results"))
        s.add_argument("-v", "--verbose", action="store_true", help="list done jobs too")
        s.set_defaults(fn=cmd_status)

    s = sub.add_parser("demo", help="run every method on mini8 (the committed suite; records already made are reused), write and print the leaderboard")
    if wanted("demo"):
        run_options(s)
        s.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    if getattr(args, "quiet", False):  # no progress bars anywhere (mergebench.progress)
        os.environ["MERGEBENCH_QUIET"] = "1"
    previous, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        return args.fn(args)
    except MergebenchError as e:  # what the user can fix: the message says what; anything else is a bug
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: {disk_full_message(e.filename, e)}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = previous


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning on the command line: one line saying what (the source line of the call is no help to a user)."""
    return f"warning: {message}\n"


if __name__ == "__main__":
    sys.exit(main())
