"""Sweeps: methods x suites (backbones) x seeds x hyperparameter grid, as independent jobs.

Each job is one ``run_method`` call that writes its own record, so a sweep needs no shared
state: its status is read back from the records, the job markers and the scheduler. A sweep is
saved as a manifest (``RESULTS/sweeps/NAME.yaml``); ``mergebench status NAME`` reports every job as

- ``done``: an ok record with the job's config hash exists;
- ``queued``: submitted to Slurm and waiting there (pending, or requeued and pending again);
- ``running``: a live worker holds the job (see below);
- ``failed``: only a failed record exists (its error is shown);
- ``missing``: nothing yet, or the worker died before writing (a killed worker leaves no
  record, only a marker that no live worker holds).

The marker (``RESULTS/SUITE/.running/HASH.lock``, JSON) says who holds a job. The Slurm executor
writes one per job at submission (``scheduler``, ``job_id``); the worker replaces it when it
starts (``pid``, ``host``, the Slurm job id if any) and rewrites its ``heartbeat`` time every
``heartbeat_s`` seconds (``MERGEBENCH_HEARTBEAT_S``, default 30) until it removes the marker.
A job whose marker names a Slurm job is whatever ``squeue`` says that job is (pending or requeued:
``queued``; running: ``running``; finished, cancelled or no longer known: the worker is gone);
when ``squeue`` cannot answer, or the marker names no Slurm job, the worker is live if its
process exists (same host) and its heartbeat is at most ``STALE_BEATS`` (10) intervals old
(5 minutes by default). So a worker killed with -9, out of memory or with its node leaves a
job that reads ``missing`` (at once on the same host, else once Slurm drops the job or the
heartbeat is stale), and a queued or requeued job is never submitted twice.

Running the same sweep again submits only the ``missing`` and ``failed`` jobs.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import yaml
from tabulate import tabulate

from mergebench.errors import InputError, MissingFileError
from mergebench.engine.io import atomic_write_text, safe_name
from mergebench.api.registry import HyperparameterError, close_matches, get_method
from mergebench.sweeps.slurm_queue import SchedulerError, SlurmQueue
from mergebench.api.context import PRECISIONS, resolve_precision
from mergebench.api.pipeline import MethodCall
from mergebench.engine import worker
from mergebench.engine.limits import check_seconds
from mergebench.engine.records import config_hash, load_records
from mergebench.engine.run import run_method
from mergebench.engine.runspec import RunSpec, resolve_device
from mergebench.suites import get_suite, get_suite_spec

STATES = ("done", "queued", "running", "failed", "missing")
STALE_BEATS = 10  # a worker's marker is stale after this many heartbeat intervals without a beat
# the settings of every run of a sweep beyond its seed, device, precision and time limit (``RunSpec.build``'s),
# with their defaults: a sweep's YAML may set them
RUN_SETTINGS = {"budget": "paper", "protocol": None, "orders": 3, "unlabeled_split": "test", "data_fraction": 1.0,
                "tune": None, "memory_limit_mb": None}
_KEYS = {"methods", "suites", "seeds", "grid", "results_dir", "device", "time_limit_s", "name", "precision",
         *RUN_SETTINGS}


def heartbeat_s() -> float:
    """Seconds between a worker's heartbeats (``MERGEBENCH_HEARTBEAT_S``, default 30)."""
    value = os.environ.get("MERGEBENCH_HEARTBEAT_S", "30")
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise InputError(f"MERGEBENCH_HEARTBEAT_S={value!r}: give a positive number of seconds (default 30)")
    return seconds


class SweepFileError(InputError):
    """A sweep's YAML (its config or its saved definition) cannot be read; the message names the file."""


