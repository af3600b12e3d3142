"""Evaluation speed (images/s) of one merged encoder, with pytest-benchmark (issue 6).

Skipped by default (``--benchmark-skip`` in pyproject); run with
``pytest tests/benchmarks/test_bench_eval.py --benchmark-only``. The evaluation is
``mergebench.engine.evaluate.evaluate``: uint8 images (as the preprocessing cache stores them), normalized in
batches on the device, bf16 autocast on CUDA. The synthetic suites (random weights and images of the real
shapes; on a GPU generated on the device and evaluated resident there; ``make bench-gpu`` is the full-size run):

- CPU: ViT-B/32, fp32, a few images (the number is only a sanity line on a shared CPU);
- GPU (when CUDA is available): ViT-B/32 and ViT-L/14, eight tasks; ``extra_info`` records images/s, the
  ideal images/s from the GPU's peak dense bf16 rate (``MERGEBENCH_PEAK_TFLOPS`` overrides the table) and
  the projected time of the full eight-task test evaluation (87,433 images; issue target for ViT-B/32:
  under 15 s on one H100).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from mergebench.engine.evaluate import evaluate
from mergebench.suites import get_suite

GMACS = {"ViT-B-32": 4.41, "ViT-L-14": 81.1}  # per 224-px image (fvcore count, attention included)
FULL_TEST_IMAGES = 87433                      # the eight test sets of the task-vectors protocol
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}  # dense
SUITE = {"ViT-B-32": "synthetic-vitb32", "ViT-L-14": "synthetic-vitl14"}


def _model(suite):
    from mergebench.api.context import MergeContext
    from mergebench.engine.runspec import RunSpec

    ctx = MergeContext(suite, RunSpec.build("weight_averaging", suite, device="cpu"), show_progress=False)
    return ctx.shared_model(ctx.pretrained_weights)


def _peak_tflops() -> float | None:
    if os.environ.get("MERGEBENCH_PEAK_TFLOPS"):
        return float(os.environ["MERGEBENCH_PEAK_TFLOPS"])
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def test_eval_speed_cpu_vit_b32(benchmark):
    suite = get_suite("synthetic-vitb32", fraction=2e-4, verbose=False)      # 4 images of SUN397, 2 of MNIST
    model = _model(suite)
    tasks = ["SUN397", "MNIST"]
    result = benchmark.pedantic(lambda: evaluate(model, suite, "test", "cpu", batch_size=4, tasks=tasks), rounds=2,
                                warmup_rounds=0)
    assert result["images"] == 6 and all(0 <= a <= 100 for a in result["accuracy"].values())
    benchmark.extra_info.update({"device": "cpu", "threads": torch.get_num_threads(), "model": "ViT-B-32",
                                 "images_per_s": round(result["images_per_s"], 1)})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name,fraction,batch", [("ViT-B-32", 0.4, 2048), ("ViT-L-14", 0.1, 512)])
def test_eval_speed_gpu(benchmark, name, fraction, batch):
    suite = get_suite(SUITE[name], fraction=fraction, device="cuda", verbose=False)  # uint8 tests on the device
    model = _model(suite).cuda()
    result = benchmark.pedantic(lambda: evaluate(model, suite, "test", "cuda", batch_size=batch, resident=True),
                                rounds=3, warmup_rounds=1)
    ips = result["images_per_s"]
    peak = _peak_tflops()
    ideal = peak * 1e12 / (2 * GMACS[name] * 1e9) if peak else None
    benchmark.extra_info.update({
        "device": torch.cuda.get_device_name(), "model": name, "images": result["images"], "batch_size": batch,
        "images_per_s": round(ips, 1), "ideal_images_per_s_at_peak_bf16": round(ideal, 1) if ideal else None,
        "fraction_of_peak": round(ips / ideal, 3) if ideal else None,
        "projected_full_eval_s": round(FULL_TEST_IMAGES / ips, 2)})
    print(f"\n{name}: {ips:,.0f} images/s on {torch.cuda.get_device_name()}"
          + (f" ({100 * ips / ideal:.0f}% of the bf16 peak's {ideal:,.0f})" if ideal else "")
          + f"; the 8-task test evaluation ({FULL_TEST_IMAGES:,} images) would take {FULL_TEST_IMAGES / ips:.1f} s")
    assert result["images"] == sum(len(suite.split("test", t)) for t in suite.tasks)


EVAL_OVERHEAD_OUT = Path(__file__).resolve().parents[2] / "docs" / "benchmarks" / "eval_overhead_cpu.json"


def test_eval_overhead_cpu_vit_b32(benchmark):
    """The harness's evaluation against a bare open_clip forward of the same encoder at the same batch size, in
    this process, interleaved (harness, bare, harness, ...; 3 rounds each, the best of each side): the overhead is
    1 - harness images/s / bare images/s (target: at most 10%). Written to docs/benchmarks/eval_overhead_cpu.json.

    The bare side is the encoder called on already normalized float batches (nothing else); the harness's side is
    ``evaluate``: per batch the uint8 images normalized on the device, the forward, the head, the argmax and the
    prediction entropy (its timer excludes only the data's preparation, as it does in every run)."""
    import json
    import platform

    threads = 2
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    suite = get_suite("synthetic-vitb32", fraction=0.002, verbose=False)   # 40 images of SUN397, 20 of MNIST
    tasks, batch = ["SUN397", "MNIST"], 16
    model = _model(suite).eval()
    batches = [suite.normalize(suite.split("test", t).images[i:i + batch])
               for t in tasks for i in range(0, len(suite.split("test", t)), batch)]
    images = sum(len(b) for b in batches)

    @torch.no_grad()
    def bare():
        start = time.perf_counter()
        for x in batches:
            model.encoder(x)
        return images / (time.perf_counter() - start)

    rounds = {"harness": [], "bare": []}

    def compare():
        for _ in range(3):
            result = evaluate(model, suite, "test", "cpu", batch_size=batch, tasks=tasks)
            rounds["harness"].append(result["images_per_s"])
            rounds["bare"].append(bare())

    try:
        benchmark.pedantic(compare, rounds=1, iterations=1, warmup_rounds=0)
    finally:
        torch.set_num_threads(before)
    harness, plain = max(rounds["harness"]), max(rounds["bare"])
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    entry = {"model": "ViT-B-32 (open_clip, random weights)", "device": "cpu", "cpu": cpu, "threads": threads,
             "batch_size": batch, "images": images, "tasks": tasks, "precision": "float32",
             "harness_images_per_s": round(harness, 2), "bare_forward_images_per_s": round(plain, 2),
             "overhead": round(1 - harness / plain, 4),
             "rounds_images_per_s": {k: [round(v, 2) for v in vs] for k, vs in rounds.items()},
             "load_average_1min": round(os.getloadavg()[0], 2), "torch": torch.__version__}
    benchmark.extra_info.update(entry)
    EVAL_OVERHEAD_OUT.write_text(json.dumps(entry, indent=1) + "\n")
    assert images == 60 and harness > 0 and plain > 0
