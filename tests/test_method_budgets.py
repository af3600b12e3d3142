"""Method budgets: defaults are the declared paper budgets, learned methods declare one, the smoke budget fills
every stage of a pipeline, smoke runs are marked on the leaderboard, and every built-in passes the conformance kit
under its smoke budget."""

from __future__ import annotations

import csv
import io
import json
import re

import pytest

from mergebench import leaderboard, registry
from mergebench.conformance import check_method
from mergebench.pipeline import MethodCall
from mergebench.registry import HyperparameterError, get_method, list_methods
from mergebench.run import run_many

BUILT_INS = [n for n in list_methods() if get_method(n).source == "built-in"]

# A hyperparameter named like these measures compute or data, so a built-in that has one declares its paper value
# in register_method(..., paper_budget=...): steps / episodes, and anything ending in _steps, _episodes,
# _exemplars, _examples or _images (n_exemplars, adamerging_steps, val_images, fisher_examples).
BUDGET_NAME = re.compile(r"^(steps|episodes)$|_(steps|episodes|exemplars|examples|images)$")


@pytest.mark.parametrize("name", list_methods())
def test_defaults_equal_the_declared_paper_budget(name):
    spec = get_method(name)
    for key, paper in spec.paper_budget.items():
        default = spec.hyperparameters[key].default
        assert default == paper and type(default) is type(paper), (
            f"{name}: {key} defaults to {default!r} but its declared paper budget is {paper!r}")
    for key in spec.smoke:
        assert key in spec.hyperparameters and key != "base", (name, key)


def test_learned_built_ins_declare_a_paper_budget():
    missing = {n: [k for k in get_method(n).hyperparameters
                   if BUDGET_NAME.search(k) and k not in get_method(n).paper_budget] for n in BUILT_INS}
    missing = {n: ks for n, ks in missing.items() if ks}
    assert not missing, f"declare register_method(..., paper_budget={{...}}) for {missing}"
    # the rule does reach the methods it is for
    for name, key in [("adamerging_layerwise", "steps"), ("rmm", "episodes"), ("regmean", "n_exemplars"),
                      ("concrete_adamerging", "adamerging_steps"), ("tall_masks", "val_images"),
                      ("perturb_and_merge", "fisher_examples")]:
        assert BUDGET_NAME.search(key) and key in get_method(name).paper_budget


def test_paper_budgets_that_come_from_the_official_code():
    budgets = {n: get_method(n).paper_budget for n in BUILT_INS}
    assert budgets["rmm"] == {"episodes": 700, "data_scale": 1.0, "batch_size": 128}
    assert budgets["doge"] == {"steps": 400} and budgets["wudi_merging"] == {"steps": 300}
    assert budgets["tall_masks"] == budgets["consensus_ta"] == budgets["consensus_ties"] == {"val_images": 5000}
    assert budgets["cat_merging"] == {"n_exemplars": 2}
    assert budgets["fisher_merging"] == budgets["regmean"] == {"n_exemplars": 256}


@pytest.fixture
def probe_addon():
    """A temporary add-on whose default base has a smoke budget (the built-in add-ons default to Task Arithmetic)."""
    @registry.register_method("budget_probe_addon", display_name="Budget probe", paper=registry.Paper("A probe", 2026,
                              "0000.00000"), paper_budget={"steps": 10}, smoke={"steps": 1})
    def budget_probe_addon(ctx, base="adamerging_taskwise(lr=0.01)", steps: int = 10, rank: int = 4):
        """A probe."""
        return base

    yield "budget_probe_addon"
    registry.unregister_method("budget_probe_addon")


def test_smoke_budget_fills_every_stage_and_keeps_what_the_spec_sets(probe_addon):
    call = MethodCall.parse("surgery(base=intervmerge(base=adamerging_layerwise(lr=0.01), steps=7), rank=4)")
    smoke = call.with_budget("smoke").resolve()
    surgery, interv, ada = smoke, smoke.hparams["base"], smoke.hparams["base"].hparams["base"]
    assert (surgery.hparams["steps"], surgery.hparams["rank"]) == (2, 4)
    assert interv.hparams["steps"] == 7                                     # set by the spec: kept
    assert (ada.hparams["steps"], ada.hparams["lr"]) == (2, 0.01)
    assert smoke.below_paper_budget() == ["adamerging_layerwise: steps=2 < 500", "intervmerge: steps=7 < 500",
                                          "surgery: steps=2 < 500"]
    assert call.with_budget("paper").resolve() == call.resolve() and call.resolve().below_paper_budget() == [
        "intervmerge: steps=7 < 500"]

    default_base = MethodCall(probe_addon).with_budget("smoke").resolve()   # the base the spec does not name
    assert default_base.hparams["steps"] == 1
    assert default_base.hparams["base"].name == "adamerging_taskwise"
    assert (default_base.hparams["base"].hparams["steps"], default_base.hparams["base"].hparams["lr"]) == (2, 0.01)

    assert MethodCall.parse("intervmerge_mini").with_budget("smoke").resolve().hparams["slice_width"] == 16
    with pytest.raises(HyperparameterError, match="unknown budget 'tiny'"):
        MethodCall("surgery").with_budget("tiny")


