"""One RunSpec, one config hash: the committed records keep their hashes, a sweep's job hashes every setting a run
does, and the record is built by Record.ok / Record.failed alone."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from mergebench.engine.records import Record, read_record, record_header
from mergebench.engine.runspec import RunSpec
from mergebench.sweeps.sweep import Sweep

ROOT = Path(__file__).resolve().parent.parent


def _committed_ok_records():
    out = []
    for suite in ("mini8", "mini8-lora"):
        for path in sorted((ROOT / "results" / suite).glob("*.json")):
            if path.name == "diagnostics.json":
                continue
            rec = read_record(path)
            if rec["status"] == "ok":
                out.append((path, rec))
    return out


def test_every_committed_ok_record_hashes_to_its_own_config_hash_from_its_settings():
    records = _committed_ok_records()
    assert len(records) >= 40  # mini8 and mini8-lora hold their leaderboards' records
    sequential = 0
    for path, rec in records:
        spec = RunSpec.from_record(rec)
        assert spec.config_hash() == rec["config_hash"], path.name
        assert spec.config() == rec["config"], path.name
        assert path.name == spec.record_path(ROOT / "results").name, path.name
        sequential += spec.sequential
    assert sequential >= 1


def test_a_changed_setting_changes_the_hash_read_from_a_record():
    path, rec = next((p, r) for p, r in _committed_ok_records() if r["method"]["name"] == "task_arithmetic")
    assert RunSpec.from_record({**rec, "seed": 1}).config_hash() != rec["config_hash"]
    other = {**rec, "method": {**rec["method"], "pipeline": "task_arithmetic(scaling=0.4)"}}
    assert RunSpec.from_record(other).config_hash() != rec["config_hash"]


# (method, the setting as `run` takes it, the same setting as a sweep's YAML gives it)
SETTINGS = [
    ("task_arithmetic", {"seed": 1}, {"seeds": [1]}),
    ("adamerging_taskwise(steps=1)", {"precision": "fp32"}, {"precision": "fp32"}),
    ("adamerging_taskwise(steps=1)", {"precision": "bf16"}, {"precision": "bf16"}),
    ("adamerging_taskwise", {"budget": "smoke"}, {"budget": "smoke"}),
    ("adamerging_taskwise(steps=1)", {"unlabeled_split": "val"}, {"unlabeled_split": "val"}),
    ("adamerging_taskwise(steps=1)", {"data_fraction": 0.5}, {"data_fraction": 0.5}),
    ("task_arithmetic", {"tune": {"scaling": [0.1, 0.3]}}, {"tune": {"scaling": [0.1, 0.3]}}),
    ("task_arithmetic", {"protocol": "sequential"}, {"protocol": "sequential"}),
    ("task_arithmetic", {"protocol": "sequential", "orders": 2}, {"protocol": "sequential", "orders": 2}),
]
# RunSpec.build's settings that are not the run's identity: they never change its hash
NOT_HASHED = {"device", "time_limit_s", "memory_limit_mb"}


def test_every_hashed_setting_is_checked_here():
    import inspect

    settings = set(inspect.signature(RunSpec.build).parameters) - {"cls", "method", "suite"}
    assert settings - NOT_HASHED == {k for _, run, _ in SETTINGS for k in run}


@pytest.mark.parametrize("method,run,sweep", SETTINGS, ids=[f"{m}-{'-'.join(r)}" for m, r, _ in SETTINGS])
def test_a_setting_changes_the_sweep_jobs_hash_as_it_changes_the_runs(micro, results_dir, method, run, sweep):
    default = RunSpec.build(method, micro).config_hash()
    ran = RunSpec.build(method, micro, **run).config_hash()
    planned, = Sweep([method], suites=["micro"], results_dir=str(results_dir), **sweep).jobs()
    from mergebench.api.context import resolve_precision

    if run.get("precision") == resolve_precision("auto", "cpu"):
        assert ran == default  # "auto" resolves to it on this machine
    else:
        assert ran != default  # the setting can change the run's result
    assert planned.config_hash == ran
    assert planned.spec(micro).config_hash() == ran  # what the sweep's worker runs is what it planned


def test_the_settings_outside_a_runs_identity_leave_its_hash(micro):
    default = RunSpec.build("task_arithmetic", micro).config_hash()
    assert RunSpec.build("task_arithmetic", micro, device="cpu", time_limit_s=5, memory_limit_mb=900).config_hash() \
        == default
    planned, = Sweep(["task_arithmetic"], suites=["micro"], time_limit_s=5, memory_limit_mb=900).jobs()
    assert planned.config_hash == default


def test_a_sweep_saved_before_the_run_settings_keeps_its_definition(micro, results_dir):
    sweep = Sweep(["task_arithmetic"], suites=["micro"], results_dir=str(results_dir), name="old")
    path = sweep.manifest_path()
    path.parent.mkdir(parents=True)
    path.write_text("name: old\nmethods: [task_arithmetic]\nsuites: [micro]\nseeds: [0]\ngrid: {}\ndevice: auto\n"
                    "time_limit_s: null\nprecision: auto\n")
    sweep.check_name()  # the same definition: no new keys are required of it
    with pytest.raises(Exception, match="another definition"):
        Sweep(["task_arithmetic"], suites=["micro"], results_dir=str(results_dir), name="old", budget="smoke").check_name()


def test_run_method_takes_a_runspec_built_on_its_suite(micro, results_dir):
    from mergebench.engine.run import run_method

    with pytest.raises(TypeError, match="RunSpec"):
        run_method("task_arithmetic", micro, results_dir)
    spec = RunSpec.build("task_arithmetic", micro)
    with pytest.raises(Exception, match="names suite"):
        from dataclasses import replace
        run_method(replace(spec, suite=replace(spec.suite, key="another")), micro, results_dir)


def _header(micro):
    spec = RunSpec.build("task_arithmetic", micro)
    return record_header(spec.config_hash(), {"name": "task_arithmetic", "pipeline": str(spec.call)},
                         {"requested": "paper", "below_paper": []}, {"name": "micro"}, 0, "cpu", "fp32",
                         spec.config(), {"threads": 1})


def test_record_ok_and_failed_give_the_schemas_keys_in_order(micro):
    ok = Record.ok(_header(micro), selection={"protocol": "fixed"}, metrics={"avg_accuracy": 1.0},
                   params={"added": 0}, flops=None, timing={"merge_s": 0.1}, data_used=[], logs={}).to_json()
    assert list(ok) == ["config_hash", "status", "created", "method", "budget", "suite", "seed", "device", "precision",
                        "config", "env", "selection", "metrics", "params", "flops", "timing", "data_used", "logs",
                        "finished"]
    assert ok["status"] == "ok" and ok["flops"] is None
    failed = Record.failed(_header(micro), error="ValueError: no", traceback="tb").to_json()
    assert failed["status"] == "failed" and failed["error"] == "ValueError: no"
    assert not {"metrics", "params", "flops", "timing", "protocol", "sequential"} & set(failed)
    assert not [k for k in ok if k.startswith("_")]
    assert {f.name for f in fields(Record)} == set(Record._ORDER)


def test_upgrade_adds_the_fields_once_and_never_writes_an_unreadable_file(tmp_path):
    from mergebench.engine.record_upgrade import upgrade_file

    src = next(p for p, r in _committed_ok_records() if r["method"]["name"] == "ties_merging")
    rec = json.loads(src.read_text())
    for key in ("label", "at_defaults"):
        rec["method"].pop(key)
    rec.pop("budget")
    path = tmp_path / "ties.json"
    path.write_text(json.dumps(rec, indent=1) + "\n")
    assert upgrade_file(path) == "upgraded"
    new = json.loads(path.read_text())
    assert new["method"]["label"] == "TIES-Merging" and new["method"]["at_defaults"] is True
    assert new["budget"] == {"below_paper": []}
    text = path.read_text()
    assert upgrade_file(path) == "current" and path.read_text() == text
    broken = tmp_path / "broken.json"
    broken.write_text('{"schema": 1, "status": "ok"')
    assert upgrade_file(broken).startswith("unreadable")
    assert broken.read_text() == '{"schema": 1, "status": "ok"'


def test_the_leaderboard_imports_no_method_registry():
    """Rendering every format of the reference records loads neither the method registry nor a method."""
    code = ("import sys, warnings; warnings.simplefilter('ignore')\n"
            "from mergebench import leaderboard\n"
            "for suite in ('mini8', 'micro', 'real-ViT-B-32'):\n"
            "    for fmt in ('md', 'csv', 'latex', 'html'):\n"
            "        leaderboard.render('records', suite, fmt)\n"
            "    leaderboard.render('records', suite, 'md', plots=True)\n"
            "    leaderboard.render_sequential('records', suite, 'md')\n"
            "print(sorted(m for m in sys.modules if m.startswith(('mergebench.api.registry', 'mergebench.api.pipeline',"
            " 'mergebench.methods', 'mergebench.engine.runspec'))))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "tests" / "data" / "leaderboard",
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
