"""Fault injection: time limits, non-finite outputs, killed writers, concurrent writers,
mismatched expert architectures, a missing cache and corrupt record files."""

import dataclasses
import json
import multiprocessing as mp
import os
import signal
import threading
import time

import pytest
import torch

from mergebench import MergedModel, leaderboard
from mergebench.records import load_records, write_record
from mergebench.run import ArchitectureMismatchError, run_many, run_one
from mergebench.suites import get_suite
from mergebench.suites.base import Suite
from mergebench.weights import Weights


def test_a_method_over_its_time_limit_is_recorded_as_failed(micro, results_dir, probe):
    @probe("slow_probe")
    def slow(ctx, seconds: float = 60.0):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(0.01)
        return ctx.shared_model(ctx.pretrained_weights)

    start = time.monotonic()
    rec = run_one("slow_probe", micro, results_dir=results_dir, time_limit_s=0.5)
    assert time.monotonic() - start < 30, "the merge was interrupted, not waited out"
    assert rec["status"] == "failed" and "MethodTimeout" in rec["error"] and "time limit of 0.5 s" in rec["error"]
    assert rec["time_limit_s"] == 0.5
    saved = json.loads(open(rec["_path"]).read())
    assert saved["status"] == "failed"
    # the alarm is gone afterwards: a fast method under the same limit succeeds, and nothing fires later
    ok = run_one("slow_probe(seconds=0.0)", micro, results_dir=results_dir, time_limit_s=30)
    assert ok["status"] == "ok"
    assert "slow_probe" in leaderboard.render(results_dir, micro.name).split("## Failed runs")[1]


def test_time_limit_holds_off_the_main_thread_too(micro, results_dir, probe):
    """The limit is a child process killed by the parent, not a signal: it works from any thread."""
    @probe("sleepy_probe")
    def sleepy(ctx):
        time.sleep(600)
        return ctx.shared_model(ctx.pretrained_weights)

    out = []
    t = threading.Thread(target=lambda: out.append(run_one("sleepy_probe", micro, results_dir=results_dir,
                                                           time_limit_s=0.5, count_flops=False)))
    t.start()
    t.join(120)
    assert out and out[0]["status"] == "failed" and "exceeded its time limit of 0.5 s" in out[0]["error"]


