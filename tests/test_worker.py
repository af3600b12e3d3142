"""The trust boundary is a process boundary: a method runs in a worker of its own that holds only what it
declared, and nothing it does there reaches the harness (its suite, caches, global state or later records).

Each probe is a hostile but realistic method; each test fails where methods run in the harness's process."""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from mergebench.api import conformance, registry
from mergebench.engine.io import cache_root
from mergebench.engine.run import run_many, run_one
from mergebench.suites import get_suite
from mergebench.suites.base import Suite, TaskData

PAPER = registry.Paper("A probe", 2024, "0000.00000")


@pytest.fixture
def probe(probe):
    """conftest's probe, with a display name and a paper."""
    return lambda name, **kw: probe(name, display_name=name, paper=PAPER, **kw)


def _suites() -> list[Suite]:
    """Every suite object in this process (what a hostile method finds without ctx.suite)."""
    return [o for o in gc.get_objects() if isinstance(o, Suite)]


def _numbers(rec):
    m = rec["metrics"]
    return m["accuracy"], m["normalized_accuracy"], m["reference_accuracy"]


@pytest.fixture(scope="module")
def clean(tmp_path_factory, micro):
    """Task Arithmetic's record from a clean process state (what every run after a probe must equal)."""
    return run_one("task_arithmetic", get_suite("micro", verbose=False),
                   results_dir=tmp_path_factory.mktemp("clean"), count_flops=False)


def _check(report, name):
    return next(c for c in report.checks if c.name == name)


# ------------------------------------------------------------------ 1. suite internals and normalization
def test_tampered_normalization_reaches_no_later_record_and_no_cache(clean, fresh, results_dir, tmp_path, probe):
    """Case 1: a method replaces every suite's normalization statistics it can find; the next method and the
    experts' reference accuracies (computed on an empty cache) equal a clean run's."""
    @probe("probe_tamper_norm")
    def tamper(ctx):
        for suite in _suites():
            suite.mean, suite.std = (0.0, 0.0, 0.0), (0.05, 0.05, 0.05)
            suite._norm.clear()
        return ctx.shared_model(ctx.pretrained_weights)

    statistics = (fresh.mean, fresh.std)
    shutil.rmtree(cache_root() / "reference", ignore_errors=True)
    tampered, ta = run_many(["probe_tamper_norm", "task_arithmetic"], fresh, results_dir=results_dir,
                            count_flops=False)
    assert ta["status"] == "ok" and _numbers(ta) == _numbers(clean) and ta["config_hash"] == clean["config_hash"]
    cached = [json.loads(p.read_text()) for p in (cache_root() / "reference").glob("*.json")]
    assert cached == [clean["metrics"]["reference_accuracy"]]
    assert (fresh.mean, fresh.std) == statistics


def test_a_time_limited_run_fills_no_cache_from_the_method_process(clean, fresh, results_dir, tmp_path, probe):
    """Case 1 under --time-limit: the reference cache is filled by the harness from its clean suite."""
    @probe("probe_tamper_norm_limited")
    def tamper(ctx):
        for suite in _suites():
            suite.mean = (0.0, 0.0, 0.0)
            suite._norm.clear()
        return ctx.shared_model(ctx.pretrained_weights)

    shutil.rmtree(cache_root() / "reference", ignore_errors=True)
    run_one("probe_tamper_norm_limited", fresh, results_dir=results_dir, count_flops=False, time_limit_s=120)
    cached = [json.loads(p.read_text()) for p in (cache_root() / "reference").glob("*.json")]
    assert cached == [clean["metrics"]["reference_accuracy"]]


