"""Sweeps: methods x suites (backbones) x seeds x hyperparameter grid, as independent jobs.

Each job is one ``run_method`` call that writes its own record, so a sweep needs no shared
state: its status is read back from the records. A sweep is saved as a manifest
(``RESULTS/sweeps/NAME.yaml``); ``mergebench status NAME`` reports every job as

- ``done``: an ok record with the job's config hash exists;
- ``failed``: only a failed record exists (its error is shown);
- ``running``: a worker holds the job's marker (``RESULTS/SUITE/.running/HASH.lock``) and,
  when it runs on this host, its process is alive;
- ``missing``: nothing yet, or the worker died before writing (a killed worker leaves no
  record, only a stale marker).

Running the same sweep again submits only the ``missing`` and ``failed`` jobs.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from mergebench.errors import InputError
from mergebench.io import atomic_write_text, safe_name
from mergebench.registry import HyperparameterError

STATES = ("done", "running", "failed", "missing")
_KEYS = {"methods", "suites", "seeds", "grid", "results_dir", "device", "time_limit_s", "name"}


class SweepFileError(InputError):
    """A sweep's YAML (its config or its saved definition) cannot be read; the message names the file."""


def _read_yaml(path: Path, what: str) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise SweepFileError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise SweepFileError(f"{what} {path} is not valid YAML ({' '.join(str(e).split())}); fix or remove it") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SweepFileError(f"{what} {path} holds a {type(data).__name__}, not a mapping of sweep settings "
                             f"(methods:, suites:, seeds:, grid:, ...)")
    return data


@dataclass(frozen=True)
class Job:
    """One run: a resolved method spec on one suite with one seed."""

    pipeline: str
    suite: str
    seed: int
    results_dir: str
    config_hash: str
    device: str = "auto"
    time_limit_s: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Job":
        return cls(**d)

    def marker(self) -> Path:
        return Path(self.results_dir) / self.suite / ".running" / f"{self.config_hash}.lock"


