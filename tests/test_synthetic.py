"""The shape-exact synthetic suites: real architectures and test-set sizes, random content, costs only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mergebench import leaderboard
from mergebench.cli import main
from mergebench.api.context import MergeContext
from mergebench.engine.runspec import RunSpec
from mergebench.engine.evaluate import evaluate
from mergebench.engine.run import run_one
from mergebench.suites import SUITES, get_suite
from mergebench.suites.synthetic import SYNTHETIC, split_sizes

REAL_TEST_SIZES = {"SUN397": 19850, "Cars": 8041, "RESISC45": 6300, "EuroSAT": 2700, "SVHN": 26032, "GTSRB": 12630,
                   "MNIST": 10000, "DTD": 1880}


@pytest.fixture(scope="module")
def tiny():
    return get_suite("synthetic-tiny", fraction=0.002, verbose=False)


def test_registered_and_sized_like_the_real_test_sets():
    assert set(SYNTHETIC) <= set(SUITES)
    full = split_sizes(1.0)["test"]
    assert full == REAL_TEST_SIZES and sum(full.values()) == 87433
    assert split_sizes(0.01)["test"]["DTD"] == 19 and split_sizes(1e-6)["test"]["DTD"] == 1


def test_vitb32_is_open_clips_architecture_with_random_weights():
    suite = get_suite("synthetic-vitb32", fraction=1e-4, verbose=False)   # 8 images per task at most: seconds
    assert sum(v.numel() for v in suite.pretrained.values()) == 87_849_216   # open_clip ViT-B/32's image tower
    assert suite.encoder_config["act"] == "quick_gelu" and suite.encoder_config["image_size"] == 224
    test = suite.split("test", "SVHN")
    assert test.images.dtype == torch.uint8 and tuple(test.images.shape[1:]) == (3, 224, 224)
    assert len(test) == 3 and int(test.labels.max()) < 10
    assert suite.heads["SUN397"].shape == (397, 512) and suite.info["synthetic"] is True
    again = get_suite("synthetic-vitb32", fraction=1e-4, verbose=False)
    assert torch.equal(again.pretrained["proj"], suite.pretrained["proj"])          # seeded
    assert torch.equal(again.split("test", "SVHN").images, test.images)


def test_experts_are_seeded_small_task_vectors(tiny):
    a, b = tiny.expert_weights("MNIST"), tiny.expert_weights("DTD")
    key = "transformer.resblocks.0.mlp.c_fc.weight"
    tau = a[key] - tiny.pretrained[key]
    assert 0 < tau.pow(2).mean().sqrt() < 0.05 * tiny.pretrained[key].pow(2).mean().sqrt()
    assert not torch.equal(a[key], b[key])
    fresh = get_suite("synthetic-tiny", fraction=0.002, verbose=False)
    assert torch.equal(fresh.expert_weights("MNIST")[key], a[key])


def test_bad_fraction_and_encoder_are_clear_errors(capsys):
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        get_suite("synthetic-vitb32", fraction=0)
    with pytest.raises(ValueError, match="only synthetic-tiny"):
        get_suite("synthetic-vitb32", encoder={"width": 8})
    assert main(["run", "task_arithmetic", "--suite", "synthetic-tiny", "--fraction", "2"]) == 2
    assert "fraction must be in (0, 1]" in capsys.readouterr().err


def test_run_records_say_synthetic_and_the_leaderboard_shows_no_accuracy(tiny, results_dir):
    for spec in ("task_arithmetic", "weight_averaging"):
        rec = run_one(spec, tiny, results_dir=results_dir, device="cpu", show_progress=False, count_flops=False)
        assert rec["status"] == "ok", rec.get("traceback")
        assert rec["suite"]["synthetic"] is True and rec["suite"]["fraction"] == 0.002
        timing = rec["timing"]
        assert timing["merge_s"] > 0 and timing["eval_images_per_s"] > 0
        assert timing.get("peak_rss_mb", timing.get("peak_rss_mb_process")) > 0
    md = leaderboard.render(results_dir, "synthetic-tiny")
    assert md.startswith("# mergebench speed: synthetic-tiny") and "chance level" in md
    assert "Avg" not in md and "Norm" not in md and "MNIST" not in md and "Pareto" not in md
    assert "Task Arithmetic" in md and "Eval images/s" in md
    csv = leaderboard.render(results_dir, "synthetic-tiny", "csv")
    assert "Merge s" in csv and "Avg" not in csv
    paths = leaderboard.write(results_dir, "synthetic-tiny")
    assert "Avg" not in paths["md"].read_text() and "html" not in paths


def test_synthetic_records_beside_real_ones_never_enter_the_accuracy_table(micro, tiny, results_dir):
    run_one("task_arithmetic", micro, results_dir=results_dir, device="cpu", show_progress=False,
            count_flops=False)
    rec = run_one("weight_averaging", tiny, results_dir=results_dir, device="cpu", show_progress=False,
                  count_flops=False)
    # a synthetic record filed under micro's folder (as a mistaken --results layout would)
    moved = results_dir / "micro" / "synthetic-weight_averaging.json"
    moved.write_text(Path(rec["_path"]).read_text())
    df = leaderboard.table(results_dir, "micro")[0]
    assert len(df) == 1 and df["Pipeline"][0].startswith("task_arithmetic")
    md = leaderboard.render(results_dir, "micro")
    assert "## Speed" in md and md.index("## Speed") > md.index("Task Arithmetic")


def test_cli_runs_a_synthetic_suite_at_a_fraction(results_dir, capsys):
    assert main(["run", "task_arithmetic", "--suite", "synthetic-tiny", "--fraction", "0.001", "--device", "cpu",
                 "--results", str(results_dir), "-q"]) == 0
    recs = list((results_dir / "synthetic-tiny").glob("*.json"))
    assert len(recs) == 1 and json.loads(recs[0].read_text())["suite"]["fraction"] == 0.001


# ------------------------------------------------------------------ the evaluation path bench-gpu uses
def test_evaluate_resident_and_padded_batches_give_the_same_accuracy(tiny):
    ctx = MergeContext(tiny, RunSpec.build("weight_averaging", tiny, device="cpu"), show_progress=False)
    model = ctx.shared_model(ctx.pretrained_weights)
    plain = evaluate(model, tiny, "test", "cpu", batch_size=16)
    resident = evaluate(model, tiny, "test", "cpu", batch_size=16, resident=True)
    assert plain["accuracy"] == resident["accuracy"] and plain["images"] == sum(split_sizes(0.002)["test"].values())
    assert 0 < plain["seconds"] and plain["images_per_s"] > 0


def test_bf16_evaluation_runs_attention_through_fused_sdpa(tiny):
    from torch.profiler import ProfilerActivity, profile

    ctx = MergeContext(tiny, RunSpec.build("weight_averaging", tiny, device="cpu"), show_progress=False)
    model = ctx.shared_model(ctx.pretrained_weights)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = evaluate(model, tiny, "test", "cpu", batch_size=64, tasks=["DTD"], bf16=True)
    ops = {e.key for e in prof.key_averages()}
    assert "aten::scaled_dot_product_attention" in ops
    assert 0 <= result["accuracy"]["DTD"] <= 100


def test_evaluate_pads_the_last_batch_for_a_compiled_model(tiny, monkeypatch):
    """With compile, every batch has the batch size (one graph), and the padding rows are not counted."""
    shapes = []

    def fake_compile(model, **kwargs):
        def forward(x, task):
            shapes.append(tuple(x.shape))
            return model(x, task)
        return forward

    monkeypatch.setattr(torch, "compile", fake_compile)
    ctx = MergeContext(tiny, RunSpec.build("weight_averaging", tiny, device="cpu"), show_progress=False)
    model = ctx.shared_model(ctx.pretrained_weights)
    compiled = evaluate(model, tiny, "test", "cpu", batch_size=16, tasks=["SUN397"], compile=True)
    assert len(tiny.split("test", "SUN397")) % 16 and {s[0] for s in shapes} == {16}
    assert compiled["accuracy"] == evaluate(model, tiny, "test", "cpu", batch_size=16, tasks=["SUN397"])["accuracy"]


def test_bench_gpu_runs_reduced_on_the_cpu_and_says_so(tmp_path):
    from mergebench.engine.gpu_bench import main as bench_main

    out = tmp_path / "gpu.json"
    code = bench_main(["--suite", "synthetic-tiny", "--device", "cpu", "--fraction", "0.002", "--batch-size", "32",
                       "--methods", "task_arithmetic", "ties_merging", "--out", str(out)])
    report = json.loads(out.read_text())
    assert code == 0 and report["mode"] == "reduced" and "not GPU figures" in report["note"]
    assert report["suite"]["synthetic"] is True and report["data"]["test_images"] == 175
    assert report["eval"]["eager"]["images"] == 175 and report["eval"]["eager"]["images_per_s"] > 0
    assert set(report["merge"]) == {"task_arithmetic", "ties_merging"}
    assert all(v["merge_s"] > 0 and v["peak_host_rss_mb"] > 0 for v in report["merge"].values())
