"""Executors: where the jobs of a sweep run.

- :class:`LocalExecutor` (``--executor local --jobs N``): each job in its own Python process
  (``python -m mergebench.executors JOB_JSON``), at most N at a time. A worker that crashes or
  is killed is reported and the others go on.
- :class:`SubmititExecutor` (``--executor slurm``): one submitit job array on a Slurm cluster,
  with partition, GPUs, time and memory from the command line or the sweep's YAML config
  (``slurm:`` section). ``cluster="local"`` uses ``submitit.LocalExecutor`` on this machine, so
  the same submission path runs in CI (``--executor submitit-local``).

Every executor calls :func:`mergebench.sweep.run_job`, which writes the job's record.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from mergebench.sweep import Job

EXECUTORS = ("local", "slurm", "submitit-local")


@dataclass
class Outcome:
    job: Job
    ok: bool            # the worker finished (the record says whether the method succeeded)
    detail: str = ""    # the worker's summary, or why it did not finish


def _job_tag(job: Job) -> str:
    return f"{job.suite}/{job.pipeline} seed {job.seed}"


class LocalExecutor:
    """Separate processes on this machine, ``jobs`` at a time."""

    def __init__(self, jobs: int = 1, log_dir: str | os.PathLike | None = None, poll_s: float = 0.2,
                 env: dict | None = None):
        if jobs < 1:
            raise ValueError("--jobs must be at least 1")
        self.jobs, self.log_dir, self.poll_s, self.env = jobs, log_dir, poll_s, env

    def run(self, jobs: list[Job], log=print) -> list[Outcome]:
        queue = list(jobs)
        running: list[tuple[Job, subprocess.Popen, Path]] = []
        outcomes: list[Outcome] = []
        log_dir = Path(self.log_dir or (Path(jobs[0].results_dir) / "sweeps" / "logs")) if jobs else None
        while queue or running:
            while queue and len(running) < self.jobs:
                job = queue.pop(0)
                log_dir.mkdir(parents=True, exist_ok=True)
                log_path = log_dir / f"{job.config_hash}.log"
                with open(log_path, "w") as fh:
                    proc = subprocess.Popen([sys.executable, "-m", "mergebench.executors", json.dumps(job.to_dict())],
                                            stdout=fh, stderr=subprocess.STDOUT, env=self.env)
                running.append((job, proc, log_path))
            time.sleep(self.poll_s)
            for item in list(running):
                job, proc, log_path = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                tail = log_path.read_text().strip().splitlines()
                if proc.returncode == 0:
                    outcome = Outcome(job, True, tail[-1] if tail else "")
                elif proc.returncode < 0:
                    outcome = Outcome(job, False, f"worker killed by signal {-proc.returncode} (log: {log_path})")
                else:
                    outcome = Outcome(job, False, f"worker exited with {proc.returncode}: "
                                                  f"{tail[-1] if tail else '?'} (log: {log_path})")
                log(f"{'done  ' if outcome.ok else 'ERROR '} {_job_tag(job)}: {outcome.detail}")
                outcomes.append(outcome)
        return outcomes


@dataclass
class SlurmOptions:
    """Resources of each array task (command line: --partition --gpus --time --mem --cpus)."""

    partition: str | None = None
    gpus: int = 1
    time: int = 60                 # minutes
    mem: str | None = None         # e.g. "32GB"
    cpus: int | None = None
    array_parallelism: int = 64
    account: str | None = None
    qos: str | None = None
    extra: dict = field(default_factory=dict)  # any other sbatch option, e.g. {"constraint": "a100"}

    @classmethod
    def from_dict(cls, d: dict | None) -> "SlurmOptions":
        d = dict(d or {})
        known = set(cls.__dataclass_fields__)
        extra = {k: d.pop(k) for k in list(d) if k not in known}
        opts = cls(**d)
        opts.extra.update(extra)
        return opts

    def sbatch_script(self, folder: str | os.PathLike, n_jobs: int) -> str:
        """The sbatch file submitit writes for an array of ``n_jobs`` tasks with these options (to check them)."""
        from submitit.slurm.slurm import _make_sbatch_string

        return _make_sbatch_string(command="<submitit command>", folder=str(folder), job_name="mergebench",
                                   map_count=n_jobs, **self.submitit_parameters())

    def submitit_parameters(self) -> dict:
        """The parameters of ``submitit.SlurmExecutor.update_parameters``."""
        params = {"time": int(self.time), "gpus_per_node": int(self.gpus), "array_parallelism": int(self.array_parallelism)}
        for key in ("partition", "mem", "account", "qos"):
            if getattr(self, key) is not None:
                params[key] = getattr(self, key)
        if self.cpus is not None:
            params["cpus_per_task"] = int(self.cpus)
        if self.mem is not None and str(self.mem).isdigit():
            params["mem"] = f"{self.mem}GB"
        if self.extra:
            params["additional_parameters"] = dict(self.extra)
        return params


class SubmititExecutor:
    """A submitit job array: Slurm (``cluster="slurm"``) or this machine (``cluster="local"``)."""

    def __init__(self, folder: str | os.PathLike, cluster: str = "slurm", options: SlurmOptions | None = None,
                 wait: bool | None = None):
        import submitit

        self.cluster, self.options = cluster, options or SlurmOptions()
        self.folder = Path(folder)
        self.wait = (cluster == "local") if wait is None else wait
        if cluster == "slurm":
            try:
                self.executor = submitit.SlurmExecutor(folder=self.folder)
            except RuntimeError as e:  # no srun/sbatch on this machine
                raise ValueError(f"cannot submit to Slurm from here ({e}); run the sweep on a cluster login "
                                 f"node, or use --executor local / submitit-local on this machine") from e
            self.executor.update_parameters(job_name="mergebench", **self.options.submitit_parameters())
        elif cluster == "local":
            import torch

            self.executor = submitit.LocalExecutor(folder=self.folder)
            self.executor.update_parameters(timeout_min=int(self.options.time),
                                            gpus_per_node=min(self.options.gpus, torch.cuda.device_count()))
        else:
            raise ValueError(f"unknown submitit cluster {cluster!r}; use 'slurm' or 'local'")

    def run(self, jobs: list[Job], log=print) -> list[Outcome]:
        from mergebench.sweep import run_job

        if not jobs:
            return []
        submitted = self.executor.map_array(run_job, [j.to_dict() for j in jobs])
        log(f"submitted {len(submitted)} jobs ({self.cluster}): "
            + ", ".join(sorted({str(s.job_id).split('_')[0] for s in submitted})))
        if not self.wait:
            log("not waiting; follow them with `mergebench status`")
            return [Outcome(j, True, f"submitted as {s.job_id}") for j, s in zip(jobs, submitted)]
        outcomes = []
        for job, sub in zip(jobs, submitted):
            try:
                result = sub.result()
                outcome = Outcome(job, True, json.dumps(result))
            except Exception as e:  # the worker crashed or was killed: report it, keep collecting
                lines = str(e).strip().splitlines()
                outcome = Outcome(job, False, f"{type(e).__name__}: {lines[-1] if lines else ''} "
                                              f"(logs: {sub.paths.stderr})")
            log(f"{'done  ' if outcome.ok else 'ERROR '} {_job_tag(job)}: {outcome.detail}")
            outcomes.append(outcome)
        return outcomes


def make_executor(kind: str, jobs: int = 1, folder: str | os.PathLike = "results/sweeps/submitit",
                  slurm: SlurmOptions | dict | None = None, wait: bool | None = None):
    if kind == "local":
        return LocalExecutor(jobs)
    opts = slurm if isinstance(slurm, SlurmOptions) else SlurmOptions.from_dict(slurm)
    if kind == "slurm":
        return SubmititExecutor(folder, "slurm", opts, wait)
    if kind == "submitit-local":
        return SubmititExecutor(folder, "local", opts, wait)
    raise ValueError(f"unknown executor {kind!r}; use one of {', '.join(EXECUTORS)}")


def _worker_main(argv: list[str]) -> int:
    from mergebench.sweep import run_job

    os.environ.setdefault("MERGEBENCH_QUIET", "1")
    summary = run_job(json.loads(argv[0]))
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