@dataclass
class Sweep:
    methods: list[str]
    suites: list[str] = field(default_factory=lambda: ["mini8"])
    seeds: list[int] = field(default_factory=lambda: [0])
    grid: dict[str, list] = field(default_factory=dict)  # "param" or "method.param" -> values
    results_dir: str = "results"
    device: str = "auto"
    time_limit_s: float | None = None
    name: str = ""

    def __post_init__(self):
        from mergebench.limits import check_seconds

        if not self.methods:
            raise HyperparameterError("a sweep needs at least one method")
        if not self.name:
            from mergebench.records import config_hash
            self.name = "sweep-" + config_hash({"methods": self.methods, "suites": self.suites, "seeds": self.seeds,
                                                "grid": self.grid})[:8]
        safe_name(self.name, "sweep name")  # it names RESULTS/sweeps/NAME.yaml
        self.time_limit_s = check_seconds(self.time_limit_s, "the sweep's time limit")

    # ------------------------------------------------------------ expansion
    def calls(self) -> list:
        """The resolved method calls: each method crossed with the grid values it takes."""
        from mergebench.pipeline import MethodCall
        from mergebench.registry import close_matches, get_method

        calls, used = [], set()
        for text in self.methods:
            base = MethodCall.parse(text)
            spec = get_method(base.name)
            axes = {}
            for key, values in self.grid.items():
                method, _, param = key.rpartition(".")
                if (method and method != base.name) or param not in spec.hyperparameters:
                    continue
                axes[param] = list(values)
                used.add(key)
            names = list(axes)
            for combo in itertools.product(*(axes[n] for n in names)):
                call = base.with_hparams(**dict(zip(names, combo))).resolve()
                if call not in calls:
                    calls.append(call)
        unused = [k for k in self.grid if k not in used]
        if unused:
            takes = sorted({h for m in self.methods for h in get_method(MethodCall.parse(m).name).hyperparameters})
            raise HyperparameterError(
                f"grid key {unused[0]!r} matches no hyperparameter of the sweep's methods"
                f"{close_matches(unused[0].rpartition('.')[2], takes)} (they take: {', '.join(takes) or 'none'}; "
                f"write method.param to target one method)")
        return calls

    def jobs(self, build: bool = True) -> list[Job]:
        """Every job of the sweep (loads each suite, building it once here if ``build``)."""
        from mergebench.records import config_hash
        from mergebench.run import run_config
        from mergebench.suites import get_suite

        calls = self.calls()
        out = []
        for suite_name in self.suites:
            suite = get_suite(suite_name, build=build, verbose=False)
            for call, seed in itertools.product(calls, self.seeds):
                chash = config_hash(run_config(call, suite, seed))
                out.append(Job(str(call), suite.name, int(seed), str(self.results_dir), chash, self.device,
                               self.time_limit_s))
        return out

    # ------------------------------------------------------------ manifest
    def manifest_path(self) -> Path:
        return Path(self.results_dir) / "sweeps" / f"{self.name}.yaml"

    def save(self) -> Path:
        data = {"name": self.name, "methods": self.methods, "suites": self.suites, "seeds": self.seeds,
                "grid": self.grid, "device": self.device, "time_limit_s": self.time_limit_s}
        return atomic_write_text(self.manifest_path(), yaml.safe_dump(data, sort_keys=False))

    @classmethod
    def load(cls, name: str, results_dir: str | os.PathLike = "results") -> "Sweep":
        from mergebench.errors import MissingFileError

        path = Path(results_dir) / "sweeps" / f"{safe_name(name, 'sweep name')}.yaml"
        if not path.exists():
            known = sorted(p.stem for p in path.parent.glob("*.yaml")) if path.parent.exists() else []
            from mergebench.registry import close_matches
            raise MissingFileError(f"no sweep {name!r} in {path.parent}{close_matches(name, known)} "
                                   f"(sweeps there: {', '.join(known) or 'none'})")
        data = _read_yaml(path, "sweep definition")
        unknown = set(data) - _KEYS
        if unknown or not data.get("methods"):
            raise SweepFileError(f"sweep definition {path} " + (f"has unknown keys {sorted(unknown)}" if unknown else
                                                                "names no methods") + "; run the sweep again to rewrite it")
        return cls(**{**data, "results_dir": str(results_dir)})

    @classmethod
    def from_config(cls, path: str | os.PathLike, **overrides) -> tuple["Sweep", dict]:
        """A sweep from a YAML file; returns it and the file's executor settings (``executor``, ``slurm``, ``jobs``)."""
        data = _read_yaml(Path(path), "sweep config")
        executor = {k: data.pop(k) for k in ("executor", "slurm", "jobs") if k in data}
        if "time_limit" in data:
            data["time_limit_s"] = data.pop("time_limit")
        for k in ("suites", "methods"):
            if isinstance(data.get(k), str):
                data[k] = [data[k]]
        data.update({k: v for k, v in overrides.items() if v not in (None, [], {})})
        unknown = set(data) - _KEYS
        if unknown:
            raise HyperparameterError(f"unknown keys in sweep config {path}: {sorted(unknown)}")
        return cls(**data), executor