class _Overflow(MergedModel):
    """Finite weights, non-finite outputs: features overflow to inf in float32."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.register_buffer("gain", torch.tensor(1e30))

    def forward(self, images, task):
        return self.encoder(images) * self.gain * self.gain


def test_non_finite_outputs_fail_the_run(micro, results_dir, probe):
    @probe("overflow_probe")
    def overflow(ctx):
        return _Overflow(ctx.encoder())

    rec = run_one("overflow_probe", micro, results_dir=results_dir, count_flops=False)
    assert rec["status"] == "failed"
    assert "non-finite or out-of-range accuracy" in rec["error"] and "non-finite outputs" in rec["error"]


def _mismatched(micro, task, how):
    def load(t):
        w = Weights(micro.expert_weights(t))
        if t == task:
            key = "transformer.resblocks.0.mlp.c_fc.weight"
            if how == "shape":
                w[key] = w[key][:-1]
            else:
                del w[key]
        return w
    return Suite(name="micro-mismatch", tasks=micro.tasks, encoder_config=micro.encoder_config,
                 pretrained=micro.pretrained, heads=micro.heads, data=micro.data, load_expert=load,
                 info=dict(micro.info))


@pytest.mark.parametrize("how", ["shape", "missing"])
def test_mismatched_expert_architectures_say_what_to_do(micro, results_dir, how):
    bad = _mismatched(micro, micro.tasks[1], how)
    with pytest.raises(ArchitectureMismatchError) as err:
        run_one("task_arithmetic", bad, results_dir=results_dir)
    msg = str(err.value)
    assert f"expert {micro.tasks[1]!r}" in msg and "mlp.c_fc.weight" in msg and "same pretrained backbone" in msg
    assert ("shape" in msg) == (how == "shape") and ("missing" in msg) == (how == "missing")
    recs = run_many(["task_arithmetic"], bad, results_dir=results_dir)  # reported, the loop goes on
    assert recs[0]["status"] == "failed" and "ArchitectureMismatchError" in recs[0]["error"]


def test_missing_cache_says_how_to_build(tmp_path):
    from mergebench.build.mini8 import load_or_build
    from mergebench.suites.mini8 import CONFIGS

    custom = dataclasses.replace(CONFIGS["micro"], seed=3)  # no committed artifact: built locally
    with pytest.raises(FileNotFoundError, match="mini8-custom is not built in .*load_or_build"):
        load_or_build(custom, build=False, cache_dir=tmp_path)
    assert get_suite("micro", build=False, cache_dir=tmp_path).tasks  # committed: nothing to build
    with pytest.raises(KeyError, match="did you mean: micro"):
        get_suite("mikro")


def _writer(results_dir, index, n, template):
    for i in range(n):
        rec = dict(template, config_hash=f"{index:02d}{i:014d}")
        write_record(rec, os.path.join(results_dir, "micro", f"w{index}-{i}.json"))
        write_record(dict(template, config_hash=f"shared{index}"), os.path.join(results_dir, "micro", "shared.json"))


def _template():
    return {"status": "ok", "config_hash": "0" * 16,
            "method": {"name": "task_arithmetic", "display_name": "Task Arithmetic",
                       "pipeline": "task_arithmetic(scaling=0.3)", "hparams": {"scaling": 0.3}, "needs": ["nothing"]},
            "metrics": {"accuracy": {"digits": 50.0}, "normalized_accuracy": {"digits": 60.0}, "avg_accuracy": 50.0,
                        "avg_normalized_accuracy": 60.0},
            "params": {"added": 0, "added_pct": 0.0}, "timing": {"merge_s": 0.1},
            "payload": "x" * 20000}


def test_concurrent_writers_lose_nothing(results_dir):
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(results_dir), k, 25, _template())) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    loaded = load_records(results_dir, "micro")
    assert not loaded.unreadable
    assert len(loaded.records) == 4 * 25 + 1  # every distinct record, and one intact shared file
    assert len({r["config_hash"] for r in loaded.records}) == 4 * 25 + 1
    assert not list(results_dir.rglob("*.tmp"))


def _write_forever(path, template):
    i = 0
    while True:
        write_record(dict(template, config_hash=f"{i:016d}", payload="y" * 2_000_000), path)
        i += 1


def test_a_killed_writer_leaves_no_partial_record(results_dir):
    path = results_dir / "micro" / "rec.json"
    proc = mp.get_context("fork").Process(target=_write_forever, args=(str(path), _template()))
    proc.start()
    deadline = time.monotonic() + 30
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # now it is in the middle of some write
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    loaded = load_records(results_dir, "micro")
    assert not loaded.unreadable and len(loaded.records) == 1
    assert len(loaded.records[0]["payload"]) == 2_000_000


def test_corrupt_and_foreign_record_files_are_reported_not_dropped(micro, results_dir):
    rec = run_one("pretrained", micro, results_dir=results_dir, count_flops=False)
    folder = results_dir / micro.name
    (folder / "empty.json").write_text("")
    (folder / "truncated.json").write_text(open(rec["_path"]).read()[:100])
    (folder / "foreign.json").write_text(json.dumps({"hello": 1}))
    (folder / "future.json").write_text(json.dumps({"schema": 99, "status": "ok"}))
    with pytest.warns(UserWarning, match="skipping unreadable record"):
        loaded = load_records(results_dir, micro.name)
    assert len(loaded.records) == 1
    why = {p.name: w for p, w in loaded.unreadable}
    assert set(why) == {"empty.json", "truncated.json", "foreign.json", "future.json"}
    assert "upgrade" in why["future.json"] and "not a mergebench record" in why["foreign.json"]
    md = leaderboard.render(results_dir, micro.name)
    assert all(name in md for name in why)