class SweepNameError(InputError):
    """A sweep name already names a saved sweep with another definition."""


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
    # the registered suite and its options (``get_suite(suite_spec, **suite_options)``); ``suite`` above is the
    # results folder its records go to (the real suite's is ``real-NAME``)
    suite_spec: str = ""
    suite_options: dict = field(default_factory=dict)
    # resolved when the sweep is planned (its config hash depends on it), not on the worker; jobs planned before
    # the field existed ran at the then default, bf16
    precision: str = "bf16"
    settings: dict = field(default_factory=dict)  # the sweep's RUN_SETTINGS that differ from their defaults

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Job":
        return cls(**d)

    def spec(self, suite):
        """The job's :class:`mergebench.engine.runspec.RunSpec` on ``suite`` (the loaded suite it names)."""
        return RunSpec.build(self.pipeline, suite, seed=self.seed, device=self.device, precision=self.precision,
                             time_limit_s=self.time_limit_s, **self.settings)

    def marker(self) -> Path:
        return Path(self.results_dir) / self.suite / ".running" / f"{self.config_hash}.lock"


@dataclass
class Sweep:
    methods: list[str]
    # suite names, or {name: SUITE, OPTION: VALUE, ...} for a suite with options (the real suite's manifest, ...)
    suites: list = field(default_factory=lambda: ["mini8"])
    seeds: list[int] = field(default_factory=lambda: [0])
    grid: dict[str, list] = field(default_factory=dict)  # "param" or "method.param" -> values
    results_dir: str = "results"
    device: str = "auto"
    time_limit_s: float | None = None
    name: str = ""
    # of the test-time adaptation loops; "auto" is resolved on the machine that plans the sweep, for ``device``
    # (pin bf16 or fp32 when the workers' devices differ from it, e.g. GPU nodes planned from a CPU login node)
    precision: str = "auto"
    budget: str = "paper"
    protocol: str | None = None
    orders: int | list = 3
    unlabeled_split: str = "test"
    data_fraction: float = 1.0
    tune: dict | None = None
    memory_limit_mb: float | None = None

    def __post_init__(self):
        if not self.methods:
            raise HyperparameterError("a sweep needs at least one method")
        if not self.name:
            self.name = "sweep-" + config_hash({"methods": self.methods, "suites": self.suites, "seeds": self.seeds,
                                                "grid": self.grid})[:8]
        safe_name(self.name, "sweep name")  # it names RESULTS/sweeps/NAME.yaml
        self.time_limit_s = check_seconds(self.time_limit_s, "the sweep's time limit")
        if self.precision not in PRECISIONS:
            raise HyperparameterError(f"sweep precision {self.precision!r} is not one of {list(PRECISIONS)}")

    # ------------------------------------------------------------ expansion
    def calls(self) -> list:
        """The resolved method calls under the sweep's budget: each method crossed with the grid values it takes."""
        calls, used = [], set()
        for text in self.methods:
            base = MethodCall.parse(text).with_budget(self.budget)  # its budget fills what the text leaves unset
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
        calls = self.calls()
        precision = resolve_precision(self.precision, resolve_device(self.device))
        settings = self.run_settings()
        out = []
        for entry in self.suites:
            name, options = suite_entry(entry)
            suite = get_suite(name, build=build, verbose=False, **options)
            for call, seed in itertools.product(calls, self.seeds):
                job = Job(str(call), suite.name, int(seed), str(self.results_dir), "", self.device,
                          self.time_limit_s, name, options, precision, settings)
                out.append(replace(job, config_hash=job.spec(suite).config_hash()))
        return out

    def run_settings(self) -> dict:
        """The sweep's run settings (``RUN_SETTINGS``) that differ from their defaults."""
        return {k: getattr(self, k) for k, default in RUN_SETTINGS.items() if getattr(self, k) != default}

    # ------------------------------------------------------------ manifest
    def manifest_path(self) -> Path:
        return Path(self.results_dir) / "sweeps" / f"{self.name}.yaml"

    # what decides a sweep's jobs: a saved definition that differs in one of these is another sweep
    DEFINITION = ("methods", "suites", "seeds", "grid", "precision", *RUN_SETTINGS)

    def check_name(self) -> None:
        """A name in use by a saved sweep with another definition is an error (``save`` would replace it): the
        message names the file and both definitions' differences. An unreadable definition is never replaced."""
        path = self.manifest_path()
        if not path.exists():
            return
        saved = _read_yaml(path, "sweep definition")
        ours = yaml.safe_load(yaml.safe_dump(self._definition()))
        differ = [k for k in self.DEFINITION if saved.get(k) != ours.get(k)]
        if differ:
            shown = "; ".join(f"{k}: saved {saved.get(k)!r}, now {ours.get(k)!r}" for k in differ)
            raise SweepNameError(f"sweep name {self.name!r} is in use by {path}, a sweep with another definition "
                                 f"({shown}): give this one another --name, or delete {path} to replace it")

    def _definition(self) -> dict:
        return {"name": self.name, "methods": self.methods, "suites": self.suites, "seeds": self.seeds,
                "grid": self.grid, "device": self.device, "time_limit_s": self.time_limit_s,
                "precision": self.precision, **self.run_settings()}

    def save(self) -> Path:
        self.check_name()
        return atomic_write_text(self.manifest_path(), yaml.safe_dump(self._definition(), sort_keys=False))

    @classmethod
    def load(cls, name: str, results_dir: str | os.PathLike = "results") -> "Sweep":
        path = Path(results_dir) / "sweeps" / f"{safe_name(name, 'sweep name')}.yaml"
        if not path.exists():
            known = sorted(p.stem for p in path.parent.glob("*.yaml")) if path.parent.exists() else []
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


