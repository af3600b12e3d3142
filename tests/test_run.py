"""The runner, records, resume and failure handling, on the micro suite."""

import json
import math

import pytest
import torch

from mergebench import leaderboard

from mergebench.api import registry
from mergebench.api.context import DataNotDeclaredError, MergeContext
from mergebench.engine.runspec import RunSpec
from mergebench.engine.records import load_records
from mergebench.engine.run import run_many, run_one

BASELINES = ["pretrained", "individual", "weight_averaging", "task_arithmetic", "ties_merging"]


def test_record_has_every_measurement(micro, results_dir):
    rec = run_one("task_arithmetic", micro, results_dir=results_dir)
    assert rec["status"] == "ok"
    saved = json.loads(open(rec["_path"]).read())
    for key in ["schema", "config_hash", "method", "suite", "seed", "metrics", "params", "flops", "timing", "env"]:
        assert key in saved, key
    assert saved["method"]["pipeline"] == "task_arithmetic(scaling=0.3)"
    assert saved["suite"]["checkpoints"], "checkpoint hashes are recorded"
    assert set(saved["metrics"]["accuracy"]) == set(micro.tasks)
    assert saved["flops"]["mean"] > 0 and saved["params"]["added"] == 0
    assert saved["selection"]["protocol"] == "fixed"
    assert not list(results_dir.rglob("*.tmp")), "atomic writes leave no temporary files"


def test_individual_is_the_normalization_reference(micro, results_dir):
    rec = run_one("individual", micro, results_dir=results_dir)
    assert all(math.isclose(v, 100.0) for v in rec["metrics"]["normalized_accuracy"].values())
    n_backbone = rec["params"]["backbone"]
    assert rec["params"]["added"] == (len(micro.tasks) - 1) * n_backbone


def test_resume_skips_finished_configurations(micro, results_dir):
    first = run_one("weight_averaging", micro, results_dir=results_dir)
    again = run_one("weight_averaging", micro, results_dir=results_dir)
    assert again.get("skipped") and again["config_hash"] == first["config_hash"]
    forced = run_one("weight_averaging", micro, results_dir=results_dir, force=True)
    assert not forced.get("skipped")
    other_seed = run_one("weight_averaging", micro, results_dir=results_dir, seed=1)
    assert other_seed["config_hash"] != first["config_hash"]


def test_failures_are_recorded_and_the_suite_goes_on(micro, results_dir):
    @registry.register_method("raises_probe")
    def raises(ctx):
        raise RuntimeError("boom")

    @registry.register_method("nan_probe")
    def nan(ctx):
        return ctx.shared_model(ctx.pretrained_weights * float("nan"))

    @registry.register_method("undeclared_data_probe", needs="nothing")
    def undeclared(ctx):
        next(ctx.unlabeled(ctx.tasks[0]))
        return ctx.shared_model(ctx.pretrained_weights)

    try:
        recs = run_many(["raises_probe", "nan_probe", "undeclared_data_probe", "no_such_method", "pretrained"],
                        micro, results_dir=results_dir)
    finally:
        for name in ["raises_probe", "nan_probe", "undeclared_data_probe"]:
            registry.unregister_method(name)
    status = [r["status"] for r in recs]
    assert status == ["failed", "failed", "failed", "failed", "ok"]
    assert "boom" in recs[0]["error"]
    assert "non-finite" in recs[1]["error"]
    assert "DataNotDeclaredError" in recs[2]["error"]
    assert "unknown method" in recs[3]["error"]
    md = leaderboard.render(results_dir, micro.name)
    assert "## Failed runs" in md and "raises_probe" in md


def test_parallel_workers_give_the_records_of_one_process_in_the_given_order(micro, tmp_path, monkeypatch):
    """run_many(jobs=2): each method in a forked single-threaded worker (methods registered at run time included),
    the longest expected first, the records returned in the order asked and equal to those of one process."""
    @registry.register_method("raises_in_worker_probe")
    def raises(ctx):
        raise RuntimeError("boom in a worker")

    methods = ["weight_averaging", "raises_in_worker_probe", "no_such_method", "adamerging_taskwise",
               "task_arithmetic"]
    try:
        one = run_many(methods, micro, results_dir=tmp_path / "one", budget="smoke", show_progress=False)
        two = run_many(methods, micro, results_dir=tmp_path / "two", budget="smoke", show_progress=False, jobs=2)
    finally:
        registry.unregister_method("raises_in_worker_probe")
    assert [r["status"] for r in two] == ["ok", "failed", "failed", "ok", "ok"]
    assert "boom in a worker" in two[1]["error"] and "unknown method" in two[2]["error"]
    for a, b in zip(one, two):
        assert a["method"]["pipeline"] == b["method"]["pipeline"]
        if a["status"] == "ok":
            assert a["config_hash"] == b["config_hash"] and a["metrics"]["accuracy"] == b["metrics"]["accuracy"]
            assert b["env"]["threads"] == 1
    assert sorted(r["status"] for r in load_records(tmp_path / "two", micro.name).records) == ["failed"] + ["ok"] * 3
    from mergebench.engine.run import expected_seconds
    records = load_records(tmp_path / "two", micro.name).records
    assert expected_seconds("adamerging_taskwise", records) > 0  # from its record now
    assert expected_seconds("no_such_method", records) == 0
    with pytest.raises(Exception, match="--jobs must be at least 1"):
        run_many(methods, micro, results_dir=tmp_path / "two", jobs=0)