def test_smoke_runs_are_marked_below_budget_in_every_format(micro, tmp_path):
    results = tmp_path / "results"
    smoke, paper = run_many(["adamerging_taskwise"], micro, results_dir=results, budget="smoke", show_progress=False,
                            count_flops=False) + run_many(["task_arithmetic"], micro, results_dir=results,
                                                          show_progress=False, count_flops=False)
    assert smoke["status"] == paper["status"] == "ok", (smoke.get("error"), paper.get("error"))
    gap = "adamerging_taskwise: steps=2 < 500"
    assert smoke["budget"] == {"requested": "smoke", "below_paper": [gap]}
    assert paper["budget"] == {"requested": "paper", "below_paper": []}
    ada = get_method("adamerging_taskwise").display_name
    ta = get_method("task_arithmetic").display_name

    paths = leaderboard.write(results, micro.name, out_dir=tmp_path / "lb")
    md = paths["md"].read_text()
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert any(m.startswith(ada) and m.endswith("†") for m in rows), rows.keys()
    assert any(m == ta for m in rows), "a paper-budget row has no mark"
    assert f"† ran below its paper's budget: {ada} (steps=2) ({gap})." in md

    table = {r["Pipeline"].split("(")[0]: r for r in csv.DictReader(io.StringIO(paths["csv"].read_text()))}
    assert table["adamerging_taskwise"]["Below budget"] == gap and table["task_arithmetic"]["Below budget"] == ""
    assert table["adamerging_taskwise"]["Method"].endswith("†")

    tex = paths["latex"].read_text()
    assert re.search(r"AdaMerging \(task-wise\) \(steps=2\) \\dag\{\}|AdaMerging \(task-wise\) \(steps=2\) †", tex)
    assert r"\footnotesize \dag{} ran below its paper's budget" in tex and r"steps=2 $<$ 500" in tex

    page = paths["html"].read_text()
    assert re.search(r"<td>AdaMerging \(task-wise\) \(steps=2\) †</td>", page)
    assert "<p class='budget'>† ran below its paper&#x27;s budget" in page and "steps=2 &lt; 500" in page

    # a record written before budgets were recorded is read against the registry, through its pipeline
    old = json.loads(json.dumps(smoke))
    del old["budget"]
    assert leaderboard.below_budget(old) == [gap]


@pytest.mark.parametrize("name", BUILT_INS)
def test_built_in_passes_the_conformance_kit_under_its_smoke_budget(name, micro, micro_lora):
    suite = micro_lora if "lora" in get_method(name).requires else micro
    report = check_method(name, suite=suite, budget="smoke", devices=["cpu"])
    assert report.ok, report.render()
    assert {c.name: c.status for c in report.checks}["runs on cpu"] == "pass"


def test_test_time_rows_of_two_precisions_are_named_under_the_table(micro, tmp_path):
    """`--precision auto` reuses records of either precision, so a table says which rows ran at which."""
    results = tmp_path / "results"
    kw = dict(results_dir=results, budget="smoke", show_progress=False, count_flops=False)
    recs = (run_many(["adamerging_taskwise"], micro, precision="bf16", **kw)
            + run_many(["adamerging_layerwise", "task_arithmetic"], micro, precision="fp32", **kw))
    assert all(r["status"] == "ok" for r in recs), [r.get("error") for r in recs]
    task, layer = (get_method(m).display_name for m in ("adamerging_taskwise", "adamerging_layerwise"))
    paths = leaderboard.write(results, micro.name, out_dir=tmp_path / "lb")
    md = paths["md"].read_text()
    assert (f"Test-time adaptation loops ran at two precisions: bfloat16 autocast: {task} (steps=2); "
            f"float32: {layer} (steps=2).") in md, md
    table = {r["Pipeline"].split("(")[0]: r for r in csv.DictReader(io.StringIO(paths["csv"].read_text()))}
    assert (table["adamerging_taskwise"]["Precision"], table["adamerging_layerwise"]["Precision"],
            table["task_arithmetic"]["Precision"]) == ("bf16", "fp32", "")
    assert "two precisions" in paths["latex"].read_text() and "two precisions" in paths["html"].read_text()
    one = tmp_path / "one"  # one precision: no line
    run_many(["adamerging_taskwise"], micro, precision="fp32", **{**kw, "results_dir": one})
    assert "two precisions" not in leaderboard.render(one, micro.name, "md")
