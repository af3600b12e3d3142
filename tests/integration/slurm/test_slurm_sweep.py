"""A micro sweep on a real single-node Slurm cluster (`make test-slurm`), through `--executor slurm`:

1. submitted without --wait: "submitted 3 jobs (queued)", exit 0; the first job (a probe that waits for a
   gate file) runs, with a marker that names its Slurm job and has a live heartbeat; the others are queued;
2. one queued task is cancelled with scancel; re-running the sweep submits that job only (not the running
   or queued ones), and waits for it (--wait, which must return although Slurm has no accounting);
3. once the gate opens, every job is done, a further re-run submits nothing, and the records equal a local
   run's (same config hashes, same accuracies).
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mergebench.engine.records import load_records
from mergebench.sweeps.sweep import Sweep, job_status, summarize

GATE_PROBE = '''
import os, time
from mergebench import register_method

@register_method("slurm_gate_probe")
def slurm_gate_probe(ctx, scaling: float = 0.3):
    """Waits (at most 5 minutes) until the gate file exists, then merges like task arithmetic."""
    deadline = time.monotonic() + 300
    while not os.path.exists(os.environ["SLURM_TEST_GATE"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return ctx.shared_model(ctx.pretrained_weights + scaling * sum(ctx.task_vectors().values()))
'''

SWEEP = """\
methods: [slurm_gate_probe, task_arithmetic, weight_averaging]
suites: micro
seeds: [0]
slurm: {array_parallelism: 1, time: 10}
"""


def _wait_until(what, predicate, timeout_s, poll_s=0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def _squeue():
    out = subprocess.run(["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T|%j"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return {line.split("|")[0]: line.split("|")[1] for line in out.splitlines() if line.endswith("|mergebench")}


def _accuracies(results):
    loaded = load_records(results, "micro")
    assert not loaded.unreadable
    return {r["config_hash"]: (r["status"], r["method"], r["metrics"]["accuracy"]) for r in loaded.records}


@pytest.fixture
def env(tmp_path, micro, monkeypatch, install_plugin):
    """The gate probe as a plugin, here and in every process started from here (Slurm jobs inherit the
    environment); heartbeats every second."""
    from mergebench.api import registry

    install_plugin("slurm_probes", {"slurm_probes": GATE_PROBE})
    monkeypatch.setenv("SLURM_TEST_GATE", str(tmp_path / "gate"))
    monkeypatch.setenv("MERGEBENCH_HEARTBEAT_S", "1")
    registry.discover_plugins(force=True)
    yield dict(os.environ)
    registry.unregister_method("slurm_gate_probe")


@pytest.fixture
def cli(capsys):
    """`mergebench ARGS` in this process (each new process would import torch again): (exit code, output)."""
    from mergebench.cli import main

    def run(*args):
        capsys.readouterr()
        code = main(list(args))
        out = capsys.readouterr()
        return code, out.out + out.err

    return run


def _cli_process(env, *args, timeout):
    """`mergebench ARGS` as a process of its own, bounded."""
    proc = subprocess.run([sys.executable, "-m", "mergebench.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def test_sweep_on_slurm_resubmits_only_the_missing_job(slurm_cluster, env, cli, tmp_path):
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(SWEEP)
    results, local = tmp_path / "slurm-results", tmp_path / "local-results"
    sweep = ["sweep", "--config", str(cfg), "--name", "ci", "--executor", "slurm", "--results", str(results)]
    status = ["status", "ci", "--results", str(results)]
    try:
        code, out = cli(*sweep)
        assert code == 0, out
        m = re.search(r"submitted 3 jobs \(queued\): (\d+)_0 \1_1 \1_2", out)
        assert m, out
        array = m.group(1)

        # the gate probe runs: its marker names its Slurm job, and its heartbeat advances
        marker_dir = results / "micro" / ".running"

        def worker_marker():
            for path in marker_dir.glob("*.lock"):
                info = json.loads(path.read_text())
                if "pid" in info:
                    return path, info
            return None

        path, first = _wait_until("the first job's worker to start", worker_marker, 120)
        assert first["scheduler"] == "slurm" and first["job_id"] == f"{array}_0", first
        _wait_until("a heartbeat", lambda: json.loads(path.read_text())["heartbeat"] > first["heartbeat"], 30)
        code, out = cli(*status)
        assert code == 1 and "0 done, 2 queued, 1 running, 0 failed, 0 missing" in out, out

        # cancel the last task while it waits (the array runs one task at a time)
        assert _squeue()[f"{array}_2"] == "PENDING"
        subprocess.run(["scancel", f"{array}_2"], check=True, timeout=30)
        _wait_until("the cancelled task to leave the queue",
                    lambda: _squeue().get(f"{array}_2") in (None, "CANCELLED"), 30)
        code, out = cli(*status)
        assert "2 queued" not in out and "1 missing" in out and "no longer in the queue" in out, out

        # re-run with --wait: only the cancelled job is submitted; it runs beside the gate probe and is waited for
        code, out = _cli_process(env, *sweep, "--wait", timeout=300)
        assert code == 0, out
        assert "3 jobs; 2 done, queued or running; running 1" in out, out
        resubmitted = re.search(r"submitted 1 job \(slurm\): (\d+);", out)
        assert resubmitted and "done   micro/weight_averaging seed 0" in out, out
        assert set(_squeue()) == {f"{array}_0", f"{array}_1", resubmitted.group(1)}, "no duplicate was submitted"

        Path(env["SLURM_TEST_GATE"]).write_text("")
        jobs = Sweep.load("ci", results).jobs(build=False)
        _wait_until("every job to be done", lambda: summarize(job_status(jobs))["done"] == 3, 240, poll_s=1)
        code, out = cli(*status)
        assert code == 0 and "3 done" in out, out
        code, out = cli(*sweep)
        assert code == 0 and "running 0" in out and "submitted" not in out, out
        assert len(_squeue()) == 3 and not list(marker_dir.glob("*.lock"))

        # the same sweep in local processes: the same jobs, the same numbers
        local_sweep = ["sweep", "--config", str(cfg), "--name", "ci", "--executor", "local", "--jobs", "2",
                       "--results", str(local)]
        code, out = cli(*local_sweep)
        assert code == 0, out
        on_slurm, on_local = _accuracies(results), _accuracies(local)
        assert len(on_slurm) == 3 and all(v[0] == "ok" for v in on_slurm.values()), on_slurm
        assert on_slurm == on_local
    except AssertionError:
        for log in sorted((results / "sweeps" / "submitit").rglob("*_log.*")):
            print(f"----- {log}\n{log.read_text()[-3000:]}", file=sys.stderr)
        raise
