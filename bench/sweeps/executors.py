"""Executors: where the jobs of a sweep run.

- :class:`LocalExecutor` (``--executor local --jobs N``): each job in its own Python process
  (``python -m mergebench.sweeps.executors JOB_JSON``), at most N at a time. A worker that crashes or
  is killed is reported and the others go on.
- :class:`SubmititExecutor` (``--executor slurm``): one submitit job array on a Slurm cluster,
  with partition, GPUs (none unless asked), time and memory from the command line or the sweep's
  YAML config (``slurm:`` section). Each submitted job gets a marker naming its Slurm job id, so
  a re-run asks :class:`SlurmQueue` (``squeue``, no accounting database needed) before treating it
  as missing. ``cluster="local"`` uses ``submitit.LocalExecutor`` on this machine, so the same
  submission path runs in the tests (``--executor submitit-local``).

Every executor calls :func:`mergebench.sweeps.sweep.run_job`, which writes the job's record.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import submitit
import torch
from submitit.core.utils import FailedSubmissionError, UncompletedJobError
from submitit.slurm.slurm import _make_sbatch_string

from mergebench.errors import MergebenchError
from mergebench.engine.progress import progress
from mergebench.sweeps.slurm_queue import SchedulerError, SlurmQueue  # noqa: F401  (the executors' scheduler queries)
from mergebench.sweeps.sweep import Job, run_job, write_submitted_markers

EXECUTORS = ("local", "slurm", "submitit-local")


class SubmissionError(MergebenchError, RuntimeError):
    """A submission failed (e.g. sbatch refused it); the message is one line, and nothing was left behind."""


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
        bar = progress(total=len(jobs), desc="sweep", unit="job")
        while queue or running:
            while queue and len(running) < self.jobs:
                job = queue.pop(0)
                log_dir.mkdir(parents=True, exist_ok=True)
                log_path = log_dir / f"{job.config_hash}.log"
                with open(log_path, "w") as fh:
                    proc = subprocess.Popen([sys.executable, "-m", "mergebench.sweeps.executors", json.dumps(job.to_dict())],
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
                bar.update(1)
        bar.close()
        return outcomes


@dataclass
class SlurmOptions:
    """Resources of each array task (command line: --partition --gpus --time --mem --cpus)."""

    partition: str | None = None
    gpus: int | None = None        # GPUs per job; none unless asked (a CPU partition refuses a GPU request)
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
        return _make_sbatch_string(command="<submitit command>", folder=str(folder), job_name="mergebench",
                                   map_count=n_jobs, **self.submitit_parameters())

    def submitit_parameters(self) -> dict:
        """The parameters of ``submitit.SlurmExecutor.update_parameters``."""
        params = {"time": int(self.time), "array_parallelism": int(self.array_parallelism)}
        if self.gpus:
            params["gpus_per_node"] = int(self.gpus)
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
                 wait: bool | None = None, poll_s: float = 5.0, queue: SlurmQueue | None = None):
        self.cluster, self.options = cluster, options or SlurmOptions()
        self.poll_s, self.queue = poll_s, queue or (SlurmQueue() if cluster == "slurm" else None)
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
            self.executor = submitit.LocalExecutor(folder=self.folder)
            self.executor.update_parameters(timeout_min=int(self.options.time),
                                            gpus_per_node=min(self.options.gpus or 0, torch.cuda.device_count()))
        else:
            raise ValueError(f"unknown submitit cluster {cluster!r}; use 'slurm' or 'local'")

    def _submit(self, jobs: list[Job]) -> list:
        """``map_array`` with sbatch's errors as one line, and the folder as it was when it fails."""

        before = set(self.folder.rglob("*")) if self.folder.exists() else set()
        existed = self.folder.exists()
        stderr = io.StringIO()  # submitit prints sbatch's stderr itself; it goes into the one-line error instead
        try:
            with contextlib.redirect_stderr(stderr):
                submitted = self.executor.map_array(run_job, [j.to_dict() for j in jobs])
            sys.stderr.write(stderr.getvalue())  # a warning of a submission that worked is shown as it was
            return submitted
        except (UncompletedJobError, FailedSubmissionError, OSError, subprocess.SubprocessError) as e:
            # no pickles or submission files of a submission that does not exist
            for path in sorted(set(self.folder.rglob("*")) - before, key=lambda p: len(p.parts), reverse=True):
                if path.is_dir() and not path.is_symlink():
                    with contextlib.suppress(OSError):
                        path.rmdir()
                else:
                    path.unlink(missing_ok=True)
            if not existed:
                with contextlib.suppress(OSError):
                    self.folder.rmdir()
            text = "\n".join([str(e), stderr.getvalue()])
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            errors = list(dict.fromkeys(ln for ln in lines if "error" in ln.lower())) or lines[-1:] or ["?"]
            hint = ""
            if self.options.gpus and any("gres" in ln.lower() or "gpu" in ln.lower() for ln in errors):
                hint = f" (asked for --gpus {self.options.gpus}: drop it, or pick a partition with GPUs)"
            raise SubmissionError(f"{self.cluster} submission of {_n_jobs(len(jobs))} failed: "
                                  f"{'; '.join(errors)}{hint}") from None

    def run(self, jobs: list[Job], log=print) -> list[Outcome]:
        if not jobs:
            return []
        submitted = self._submit(jobs)
        ids = [str(s.job_id) for s in submitted]
        if self.cluster == "slurm":  # a re-run asks squeue about these before counting them as missing
            write_submitted_markers(jobs, ids, "slurm")
        if not self.wait:
            log(f"submitted {_n_jobs(len(submitted))} (queued): {_id_summary(ids)}")
            return [Outcome(j, True, f"submitted as {i}") for j, i in zip(jobs, ids)]
        log(f"submitted {_n_jobs(len(submitted))} ({self.cluster}): {_id_summary(ids)}; waiting for them")
        return self._collect(jobs, submitted, log)

    def _collect(self, jobs: list[Job], submitted: list, log) -> list[Outcome]:
        """Wait until every job has ended: its result is there, or (Slurm) squeue no longer runs it. Without
        accounting, submitit cannot tell a cancelled job from a running one, so squeue is asked here."""
        left = list(zip(jobs, submitted))
        ended_at: dict[str, float] = {}
        outcomes = []
        while left:
            states, state_error = None, None
            if self.queue is not None:
                try:
                    states = self.queue.states([str(s.job_id) for _, s in left])
                except SchedulerError as e:
                    state_error = str(e)
            for job, sub in list(left):
                job_id = str(sub.job_id)
                if sub.paths.result_pickle.exists():
                    outcome = self._result(job, sub)
                elif states is not None and SlurmQueue.classify(states.get(job_id)) is None:
                    # ended without a result: give the file system a few seconds to show one
                    if time.monotonic() - ended_at.setdefault(job_id, time.monotonic()) < 3 * self.poll_s:
                        continue
                    how = states.get(job_id, "no longer in the queue")
                    outcome = Outcome(job, False, f"Slurm job {job_id} ended ({how}) without a result "
                                                  f"(logs: {sub.paths.stderr})")
                elif self.queue is None and sub.done():
                    outcome = self._result(job, sub)
                else:
                    continue
                left.remove((job, sub))
                log(f"{'done  ' if outcome.ok else 'ERROR '} {_job_tag(job)}: {outcome.detail}")
                outcomes.append(outcome)
            if left:
                if state_error:
                    log(f"waiting: {state_error}")
                time.sleep(self.poll_s)
        return outcomes

    @staticmethod
    def _result(job: Job, sub) -> Outcome:
        try:
            return Outcome(job, True, json.dumps(sub.result()))
        except Exception as e:  # the worker crashed or was killed: report it, keep collecting
            lines = str(e).strip().splitlines()
            return Outcome(job, False, f"{type(e).__name__}: {lines[-1] if lines else ''} "
                                       f"(logs: {sub.paths.stderr})")


