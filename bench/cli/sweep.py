"""``mergebench sweep METHOD_SPEC... [--config sweep.yaml] [--grid k=v1,v2] [--seeds 0,1] [--executor local|slurm]``:
methods x suites x seeds x hyperparameter grid as independent jobs."""

from __future__ import annotations

import sys
from pathlib import Path

from mergebench.cli import options

HELP = "methods x suites x seeds x hyperparameter grid as independent jobs"
DESCRIPTION = ("Each job writes its own record; running the same sweep again runs only the missing or failed jobs. "
               "Settings can come from --config (YAML).")


def add_arguments(s) -> None:
    s.add_argument("methods", nargs="*", metavar="METHOD_SPEC")
    s.add_argument("--config", help="YAML with methods, suites, seeds, grid, time_limit, executor, jobs, slurm: {...}")
    s.add_argument("--name", help="sweep name (default: a hash of its definition); `mergebench status NAME`")
    options.add_suite_arguments(s, default=None, help="comma-separated suites (backbones), default mini8; the suites' "
                                                      "options (the same for each): --suite-option KEY=VALUE or the "
                                                      "flags the suites declare (below), or the YAML config's suites: "
                                                      "[{name: real, manifest: M.yaml, data_root: DIR}]")
    s.add_argument("--seeds", type=options.seed_list, help="comma-separated seeds, default 0")
    s.add_argument("--grid", action="append", metavar="KEY=V1,V2", help="hyperparameter values (KEY or method.KEY)")
    s.add_argument("--executor", choices=["local", "slurm", "submitit-local"], help="default local")
    s.add_argument("--jobs", type=int, help="local: processes at a time")
    options.add_precision_argument(s)
    s.add_argument("--partition", dest="slurm_partition", help="slurm partition")
    s.add_argument("--gpus", dest="slurm_gpus", type=int, help="slurm: GPUs per job (default: none)")
    s.add_argument("--time", dest="slurm_time", type=int, help="slurm: minutes per job (default 60)")
    s.add_argument("--mem", dest="slurm_mem", help="slurm: memory per job, e.g. 32GB")
    s.add_argument("--cpus", dest="slurm_cpus", type=int, help="slurm: CPUs per job")
    s.add_argument("--account", dest="slurm_account", help="slurm account")
    s.add_argument("--wait", action="store_true", help="slurm: wait for the jobs to finish")
    s.add_argument("--dry-run", action="store_true", help="list the jobs that would run; writes nothing")
    options.results_option(s, help=None)
    s.add_argument("--device", default="auto")
    s.add_argument("--time-limit", type=options.seconds, default=None, metavar="SECONDS", help="per-job merge time limit")
    options.add_suite_flags(s)


def main(args) -> int:
    """Expand methods x suites x seeds x grid into jobs and run the missing or failed ones."""
    from mergebench.sweeps.executors import make_executor
    from mergebench.sweeps.sweep import Sweep, job_status, render_status, run_sweep, summarize

    grid = {k: v.split(",") for k, v in options.key_values(args.grid).items()}
    seeds = args.seeds or None
    suites = args.suite.split(",") if args.suite else None
    suite_options = options.given_suite_options(args)
    if suite_options:  # the same options for every suite named (e.g. --suite real --manifest M --data-root D)
        suites = [{"name": name, **suite_options} for name in (suites or ["mini8"])]
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