def suite_entry(entry) -> tuple[str, dict]:
    """(registered name, options) of one of a sweep's suites: ``"mini8"`` or ``{"name": "real", "manifest": ...}``."""
    if isinstance(entry, str):
        return entry, {}
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise HyperparameterError(f"a sweep's suite is a name or a mapping with a name and the suite's options "
                                  f"({{name: real, manifest: M.yaml, data_root: DIR}}), not {entry!r}")
    spec = get_suite_spec(entry["name"])
    return entry["name"], spec.parse_options({k: v for k, v in entry.items() if k != "name"})


# ------------------------------------------------------------ markers and status
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_marker(job: Job) -> dict | None:
    """The job's marker as a dict: None when there is none, {} when it cannot be read (nobody holds it)."""
    path = job.marker()
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    if not isinstance(info, dict):
        return {}
    if "pid" in info and "heartbeat" not in info:  # written before markers had heartbeats: the file's time
        try:
            info["heartbeat"] = path.stat().st_mtime
        except OSError:
            pass
    return info


def write_submitted_markers(jobs: list[Job], job_ids: list[str], scheduler: str = "slurm") -> None:
    """Mark jobs as held by the scheduler's jobs ``job_ids`` (written right after a submission)."""
    host, now = socket.gethostname(), time.time()
    for job, job_id in zip(jobs, job_ids):
        atomic_write_text(job.marker(), json.dumps({"scheduler": scheduler, "job_id": str(job_id), "host": host,
                                                    "submitted": now, "pipeline": job.pipeline,
                                                    "seed": job.seed}))