# ------------------------------------------------------------------ 2. removed tasks, tensors, heads, fields
@pytest.mark.parametrize("what", ["task", "tensor", "head", "field"])
def test_a_method_that_edits_the_suite_changes_nothing_after_it(clean, fresh, results_dir, tmp_path, probe, what):
    """Case 2: removing a task, deleting a tensor or a head, or changing a suite field in every suite the method
    can find changes neither the next method's record (its numbers, hash and folder) nor the harness's suite."""
    @probe("probe_edit_suite_" + what)
    def edit(ctx):
        for suite in _suites():
            if what == "task":
                suite.tasks.pop()
            elif what == "tensor":
                del suite.pretrained[next(iter(suite.pretrained))]
            elif what == "head":
                suite.heads.pop(next(iter(suite.heads)))
            else:
                suite.name, suite.info["checkpoints"] = "elsewhere", "forged"
        return ctx.shared_model(ctx.pretrained_weights)

    before = (list(fresh.tasks), list(fresh.pretrained), list(fresh.heads), fresh.name, dict(fresh.info))
    _, ta = run_many(["probe_edit_suite_" + what, "task_arithmetic"], fresh, results_dir=results_dir,
                     count_flops=False)
    assert (list(fresh.tasks), list(fresh.pretrained), list(fresh.heads), fresh.name, dict(fresh.info)) == before
    assert ta["status"] == "ok" and _numbers(ta) == _numbers(clean) and ta["config_hash"] == clean["config_hash"]
    assert ta["suite"]["tasks"] == clean["suite"]["tasks"]
    assert os.path.dirname(ta["_path"]).endswith(os.path.join("results", fresh.name))


# ------------------------------------------------------------------ 3. a data-free method holds no data
def test_a_data_free_method_holds_no_image_and_no_label(fresh, results_dir, probe):
    """Case 3: a method declared needs="nothing" finds no image or label in its process; one declared
    "unlabeled" finds images but no label; one declared "labeled" finds no test label; the records say what
    each used; ctx.suite is no route."""
    def census(ctx):
        data = [o for o in gc.get_objects() if isinstance(o, TaskData)]
        ctx.log("images", sum(len(d.images) for d in data))
        ctx.log("labels", sum(len(d.labels) for d in data if d.labels is not None))
        test = [o for s in _suites() for o in s.data.get("test", {}).values()]
        ctx.log("test_labels", sum(d.labels is not None for d in test))
        try:
            ctx.suite
            ctx.log("suite", 1)
        except AttributeError:
            ctx.log("suite", 0)
        return ctx.shared_model(ctx.pretrained_weights)

    for needs in ("nothing", "unlabeled", "labeled"):
        probe(f"probe_census_{needs}", needs=needs)(census)
    free, unlabeled, labeled = run_many([f"probe_census_{n}" for n in ("nothing", "unlabeled", "labeled")], fresh,
                                        results_dir=results_dir, count_flops=False)
    assert free["status"] == "ok" and free["data_used"] == []
    assert free["logs"] == {"images": [0.0], "labels": [0.0], "test_labels": [0.0], "suite": [0.0]}
    assert unlabeled["logs"]["images"][0] > 0 and unlabeled["logs"]["labels"] == [0.0]
    assert labeled["logs"]["labels"][0] > 0 and labeled["logs"]["test_labels"] == [0.0]


def test_a_labeled_method_is_refused_test_labels(micro, probe):
    from mergebench.api.context import DataNotDeclaredError, MergeContext
    from mergebench.engine.runspec import RunSpec

    ctx = MergeContext(micro, RunSpec.build("tall_masks", micro, device="cpu"))   # declares labeled data
    with pytest.raises(DataNotDeclaredError, match="test labels"):
        ctx.exemplars(micro.tasks[0], 4, split="test", labels=True)
    ctx.exemplars(micro.tasks[0], 4, split="val", labels=True)


