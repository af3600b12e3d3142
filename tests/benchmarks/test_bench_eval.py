"""Evaluation speed (images/s) of one merged encoder, with pytest-benchmark (issue 6).

Skipped by default (``--benchmark-skip`` in pyproject); run with
``pytest tests/benchmarks/test_bench_eval.py --benchmark-only``. The evaluation is
``mergebench.evaluate.evaluate``: uint8 images (as the preprocessing cache stores them), normalized in
batches on the device, bf16 autocast on CUDA. Random weights and synthetic data of the real input size:

- CPU: ViT-B/32, fp32, a few images (the number is only a sanity line on a shared CPU);
- GPU (when CUDA is available): ViT-B/32 and ViT-L/14, eight tasks; ``extra_info`` records images/s, the
  ideal images/s from the GPU's peak dense bf16 rate (``MERGEBENCH_PEAK_TFLOPS`` overrides the table) and
  the projected time of the full eight-task test evaluation (87,433 images; issue target for ViT-B/32:
  under 15 s on one H100).
"""

from __future__ import annotations

import os

import pytest
import torch

from mergebench.evaluate import evaluate
from mergebench.models import SharedModel, build_encoder, encoder_weights
from mergebench.suites.base import Suite, TaskData

VIT_B_32 = dict(image_size=224, patch_size=32, width=768, layers=12, heads=12, output_dim=512, act="quick_gelu")
VIT_L_14 = dict(image_size=224, patch_size=14, width=1024, layers=24, heads=16, output_dim=768, act="quick_gelu")
GMACS = {"ViT-B-32": 4.41, "ViT-L-14": 81.1}  # per 224-px image (fvcore count, attention included)
FULL_TEST_IMAGES = 87433                      # the eight test sets of the task-vectors protocol
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}  # dense


def synthetic_suite(encoder: dict, tasks: int, per_task: int, classes: int = 10) -> Suite:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    pretrained = encoder_weights(build_encoder(encoder))
    names = [f"task{i}" for i in range(tasks)]
    s = encoder["image_size"]
    images = torch.randint(0, 256, (per_task, 3, s, s), dtype=torch.uint8, generator=g)  # shared: memory stays small
    test = {t: TaskData(images, torch.randint(0, classes, (per_task,), generator=g)) for t in names}
    heads = {t: torch.randn(classes, encoder["output_dim"], generator=g) for t in names}
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    return Suite("eval-bench", names, dict(encoder), pretrained, heads, {"train": {}, "val": {}, "test": test},
                 lambda t: pretrained, mean=tuple(OPENAI_DATASET_MEAN), std=tuple(OPENAI_DATASET_STD),
                 info={"cache_key": "eval-bench"})


def _peak_tflops() -> float | None:
    if os.environ.get("MERGEBENCH_PEAK_TFLOPS"):
        return float(os.environ["MERGEBENCH_PEAK_TFLOPS"])
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def test_eval_speed_cpu_vit_b32(benchmark):
    suite = synthetic_suite(VIT_B_32, tasks=2, per_task=4)
    model = SharedModel(suite.build_encoder()).eval()
    result = benchmark.pedantic(lambda: evaluate(model, suite, "test", "cpu", batch_size=4), rounds=2, warmup_rounds=0)
    assert result["images"] == 8 and all(0 <= a <= 100 for a in result["accuracy"].values())
    benchmark.extra_info.update({"device": "cpu", "threads": torch.get_num_threads(), "model": "ViT-B-32",
                                 "images_per_s": round(result["images_per_s"], 1)})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name,encoder,per_task,batch", [("ViT-B-32", VIT_B_32, 4096, 1024), ("ViT-L-14", VIT_L_14, 1024, 512)])
def test_eval_speed_gpu(benchmark, name, encoder, per_task, batch):
    suite = synthetic_suite(encoder, tasks=8, per_task=per_task)
    for task in suite.tasks:  # pinned host memory, as a page-locked copy of the memory-mapped cache would be
        suite.data["test"][task].images = suite.data["test"][task].images.pin_memory()
    model = SharedModel(suite.build_encoder()).cuda().eval()
    result = benchmark.pedantic(lambda: evaluate(model, suite, "test", "cuda", batch_size=batch), rounds=3,
                                warmup_rounds=1)
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
    assert result["images"] == 8 * per_task