def _holder(info: dict, sched: dict | None, sched_error: str | None, now: float) -> tuple[str | None, str]:
    """Who holds a job, from its marker: ("queued" | "running", note), or (None, why nobody does)."""
    job_id = info.get("job_id") if info.get("scheduler") == "slurm" else None
    pid, host = info.get("pid"), info.get("host")
    if pid is not None and not isinstance(pid, int):
        return None, f"a marker with an unreadable pid {pid!r} (no live worker holds the job)"
    local_dead = pid is not None and host == socket.gethostname() and not _alive(pid)
    if job_id and sched is not None:
        # the scheduler knows best: a requeued job whose worker died is queued again, not missing
        state = sched.get(str(job_id))
        kind = SlurmQueue.classify(state)
        if kind == "queued" or (kind == "running" and not local_dead):
            return kind, f"Slurm job {job_id} {state}" + (f", pid {pid} on {host}" if kind == "running" and pid else "")
        if not local_dead:
            if state is None:
                return None, f"Slurm job {job_id} is no longer in the queue and wrote no record (cancelled or killed?)"
            return None, f"Slurm job {job_id} ended ({state}) without writing a record"
    # no word from the scheduler: the worker's process and heartbeat
    if pid is None:
        why = "an unreadable marker (no live worker holds the job)"
    elif local_dead:
        why = f"worker pid {pid} on {host} died before writing a record (killed?)"
    else:
        try:
            interval, beat = float(info.get("heartbeat_s") or heartbeat_s()), float(info["heartbeat"])
        except (KeyError, TypeError, ValueError):
            interval, beat = 0.0, None
        age, stale = (now - beat if beat is not None else None), STALE_BEATS * interval
        if age is None:
            why = f"worker pid {pid} on {host}: the marker has no heartbeat"
        elif age > stale:
            why = f"worker pid {pid} on {host}: no heartbeat for {age:.0f} s (stale after {stale:.0f} s); killed?"
        else:
            return "running", f"pid {pid} on {host}" + (f" (Slurm job {job_id}; squeue: {sched_error})"
                                                         if job_id else "")
    if job_id and sched is None:  # Slurm may still hold it (pending, or requeued): not resubmitted until squeue tells
        return "queued", f"Slurm job {job_id}, not checked (squeue: {sched_error})" + (f"; {why}" if pid else "")
    return None, why


def job_status(jobs: list[Job], queue=None) -> list[dict]:
    """``[{job, state, error?, note?}]`` from the records, the markers and (for Slurm jobs) ``squeue``.

    ``queue`` answers ``states(job_ids) -> {job_id: STATE}`` (default: :class:`mergebench.sweeps.slurm_queue.SlurmQueue`,
    asked only when a marker names a Slurm job, once for all of them).
    """
    by_hash: dict[tuple, dict] = {}
    for results_dir, suite in {(j.results_dir, j.suite) for j in jobs}:
        for rec in load_records(results_dir, suite).records:
            key = (results_dir, suite, rec.get("config_hash"))
            if key not in by_hash or rec.get("status") == "ok":
                by_hash[key] = rec
    records = [by_hash.get((j.results_dir, j.suite, j.config_hash)) for j in jobs]
    markers = [None if rec is not None and rec.get("status") == "ok" else read_marker(job)
               for job, rec in zip(jobs, records)]
    slurm_ids = sorted({str(m["job_id"]) for m in markers if m and m.get("scheduler") == "slurm" and m.get("job_id")})
    sched, sched_error = None, None
    if slurm_ids:
        try:
            sched = (queue or SlurmQueue()).states(slurm_ids)
        except SchedulerError as e:
            sched_error = str(e)
    now = time.time()
    out = []
    for job, rec, info in zip(jobs, records, markers):
        entry = {"job": job}
        holder, why = (None, "") if not info else _holder(info, sched, sched_error, now)
        if rec is not None and rec.get("status") == "ok":
            entry["state"] = "done"
        elif holder is not None:
            entry["state"], entry["note"] = holder, why
        elif rec is not None:
            entry["state"], entry["error"] = "failed", rec.get("error", "?")
        else:
            entry["state"] = "missing"
            if why:
                entry["note"] = why
        out.append(entry)
    return out


def summarize(status: list[dict]) -> dict[str, int]:
    counts = {s: 0 for s in STATES}
    for entry in status:
        counts[entry["state"]] += 1
    return counts


def pending(jobs: list[Job], queue=None) -> list[Job]:
    """The jobs to (re)submit: missing or failed (done, queued and running ones are left alone)."""
    return [e["job"] for e in job_status(jobs, queue) if e["state"] in ("missing", "failed")]