def _n_jobs(n: int) -> str:
    return f"{n} job" if n == 1 else f"{n} jobs"


def _id_summary(ids: list[str]) -> str:
    """The job ids of a submission: all of them when few, else in Slurm's array notation (``12_[0-99]``)."""
    if len(ids) <= 8:
        return " ".join(ids)
    tasks: dict[str, list[int]] = {}
    singles = []
    for job_id in ids:
        base, _, task = job_id.partition("_")
        if task.isdigit():
            tasks.setdefault(base, []).append(int(task))
        else:
            singles.append(job_id)
    ranges = [f"{base}_[{min(t)}-{max(t)}]" if sorted(t) == list(range(min(t), max(t) + 1))
              else f"{base}_[{','.join(map(str, sorted(t)))}]" for base, t in tasks.items()]
    return " ".join(ranges + singles)


def make_executor(kind: str, jobs: int = 1, folder: str | os.PathLike = "results/sweeps/submitit",
                  slurm: SlurmOptions | dict | None = None, wait: bool | None = None, poll_s: float = 5.0):
    if kind == "local":
        return LocalExecutor(jobs)
    opts = slurm if isinstance(slurm, SlurmOptions) else SlurmOptions.from_dict(slurm)
    if kind == "slurm":
        return SubmititExecutor(folder, "slurm", opts, wait, poll_s)
    if kind == "submitit-local":
        return SubmititExecutor(folder, "local", opts, wait, min(poll_s, 1.0))
    raise ValueError(f"unknown executor {kind!r}; use one of {', '.join(EXECUTORS)}")


def _worker_main(argv: list[str]) -> int:
    os.environ.setdefault("MERGEBENCH_QUIET", "1")
    summary = run_job(json.loads(argv[0]))
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
