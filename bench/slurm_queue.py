"""What a Slurm scheduler says about its jobs (``squeue``), asked by sweeps' status and the Slurm executor."""

from __future__ import annotations

import subprocess


class SchedulerError(RuntimeError):
    """The scheduler could not be asked (``squeue`` missing, failing or not answering)."""


class SlurmQueue:
    """What ``squeue`` says about Slurm jobs. Needs no accounting database (``sacct`` is not used)."""

    # states of a job that will still run: not to be submitted again
    QUEUED = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SPECIAL_EXIT"})
    RUNNING = frozenset({"CONFIGURING", "RUNNING", "COMPLETING", "RESIZING", "SIGNALING", "STAGE_OUT",
                         "SUSPENDED", "STOPPED"})
    # anything else (COMPLETED, CANCELLED, FAILED, TIMEOUT, NODE_FAIL, OUT_OF_MEMORY, PREEMPTED, BOOT_FAIL,
    # DEADLINE, REVOKED) has ended, and a job squeue no longer lists has ended too

    def __init__(self, command: str = "squeue", timeout_s: float = 60.0):
        self.command, self.timeout_s = command, timeout_s

    @classmethod
    def classify(cls, state: str | None) -> str | None:
        """``queued``, ``running``, or None for a job that has ended (or that squeue does not know)."""
        state = (state or "").upper()
        return "queued" if state in cls.QUEUED else "running" if state in cls.RUNNING else None

    def states(self, job_ids: list[str]) -> dict[str, str]:
        """``{job_id: STATE}`` for the jobs squeue lists (array tasks as ``ARRAYID_TASK``); unlisted ones ended."""
        bases = sorted({str(j).split("_")[0] for j in job_ids})
        if not bases:
            return {}
        cmd = [self.command, "--noheader", "--array", "--states=all", f"--jobs={','.join(bases)}",
               "--format=%i|%T"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout_s)
        except FileNotFoundError:
            raise SchedulerError(f"{self.command} not found (not on a Slurm login node?)") from None
        except subprocess.TimeoutExpired:
            raise SchedulerError(f"{self.command} did not answer within {self.timeout_s:.0f} s") from None
        if proc.returncode != 0:
            if "Invalid job id" in proc.stderr:  # squeue says this when it knows none of them
                return {}
            lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
            raise SchedulerError(f"{self.command} exited with {proc.returncode}: {lines[-1] if lines else '?'}")
        out = {}
        for line in proc.stdout.splitlines():
            job_id, _, state = line.strip().partition("|")
            if job_id and state:
                out[job_id] = state.split()[0].upper()  # "CANCELLED by 0" -> CANCELLED
        return out
