"""Sweeps as independent jobs: local processes and submitit's local executor, an injected
failure, a killed worker, resume, status, and the Slurm submission settings."""

import shutil

import pytest

from mergebench.api import registry
from mergebench.sweeps.executors import LocalExecutor, SlurmOptions, SubmititExecutor, make_executor
from mergebench.engine.records import load_records
from mergebench.api.registry import HyperparameterError
from mergebench.sweeps.sweep import Sweep, job_status, pending, run_sweep, summarize

# Methods that fail on purpose, loaded in every worker process through a plugin entry point.
PROBES = '''
import os, signal
from mergebench import register_method

@register_method("sweep_raise_probe")
def raise_probe(ctx):
    raise RuntimeError("injected failure")

@register_method("sweep_kill_probe")
def kill_probe(ctx, scaling: float = 0.3):
    """SIGKILLs its own process once (while the flag file exists), then merges like task arithmetic."""
    flag = os.environ["SWEEP_KILL_FLAG"]
    if os.path.exists(flag):
        os.remove(flag)
        os.kill(os.getpid(), signal.SIGKILL)
    return ctx.shared_model(ctx.pretrained_weights + scaling * sum(ctx.task_vectors().values()))
'''


@pytest.fixture
def probes(tmp_path, monkeypatch, install_plugin, micro):
    install_plugin("sweep_probes", {"sweep_probes": PROBES})
    flag = tmp_path / "kill-once"
    flag.write_text("")
    monkeypatch.setenv("SWEEP_KILL_FLAG", str(flag))
    registry.discover_plugins(force=True)
    yield flag
    for name in ("sweep_raise_probe", "sweep_kill_probe"):
        registry.unregister_method(name)


def test_grid_expansion_and_errors(micro, results_dir):
    sweep = Sweep(["task_arithmetic", "ties_merging", "weight_averaging"], suites=["micro"], seeds=[0, 1],
                  grid={"scaling": [0.2, 0.4], "ties_merging.k": [10, 20]}, results_dir=str(results_dir))
    calls = [str(c) for c in sweep.calls()]
    assert len(calls) == 2 + 2 * 2 + 1, calls  # TA x scaling, TIES x scaling x k, WA once
    assert "task_arithmetic(scaling=0.2)" in calls and "weight_averaging" in calls
    jobs = sweep.jobs()
    assert len(jobs) == len(calls) * 2 and len({j.config_hash for j in jobs}) == len(jobs)
    assert summarize(job_status(jobs)) == {"done": 0, "queued": 0, "running": 0, "failed": 0, "missing": len(jobs)}
    with pytest.raises(HyperparameterError, match="scalling.*did you mean: scaling"):
        Sweep(["task_arithmetic"], suites=["micro"], grid={"scalling": [1]}).calls()
    with pytest.raises(registry.UnknownMethodError, match="did you mean"):
        Sweep(["task_arithmetc"], suites=["micro"]).calls()


def test_a_sweep_plans_its_jobs_at_one_resolved_precision(micro, results_dir):
    """The precision is resolved when the sweep is planned (the config hash depends on it) and travels with the
    job, so a worker on another device computes the same hash; a job of the planned hash runs and matches it."""
    from mergebench.api.context import resolve_precision
    from mergebench.sweeps.sweep import run_job

    auto = Sweep(["adamerging_taskwise(steps=1)"], suites=["micro"], results_dir=str(results_dir))
    pinned = Sweep(["adamerging_taskwise(steps=1)"], suites=["micro"], results_dir=str(results_dir), precision="fp32")
    (job,), (fp32_job,) = auto.jobs(), pinned.jobs()
    assert job.precision == resolve_precision("auto", "cpu") and fp32_job.precision == "fp32"
    assert (job.config_hash == fp32_job.config_hash) == (job.precision == "fp32")
    assert run_job(fp32_job)["config_hash"] == fp32_job.config_hash
    with pytest.raises(Exception, match="precision 'half'"):
        Sweep(["task_arithmetic"], suites=["micro"], precision="half")


