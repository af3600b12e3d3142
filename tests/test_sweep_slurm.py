"""Sweeps on Slurm without a cluster: a fake `sbatch` / `squeue` / `srun` on PATH keeps the queue in a JSON
file that each test edits (a job pending, running, requeued, cancelled). What it checks: queued and requeued
jobs are not submitted again, a marker's heartbeat and the scheduler decide whether a worker is alive, no
GPU request unless asked, sbatch errors in one line with nothing left behind, and what `mergebench sweep`
prints and returns after a submission. (tests/integration/slurm runs the same against a real Slurm.)"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from mergebench.sweeps.executors import SlurmOptions, SlurmQueue, SubmissionError, make_executor
from mergebench.sweeps.sweep import (STALE_BEATS, Job, Sweep, _Heartbeat, job_status, pending, read_marker, run_sweep,
                              summarize)

FAKE = r'''
import json, os, re, sys
state_path = os.environ["FAKE_SLURM_STATE"]
state = json.load(open(state_path)) if os.path.exists(state_path) else {"next": 100, "jobs": {}, "sbatch": []}
tool, args = os.path.basename(sys.argv[0]), sys.argv[1:]

def save():
    json.dump(state, open(state_path, "w"))

if tool == "sbatch":
    script = open(args[-1]).read()
    state["sbatch"].append(script)
    error = os.environ.get("FAKE_SBATCH_ERROR")
    if error and (os.environ.get("FAKE_SBATCH_ERROR_IF", "") in script):
        save()
        print(error, file=sys.stderr)
        sys.exit(1)
    job, state["next"] = str(state["next"]), state["next"] + 1
    array = re.search(r"#SBATCH --array=0-(\d+)", script)
    for task in (range(int(array.group(1)) + 1) if array else [None]):
        state["jobs"][job if task is None else f"{job}_{task}"] = os.environ.get("FAKE_SBATCH_STATE", "PENDING")
    save()
    print(f"Submitted batch job {job}")
elif tool == "squeue":
    if os.environ.get("FAKE_SQUEUE_ERROR"):
        print(os.environ["FAKE_SQUEUE_ERROR"], file=sys.stderr)
        sys.exit(1)
    bases = next(a for a in args if a.startswith("--jobs=")).split("=", 1)[1].split(",")
    rows = [f"{j}|{s}" for j, s in state["jobs"].items() if j.split("_")[0] in bases]
    if not rows:
        print("slurm_load_jobs error: Invalid job id specified", file=sys.stderr)
        sys.exit(1)
    print("\n".join(rows))
'''


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """A fake Slurm CLI on PATH; returns helpers to read and change its queue."""
    bin_dir = tmp_path / "fake-slurm-bin"
    bin_dir.mkdir()
    for tool in ("sbatch", "squeue", "srun"):
        path = bin_dir / tool
        path.write_text(f"#!{sys.executable}\n{FAKE}")
        path.chmod(0o755)
    state_path = tmp_path / "fake-slurm.json"
    monkeypatch.setenv("FAKE_SLURM_STATE", str(state_path))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    class Queue:
        def state(self):
            return json.loads(state_path.read_text()) if state_path.exists() else {"jobs": {}, "sbatch": []}

        def set(self, job_id, value):
            st = self.state()
            if value is None:
                st["jobs"].pop(job_id)
            else:
                st["jobs"][job_id] = value
            state_path.write_text(json.dumps(st))

        @property
        def submissions(self):
            return len(self.state()["sbatch"])

    return Queue()


def _quiet(*a):
    pass


def _sweep(results_dir, name="s", methods=("task_arithmetic", "weight_averaging"), **kw):
    return Sweep(list(methods), suites=["micro"], results_dir=str(results_dir), name=name, **kw)


def test_queued_and_requeued_jobs_are_not_submitted_again(fake_slurm, micro, results_dir, tmp_path):
    sweep = _sweep(results_dir, grid={"scaling": [0.2]})
    executor = make_executor("slurm", folder=tmp_path / "submitit", wait=False)
    outcomes = run_sweep(sweep, executor, log=_quiet)
    assert [o.detail for o in outcomes] == ["submitted as 100_0", "submitted as 100_1"]
    jobs = sweep.jobs()
    assert [e["state"] for e in job_status(jobs)] == ["queued", "queued"]
    assert run_sweep(sweep, executor, log=_quiet) == [] and fake_slurm.submissions == 1, "no duplicates"

    # 100_0 started and its worker died on this host; Slurm requeued it: queued again, not missing
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    jobs[0].marker().write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "heartbeat": time.time(),
                                            "heartbeat_s": 30, "scheduler": "slurm", "job_id": "100_0"}))
    fake_slurm.set("100_0", "REQUEUED")
    fake_slurm.set("100_1", "RUNNING")
    status = job_status(jobs)
    assert [e["state"] for e in status] == ["queued", "running"], status
    assert "100_0 REQUEUED" in status[0]["note"]
    assert pending(jobs) == []

    # cancelled while pending: gone from the queue without a record, so it is missing and submitted again
    fake_slurm.set("100_1", None)
    status = job_status(jobs)
    assert status[1]["state"] == "missing" and "no longer in the queue" in status[1]["note"]
    assert [o.job for o in run_sweep(sweep, executor, log=_quiet)] == [jobs[1]]
    assert fake_slurm.submissions == 2 and fake_slurm.state()["jobs"]["101"] == "PENDING"
    assert read_marker(jobs[1])["job_id"] == "101"

    # squeue failing: a submitted job is taken as queued (never submitted twice), and says it was not checked
    os.environ["FAKE_SQUEUE_ERROR"] = "squeue: error: slurm_receive_msg: Socket timed out"
    try:
        status = job_status(jobs)
        assert [e["state"] for e in status] == ["queued", "queued"], status
        assert "Socket timed out" in status[1]["note"]
        assert run_sweep(sweep, executor, log=_quiet) == []
    finally:
        del os.environ["FAKE_SQUEUE_ERROR"]


def test_wait_returns_when_slurm_ends_a_job_without_a_result(fake_slurm, micro, results_dir, tmp_path, monkeypatch):
    # without accounting (no sacct) submitit alone would wait forever for a cancelled job
    monkeypatch.setenv("FAKE_SBATCH_STATE", "CANCELLED")
    sweep = _sweep(results_dir)
    outcomes = run_sweep(sweep, make_executor("slurm", folder=tmp_path / "submitit", wait=True, poll_s=0.05),
                         log=_quiet)
    assert [o.ok for o in outcomes] == [False, False]
    assert "Slurm job 100_0 ended (CANCELLED) without a result" in outcomes[0].detail
    assert [e["state"] for e in job_status(sweep.jobs())] == ["missing", "missing"]


def test_slurm_queue_reads_squeue(fake_slurm):
    queue = SlurmQueue()
    assert queue.states(["5_0"]) == {}, "squeue's 'Invalid job id' means: none of them is known"
    fake_slurm.set("7_0", "PENDING")
    fake_slurm.set("7_1", "CANCELLED by 0")
    fake_slurm.set("8", "RUNNING")
    assert queue.states(["7_0", "7_1", "8", "9"]) == {"7_0": "PENDING", "7_1": "CANCELLED", "8": "RUNNING"}
    assert [SlurmQueue.classify(s) for s in ("PENDING", "REQUEUED", "RUNNING", "COMPLETING", "CANCELLED",
                                              "NODE_FAIL", None)] == ["queued", "queued", "running", "running",
                                                                      None, None, None]
    os.environ["FAKE_SQUEUE_ERROR"] = "squeue: error: Unable to contact slurm controller"
    try:
        with pytest.raises(Exception, match="exited with 1: squeue: error: Unable to contact"):
            queue.states(["7_0"])
    finally:
        del os.environ["FAKE_SQUEUE_ERROR"]


def _marker(job, **info):
    job.marker().parent.mkdir(parents=True, exist_ok=True)
    job.marker().write_text(json.dumps(info))


def test_heartbeat_decides_whether_a_worker_lives(fake_slurm, micro, results_dir):
    jobs = _sweep(results_dir, methods=["task_arithmetic", "weight_averaging", "ties_merging",
                                        "dare"]).jobs()
    now, beat = time.time(), 30
    stale = now - STALE_BEATS * beat - 5
    _marker(jobs[0], pid=4242, host="node-07", heartbeat=now - 10, heartbeat_s=beat)       # other host, fresh
    _marker(jobs[1], pid=4242, host="node-07", heartbeat=stale, heartbeat_s=beat)          # other host, stale
    _marker(jobs[2], pid=os.getpid(), host=socket.gethostname(), heartbeat=stale, heartbeat_s=beat)  # pid reused
    # fresh heartbeat, but Slurm no longer knows the job: the node died with the worker
    _marker(jobs[3], pid=4242, host="node-07", heartbeat=now, heartbeat_s=beat, scheduler="slurm", job_id="300_3")
    fake_slurm.set("300_0", "RUNNING")
    status = job_status(jobs)
    assert [e["state"] for e in status] == ["running", "missing", "missing", "missing"], status
    assert "no heartbeat for" in status[1]["note"] and "stale after 300 s" in status[1]["note"]
    assert "no heartbeat for" in status[2]["note"]
    assert "300_3 is no longer in the queue" in status[3]["note"]
    assert pending(jobs) == jobs[1:]

    # a worker killed with -9 on this host: missing at once, even while its Slurm job still reads RUNNING
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    _marker(jobs[0], pid=proc.pid, host=socket.gethostname(), heartbeat=time.time(), heartbeat_s=beat,
            scheduler="slurm", job_id="300_0")
    assert job_status(jobs)[0]["state"] == "running"
    proc.kill()
    proc.wait()
    status = job_status(jobs)
    assert status[0]["state"] == "missing" and "died before writing a record" in status[0]["note"]


def test_worker_marker_beats_and_is_removed(micro, results_dir, monkeypatch):
    job = _sweep(results_dir, methods=["task_arithmetic"]).jobs()[0]
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_JOB_ID", "512")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "500")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "12")
    with _Heartbeat(job, 0.05):
        first = read_marker(job)
        assert first["pid"] == os.getpid() and first["job_id"] == "500_12" and first["scheduler"] == "slurm"
        deadline = time.monotonic() + 30
        while read_marker(job)["heartbeat"] == first["heartbeat"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert read_marker(job)["heartbeat"] > first["heartbeat"], "the heartbeat advanced"
    assert read_marker(job) is None, "the marker is gone when the worker ends"
    with pytest.raises(ValueError, match="MERGEBENCH_HEARTBEAT_S"):
        monkeypatch.setenv("MERGEBENCH_HEARTBEAT_S", "-1")
        from mergebench.sweeps.sweep import heartbeat_s
        heartbeat_s()


def test_no_gpus_unless_asked_and_sbatch_errors_in_one_line(fake_slurm, micro, results_dir, tmp_path, monkeypatch,
                                                            capsys):
    assert "#SBATCH --gpus" not in SlurmOptions().sbatch_script(tmp_path, n_jobs=2)
    assert "#SBATCH --gpus-per-node=1" in SlurmOptions(gpus=1).sbatch_script(tmp_path, n_jobs=2)
    # a CPU-only partition: sbatch refuses any GPU request
    monkeypatch.setenv("FAKE_SBATCH_ERROR", "sbatch: error: Invalid generic resource (gres) specification")
    monkeypatch.setenv("FAKE_SBATCH_ERROR_IF", "--gpus")
    folder = tmp_path / "submitit"
    sweep = _sweep(results_dir)
    with pytest.raises(SubmissionError) as err:
        run_sweep(sweep, make_executor("slurm", folder=folder, slurm={"gpus": 1}, wait=False), log=_quiet)
    message = str(err.value)
    assert "\n" not in message and "Invalid generic resource" in message and "--gpus 1" in message
    assert not folder.exists() or not any(folder.rglob("*")), "no pickles of a failed submission"
    assert all(read_marker(j) is None for j in sweep.jobs())
    assert len(run_sweep(sweep, make_executor("slurm", folder=folder, wait=False), log=_quiet)) == 2

    from mergebench.cli import main

    capsys.readouterr()
    code = main(["sweep", "task_arithmetic", "--suite", "micro", "--seeds", "1", "--executor", "slurm",
                 "--gpus", "2", "--results", str(results_dir), "--name", "gpu"])
    err_text = capsys.readouterr().err
    assert code == 2 and err_text.count("\n") == 1 and err_text.startswith("error: slurm submission of 1 job"), err_text
    assert "Traceback" not in err_text
    assert not list((results_dir / "sweeps" / "submitit" / "gpu").rglob("*.pkl"))


def test_cli_submission_without_wait_is_queued_and_dry_run_writes_nothing(fake_slurm, micro, results_dir, capsys):
    from mergebench.cli import main

    argv = ["sweep", "task_arithmetic", "weight_averaging", "--suite", "micro", "--executor", "slurm",
            "--results", str(results_dir), "--name", "q"]
    assert main(argv + ["--dry-run"]) == 0
    assert "would run 2" in capsys.readouterr().out
    assert not results_dir.exists(), "a dry run writes no sweep file, marker or record"
    assert fake_slurm.submissions == 0

    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "submitted 2 jobs (queued): 100_0 100_1" in out, out
    assert "2 jobs: 0 done, 2 queued, 0 running, 0 failed, 0 missing" in out
    assert (results_dir / "sweeps" / "q.yaml").exists()
    assert main(["status", "q", "--results", str(results_dir)]) == 1  # not done yet
    assert "2 queued" in capsys.readouterr().out
    assert main(argv) == 0 and fake_slurm.submissions == 1, "queued jobs are not submitted again"
    assert "running 0" in capsys.readouterr().out