def render_status(sweep: Sweep, status: list[dict], verbose: bool = False) -> str:
    counts = summarize(status)
    lines = [f"sweep {sweep.name}: {len(status)} jobs: " + ", ".join(f"{counts[s]} {s}" for s in STATES)]
    rows = [[e["state"], e["job"].suite, e["job"].pipeline, e["job"].seed, e.get("error") or e.get("note", "")]
            for e in status if verbose or e["state"] != "done"]
    if rows:
        lines.append(tabulate(rows, headers=["state", "suite", "pipeline", "seed", "detail"]))
    return "\n".join(lines)


# ------------------------------------------------------------ the worker
class _Heartbeat:
    """Holds the job's marker while the worker runs: writes it, rewrites its heartbeat every ``interval``
    seconds from a thread, removes it at the end (the thread stopped first, so it cannot write it again)."""

    def __init__(self, job: Job, interval: float):
        self.path, self.interval, self._stop = job.marker(), interval, threading.Event()
        now = time.time()
        self.info = {"pid": os.getpid(), "host": socket.gethostname(), "pipeline": job.pipeline, "seed": job.seed,
                     "started": now, "heartbeat": now, "heartbeat_s": interval}
        if os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and os.environ.get("SLURM_JOB_ID"):
            # a Slurm job submitted by the sweep: the id that `squeue` knows (array task or single job)
            array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
            self.info.update(scheduler="slurm", job_id=f"{array}_{task}" if array and task else
                             os.environ["SLURM_JOB_ID"])
        self._thread = threading.Thread(target=self._beat, name="mergebench-heartbeat", daemon=True)

    def _write(self) -> None:
        atomic_write_text(self.path, json.dumps(self.info))

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            self.info["heartbeat"] = time.time()
            try:
                self._write()
            except OSError:  # a full or unreachable results folder: try again at the next beat
                pass

    def __enter__(self):
        self._write()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.path.unlink(missing_ok=True)
        return False


def run_job(job: Job | dict) -> dict:
    """Run one job in this process (what every executor calls); returns a short summary.

    The job's marker says which process holds the job while it runs, with a heartbeat; the
    record itself is written atomically by ``run_method``, so a worker killed at any point
    leaves no partial record and the job reads as ``missing``.
    """
    job = Job.from_dict(job) if isinstance(job, dict) else job
    worker.start_server()  # the method's worker comes from it: it imports torch while the suite loads
    with _Heartbeat(job, heartbeat_s()):
        suite = get_suite(job.suite_spec or job.suite, build=False, verbose=False, **job.suite_options)
        rec = run_method(job.spec(suite), suite, results_dir=job.results_dir, show_progress=False)
    if rec["config_hash"] != job.config_hash:
        raise RuntimeError(f"job {job.pipeline} seed {job.seed}: the suite changed since the sweep was planned "
                           f"(config hash {rec['config_hash']} != {job.config_hash}); run the sweep again")
    return {"config_hash": rec["config_hash"], "status": rec["status"], "error": rec.get("error"),
            "skipped": bool(rec.get("skipped"))}


def run_sweep(sweep: Sweep, executor, log=print, dry_run: bool = False) -> list:
    """Submit every job that is missing or failed (queued and running ones are not submitted again) and
    save the manifest; returns the executors' outcomes. ``dry_run`` lists the jobs and writes nothing."""
    sweep.check_name()
    jobs = sweep.jobs(build=not dry_run)
    todo = pending(jobs)
    log(f"sweep {sweep.name}: {len(jobs)} jobs; {len(jobs) - len(todo)} done, queued or running; "
        f"{'would run' if dry_run else 'running'} {len(todo)}")
    if dry_run:
        for job in todo:
            log(f"  {job.suite}  {job.pipeline}  seed {job.seed}")
        return []
    sweep.save()
    return executor.run(todo, log)