def test_local_sweep_survives_failure_and_killed_worker_then_resumes(probes, micro, results_dir):
    """A method that raises and one whose process is killed are failed records (the kill ends the method's own
    worker process, not the sweep's job); resuming runs both again, and the killed one now succeeds."""
    sweep = Sweep(["sweep_raise_probe", "sweep_kill_probe"], suites=["micro"], results_dir=str(results_dir),
                  name="faults")
    outcomes = run_sweep(sweep, LocalExecutor(jobs=2), log=lambda *a: None)
    by_pipeline = {o.job.pipeline.split("(")[0]: o for o in outcomes}
    assert by_pipeline["sweep_raise_probe"].ok and by_pipeline["sweep_kill_probe"].ok  # the jobs finished

    status = {e["job"].pipeline.split("(")[0]: e for e in job_status(sweep.jobs())}
    assert status["sweep_raise_probe"]["state"] == "failed" and "injected failure" in status["sweep_raise_probe"]["error"]
    assert status["sweep_kill_probe"]["state"] == "failed" and "signal 9" in status["sweep_kill_probe"]["error"]
    assert not list(results_dir.rglob("*.tmp")), "the killed worker left no partial file"
    loaded = load_records(results_dir, "micro")
    assert not loaded.unreadable and [r["status"] for r in loaded.records] == ["failed", "failed"]

    # Resume from the saved manifest: both failed jobs run again; the killed one now succeeds.
    again = Sweep.load("faults", results_dir)
    assert [j.pipeline.split("(")[0] for j in pending(again.jobs())] == ["sweep_raise_probe", "sweep_kill_probe"]
    assert len(run_sweep(again, LocalExecutor(jobs=2), log=lambda *a: None)) == 2
    assert summarize(job_status(again.jobs())) == {"done": 1, "queued": 0, "running": 0, "failed": 1, "missing": 0}
    assert [j.pipeline for j in pending(again.jobs())] == ["sweep_raise_probe"], "done jobs are not rerun"


def test_cli_status_reports_the_sweep(probes, micro, results_dir, capsys):
    from mergebench.cli import main

    Sweep(["task_arithmetic", "sweep_raise_probe"], suites=["micro"], results_dir=str(results_dir), name="st").save()
    assert main(["status", "st", "--results", str(results_dir)]) == 1
    out = capsys.readouterr().out
    assert "2 jobs: 0 done, 0 queued, 0 running, 0 failed, 2 missing" in out and "sweep_raise_probe" in out
    assert main(["status", "nope", "--results", str(results_dir)]) == 2
    assert "no sweep 'nope'" in capsys.readouterr().err


def test_submitit_local_executor_runs_the_same_jobs(micro, results_dir, tmp_path):
    sweep = Sweep(["weight_averaging", "task_arithmetic"], suites=["micro"], grid={"scaling": [0.25]},
                  results_dir=str(results_dir), name="submitit")
    executor = make_executor("submitit-local", folder=tmp_path / "submitit", slurm={"time": 10})
    assert isinstance(executor, SubmititExecutor) and executor.wait
    outcomes = run_sweep(sweep, executor, log=lambda *a: None)
    assert len(outcomes) == 2 and all(o.ok for o in outcomes), [o.detail for o in outcomes]
    assert summarize(job_status(sweep.jobs()))["done"] == 2
    assert run_sweep(sweep, executor, log=lambda *a: None) == [], "nothing left to run"


def test_slurm_submission_settings(tmp_path):
    opts = SlurmOptions.from_dict({"partition": "gpu", "gpus": 2, "time": 90, "mem": "32", "cpus": 8,
                                   "constraint": "a100"})
    script = opts.sbatch_script(tmp_path, n_jobs=12)
    for line in ["#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=2", "#SBATCH --time=90",
                 "#SBATCH --mem=32GB", "#SBATCH --cpus-per-task=8", "#SBATCH --constraint=a100",
                 "#SBATCH --array=0-11%12"]:
        assert line in script, (line, script)
    if shutil.which("srun") is None:  # no cluster here: the error says what to use instead
        with pytest.raises(ValueError, match="--executor local"):
            make_executor("slurm", folder=tmp_path, slurm=opts)


def test_sweep_config_file(tmp_path):
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text("methods: [task_arithmetic]\nsuites: micro\nseeds: [0, 1]\ngrid: {scaling: [0.1, 0.3]}\n"
                   "time_limit: 600\nexecutor: slurm\nslurm: {partition: gpu, gpus: 1, time: 30}\n")
    sweep, executor = Sweep.from_config(cfg, results_dir=str(tmp_path))
    assert sweep.suites == ["micro"] and sweep.seeds == [0, 1] and sweep.time_limit_s == 600
    assert executor == {"executor": "slurm", "slurm": {"partition": "gpu", "gpus": 1, "time": 30}}
    cfg.write_text("methods: [task_arithmetic]\nseed: [0]\n")
    with pytest.raises(HyperparameterError, match="unknown keys.*seed"):
        Sweep.from_config(cfg)