# ------------------------------------------------------------------ 4. global torch state
@pytest.mark.parametrize("change", ["grad", "dtype"])
def test_global_state_a_method_leaves_changed_fails_it_alone(clean, fresh, results_dir, tmp_path, probe, change):
    """Case 4: autograd switched off or the default dtype changed fails that method's record, not the next's."""
    @probe("probe_state_" + change)
    def leak(ctx):
        if change == "grad":
            torch.set_grad_enabled(False)
        else:
            torch.set_default_dtype(torch.float64)
        return ctx.shared_model(ctx.pretrained_weights)

    leaked, ta = run_many(["probe_state_" + change, "task_arithmetic"], fresh, results_dir=results_dir,
                          count_flops=False)
    assert leaked["status"] == "failed" and leaked["error"].startswith("GlobalStateChangedError")
    assert {"grad": "grad enabled True -> False", "dtype": "default dtype torch.float32 -> torch.float64"}[change] \
        in leaked["error"]
    assert torch.is_grad_enabled() and torch.get_default_dtype() == torch.float32
    assert ta["status"] == "ok" and _numbers(ta) == _numbers(clean)
    if change == "grad":
        report = conformance.check_method("probe_state_" + change, time_limit_s=120)
        assert _check(report, "leaves global state as it found it").status == conformance.FAIL


# ------------------------------------------------------------------ 5. exits, threads, processes, SIGTERM
@pytest.mark.parametrize("how", ["argparse", "os._exit(0)", "SIGKILL"])
def test_a_method_that_ends_its_process_is_a_failed_record_and_the_run_goes_on(fresh, results_dir, tmp_path,
                                                                              probe, how):
    """Case 5: SystemExit from an argparse call, os._exit(0) and a signal each become that method's failed
    record with its reason; the next method runs; check-plugin names it."""
    @probe("probe_exit")
    def leave(ctx):
        if how == "argparse":
            import argparse
            argparse.ArgumentParser().parse_args(["--no-such-flag"])
        elif how == "os._exit(0)":
            os._exit(0)
        else:
            os.kill(os.getpid(), signal.SIGKILL)
        return ctx.shared_model(ctx.pretrained_weights)

    gone, ta = run_many(["probe_exit", "task_arithmetic"], fresh, results_dir=results_dir, count_flops=False)
    assert gone["status"] == "failed" and json.loads(open(gone["_path"]).read())["status"] == "failed"
    assert {"argparse": "SystemExit: 2", "os._exit(0)": "exited with status 0",
            "SIGKILL": "killed by signal 9 (SIGKILL)"}[how] in gone["error"]
    assert ta["status"] == "ok"
    if how == "os._exit(0)":
        report = conformance.check_method("probe_exit", time_limit_s=120)
        assert _check(report, "ends normally").status == conformance.FAIL


def test_threads_and_processes_a_method_leaves_end_with_it(clean, fresh, results_dir, tmp_path, probe):
    """Case 5: a thread left running that later zeroes an expert, and a child process, end with the method's
    process; the next method is recorded as a clean run; check-plugin flags the method."""
    @probe("probe_leftovers")
    def leftovers(ctx):
        expert = ctx._expert_tensors(ctx.tasks[0])

        def later():
            time.sleep(1.0)
            for v in expert.values():
                v.zero_()
        threading.Thread(target=later, daemon=True).start()
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        ctx.log("child", child.pid)
        return ctx.shared_model(ctx.pretrained_weights)

    left, ta = run_many(["probe_leftovers", "task_arithmetic"], fresh, results_dir=results_dir, count_flops=False)
    time.sleep(1.5)
    assert left["status"] == "ok" and any(x.startswith("thread") for x in left["worker"]["left_running"])
    assert any(x.startswith("process") for x in left["worker"]["left_running"])
    child = int(left["logs"]["child"][0])
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)
    again = run_one("task_arithmetic", fresh, results_dir=tmp_path / "again", count_flops=False)
    assert _numbers(ta) == _numbers(again) == _numbers(clean)
    report = conformance.check_method("probe_leftovers", time_limit_s=120)
    assert _check(report, "leaves nothing running").status == conformance.FAIL