def test_context_serves_only_declared_data(micro):
    ctx = MergeContext(micro, RunSpec.build("task_arithmetic", micro, device="cpu"))
    with pytest.raises(DataNotDeclaredError):
        ctx.exemplars(micro.tasks[0], 4)
    unlabeled = RunSpec.build("adamerging_taskwise", micro, seed=3, device="cpu")
    ctx = MergeContext(micro, unlabeled)
    batch = next(ctx.unlabeled(micro.tasks[0], batch_size=8))
    assert batch.shape == (8, 3, 32, 32) and batch.dtype == torch.float32
    with pytest.raises(DataNotDeclaredError):
        ctx.labeled(micro.tasks[0])
    again = next(MergeContext(micro, unlabeled).unlabeled(micro.tasks[0], batch_size=8))
    assert torch.equal(batch, again), "streams are deterministic under a seed"
    assert ctx.data_used["unlabeled/test"]["images"][micro.tasks[0]] == 8


def test_validation_selection_is_recorded(micro, results_dir):
    rec = run_one("task_arithmetic", micro, results_dir=results_dir, tune={"scaling": ["0.1", "0.5"]})
    assert rec["status"] == "ok"
    sel = rec["selection"]
    assert sel["protocol"].startswith("validation") and len(sel["grid"]) == 2
    assert rec["method"]["hparams"]["scaling"] == sel["chosen"]["scaling"]


def test_leaderboard_formats_and_corrupt_records(micro, results_dir):
    run_many(BASELINES, micro, results_dir=results_dir)
    (results_dir / micro.name / "corrupt.json").write_text("{not json")
    md = leaderboard.render(results_dir, micro.name, "md")
    for name in ["Task Arithmetic", "TIES-Merging", "Individual", "Pretrained", "Weight Averaging"]:
        assert name in md
    assert "Unreadable record files" in md and "corrupt.json" in md
    csv = leaderboard.render(results_dir, micro.name, "csv")
    assert csv.splitlines()[0].startswith("Method,Pipeline") and len(csv.splitlines()) == 6
    tex = leaderboard.render(results_dir, micro.name, "latex")
    assert "\\toprule" in tex and "\\bottomrule" in tex
    loaded = load_records(results_dir, micro.name)
    assert len(loaded.unreadable) == 1 and len(loaded.records) == 5
    paths = leaderboard.write(results_dir, micro.name)
    assert paths["md"].exists() and paths["csv"].exists() and paths["latex"].exists()


def test_evaluation_times_forward_passes_not_data_preparation(micro, monkeypatch):
    """A lazy split (the real suite's preprocessing cache) is prepared before the evaluation timer starts."""
    import dataclasses
    import time as real_time
    import types

    from mergebench.engine import evaluate as ev
    from mergebench.api.models import SharedModel
    from mergebench.suites.real.imagecache import LazyTasks

    events = []

    def prepare(task, split=None):  # LazyTasks' loader: (task, split) -> TaskData
        events.append(("prepare", task))
        return micro.split(split, task) if split else {"test": micro.split("test", task)}

    lazy = dataclasses.replace(micro, data={"test": LazyTasks("test", micro.tasks, prepare)})

    def clock():
        events.append(("clock", None))
        return real_time.perf_counter()

    monkeypatch.setattr(ev, "time", types.SimpleNamespace(perf_counter=clock))
    result = ev.evaluate(SharedModel(lazy.build_encoder()), lazy, "test", "cpu")
    assert result["images"] == sum(len(micro.split("test", t)) for t in micro.tasks)
    kinds = [kind for kind, _ in events]
    assert kinds.count("prepare") == len(micro.tasks)
    assert kinds.index("clock") > max(i for i, k in enumerate(kinds) if k == "prepare"), events