# ------------------------------------------------------------ status
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def job_status(jobs: list[Job]) -> list[dict]:
    """``[{job, state, error?, note?}]`` from the records and the running markers."""
    from mergebench.records import load_records

    by_hash: dict[tuple, dict] = {}
    for results_dir, suite in {(j.results_dir, j.suite) for j in jobs}:
        for rec in load_records(results_dir, suite).records:
            key = (results_dir, suite, rec.get("config_hash"))
            if key not in by_hash or rec.get("status") == "ok":
                by_hash[key] = rec
    out = []
    for job in jobs:
        rec = by_hash.get((job.results_dir, job.suite, job.config_hash))
        entry = {"job": job}
        if rec is not None and rec.get("status") == "ok":
            entry["state"] = "done"
        else:
            marker = job.marker()
            info = None
            if marker.exists():
                try:
                    info = json.loads(marker.read_text())
                except (OSError, ValueError):
                    info = None
            if info and (info.get("host") != socket.gethostname() or _alive(int(info.get("pid", -1)))):
                entry["state"], entry["note"] = "running", f"pid {info.get('pid')} on {info.get('host')}"
            elif rec is not None:
                entry["state"], entry["error"] = "failed", rec.get("error", "?")
            else:
                entry["state"] = "missing"
                if info:
                    entry["note"] = f"worker pid {info.get('pid')} died before writing a record (killed?)"
        out.append(entry)
    return out


def summarize(status: list[dict]) -> dict[str, int]:
    counts = {s: 0 for s in STATES}
    for entry in status:
        counts[entry["state"]] += 1
    return counts


def pending(jobs: list[Job]) -> list[Job]:
    """The jobs to (re)submit: missing or failed (done and running ones are left alone)."""
    return [e["job"] for e in job_status(jobs) if e["state"] in ("missing", "failed")]


def render_status(sweep: Sweep, status: list[dict], verbose: bool = False) -> str:
    from tabulate import tabulate

    counts = summarize(status)
    lines = [f"sweep {sweep.name}: {len(status)} jobs: " + ", ".join(f"{counts[s]} {s}" for s in STATES)]
    rows = [[e["state"], e["job"].suite, e["job"].pipeline, e["job"].seed, e.get("error") or e.get("note", "")]
            for e in status if verbose or e["state"] != "done"]
    if rows:
        lines.append(tabulate(rows, headers=["state", "suite", "pipeline", "seed", "detail"]))
    return "\n".join(lines)


# ------------------------------------------------------------ the worker
def run_job(job: Job | dict) -> dict:
    """Run one job in this process (what every executor calls); returns a short summary.

    A marker file says which process holds the job while it runs; the record itself is
    written atomically by ``run_method``, so a worker killed at any point leaves no partial
    record and the job reads as ``missing``.
    """
    from mergebench.limits import reserve_threads
    from mergebench.run import run_method
    from mergebench.suites import get_suite

    job = Job.from_dict(job) if isinstance(job, dict) else job
    if job.time_limit_s:  # the merge runs in a forked child: it gets this worker's threads (mergebench.limits)
        reserve_threads()
    marker = job.marker()
    atomic_write_text(marker, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                          "pipeline": job.pipeline, "seed": job.seed}))
    try:
        suite = get_suite(job.suite, build=False, verbose=False)
        rec = run_method(job.pipeline, suite, results_dir=job.results_dir, seed=job.seed, device=job.device,
                         time_limit_s=job.time_limit_s, show_progress=False)
    finally:
        marker.unlink(missing_ok=True)
    if rec["config_hash"] != job.config_hash:
        raise RuntimeError(f"job {job.pipeline} seed {job.seed}: the suite changed since the sweep was planned "
                           f"(config hash {rec['config_hash']} != {job.config_hash}); run the sweep again")
    return {"config_hash": rec["config_hash"], "status": rec["status"], "error": rec.get("error"),
            "skipped": bool(rec.get("skipped"))}


def run_sweep(sweep: Sweep, executor, log=print, dry_run: bool = False) -> list:
    """Save the manifest, then submit every job that is missing or failed; returns the executors' outcomes."""
    jobs = sweep.jobs()
    sweep.save()
    todo = pending(jobs)
    log(f"sweep {sweep.name}: {len(jobs)} jobs; {len(jobs) - len(todo)} done or running; "
        f"{'would run' if dry_run else 'running'} {len(todo)}")
    if dry_run:
        for job in todo:
            log(f"  {job.suite}  {job.pipeline}  seed {job.seed}")
        return []
    return executor.run(todo, log)