def test_sigterm_to_a_time_limited_run_leaves_no_worker(tmp_path, micro):
    """Case 5: SIGTERM to a run under a time limit ends its worker too (no orphan without a deadline)."""
    pidfile = tmp_path / "worker.pid"
    (tmp_path / "sleeper_probe.py").write_text(textwrap.dedent(f"""
        import os, time
        from mergebench import Paper, register_method

        @register_method("probe_sleeper", display_name="Sleeper", paper=Paper("A probe", 2024, "0000.00000"))
        def sleeper(ctx):
            \"\"\"Sleeps.\"\"\"
            open({str(pidfile)!r}, "w").write(str(os.getpid()))
            time.sleep(600)
    """))
    script = tmp_path / "harness.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import sleeper_probe
        from mergebench.suites import get_suite
        from mergebench.engine.run import run_one
        run_one("probe_sleeper", get_suite("micro", verbose=False), results_dir={str(tmp_path / "r")!r},
                time_limit_s=300, count_flops=False)
    """))
    harness = subprocess.Popen([sys.executable, str(script)], env={**os.environ})
    deadline = time.monotonic() + 240
    while not pidfile.exists() or not pidfile.read_text():
        assert harness.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    worker = int(pidfile.read_text())
    os.kill(harness.pid, signal.SIGTERM)
    assert harness.wait(60) == -signal.SIGTERM
    for _ in range(50):
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the worker {worker} outlived its harness")


def test_the_worker_holds_the_inputs_copy_on_write(fresh, results_dir, probe):
    """An in-place change of an expert the context streams stays in the worker: the method's record fails,
    naming it, and the harness's suite is untouched."""
    @probe("probe_zero_streamed")
    def zero(ctx):
        for _key, _theta0, experts in ctx.per_tensor():
            for e in experts:
                e.zero_()
        return ctx.shared_model(ctx.pretrained_weights)

    before = {k: v.clone() for k, v in fresh.expert_weights(fresh.tasks[0]).items()}
    rec = run_one("probe_zero_streamed", fresh, results_dir=results_dir, count_flops=False)
    assert rec["status"] == "failed" and rec["error"].startswith("InputsModifiedError: probe_zero_streamed")
    assert all(torch.equal(before[k], v) for k, v in fresh.expert_weights(fresh.tasks[0]).items())


def test_a_memory_limit_is_enforced_from_outside(fresh, results_dir, probe):
    """A method that keeps allocating (and swallows every exception) is killed at its memory limit and recorded
    as failed with that reason (the time limit: test_integrity's swallowing probe)."""
    @probe("probe_hog")
    def hog(ctx):
        held = []
        while True:
            try:
                held.append(torch.ones(64 * 2**20 // 4))  # 64 MB at a time, touched
                time.sleep(0.05)
            except BaseException:  # noqa: BLE001 - it catches everything it can
                pass

    rec = run_one("probe_hog", fresh, results_dir=results_dir, count_flops=False, memory_limit_mb=2000)
    assert rec["status"] == "failed" and "exceeded its memory limit of 2000 MB" in rec["error"]
    assert rec["memory_limit_mb"] == 2000


class _Forged:
    """What a hostile method sends down its worker's pipe: unpickled, it would call a function in the harness."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_a_message_that_would_run_code_in_the_harness_is_refused(fresh, results_dir, probe):
    """The worker's messages are read as plain data: a forged result naming a function fails the method."""
    @probe("probe_forge")
    def forge(ctx):
        from multiprocessing.connection import Connection
        for conn in [o for o in gc.get_objects() if isinstance(o, Connection)]:
            conn.send(("result", _Forged()))
        os._exit(0)

    rec = run_one("probe_forge", fresh, results_dir=results_dir, count_flops=False)
    assert rec["status"] == "failed" and rec["error"].startswith("WorkerMessageRefused")
    assert "posix.getcwd" in rec["error"]
