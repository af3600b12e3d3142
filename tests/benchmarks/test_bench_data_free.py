"""Time and peak memory of the shared data-free merges on ViT-B/32-shaped experts, beside fusion_bench's loops.

Skipped by default (``--benchmark-skip`` in pyproject). Run with

    MERGEBENCH_BENCH_VITB32=1 pytest tests/benchmarks/test_bench_data_free.py --benchmark-only

The experts are the ``synthetic-vitb32`` suite's (open_clip ViT-B/32 with random weights, eight experts of 87.8M
parameters, 2.8 GB in all). Without ``MERGEBENCH_BENCH_VITB32=1`` the same runs on ViT-B/32 blocks of the real
width, two of them (``synthetic-tiny`` with that encoder), so that it fits a small machine in a minute.

``extra_info`` records, per merge: the peak resident memory above what the loaded experts already take (MB, Linux:
the kernel's high-water mark, reset before each round), the total as a multiple of the experts' own bytes
(``peak_over_experts``: 1.0 means nothing beyond the experts; the target is at most 1.5), and the CPU time.

The ``fusion_bench_*`` rows are transcriptions of fusion_bench's own loops (tanganke/fusion_bench:
``method/task_arithmetic/task_arithmetic.py`` ``task_arithmetic_merge`` with ``utils/state_dict_arithmetic.py``;
``method/ties_merging/ties_merging.py`` ``TiesMergingAlgorithm.run`` with ``ties_merging_utils.py``), run on the
same tensors, the merged state loaded into an already built pretrained encoder as fusion_bench does.
"""

from __future__ import annotations

import copy
import ctypes
import os
import sys
import time
from collections import OrderedDict

import pytest
import torch
from torch import nn

from mergebench.engine import memory
from mergebench.api.context import MergeContext
from mergebench.api.pipeline import MethodCall
from mergebench.engine.execution import execute, seed_everything
from mergebench.engine.runspec import RunSpec

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FULL = DEVICE == "cuda" or os.environ.get("MERGEBENCH_BENCH_VITB32") == "1"
WUDI_STEPS = 300 if DEVICE == "cuda" else 10   # the paper's 300 Adam steps take minutes per run on a CPU
SPECS = ["weight_averaging", "task_arithmetic", "ties_merging", "tsv_merging", "iso_c", "iso_cts",
         f"wudi_merging(steps={WUDI_STEPS})", "dare"]


@pytest.fixture(scope="module")
def experts_suite():
    from mergebench.suites import get_suite

    if FULL:
        suite = get_suite("synthetic-vitb32", fraction=1e-4, verbose=False)
    else:
        suite = get_suite("synthetic-tiny", fraction=1e-4, verbose=False,
                          encoder=dict(image_size=224, patch_size=32, width=768, layers=2, heads=12, output_dim=512,
                                       act="quick_gelu"))
    for task in suite.tasks:   # loaded once, as a run holds them: the memory every method starts from
        suite.expert_weights(task)
    return suite


def _expert_bytes(suite) -> int:
    return sum(v.numel() * v.element_size() for t in suite.tasks for v in suite.expert_weights(t).values())


def _trim():
    if sys.platform.startswith("linux"):   # freed heap pages would otherwise absorb a merge's allocations unseen
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _measured(benchmark, suite, merge):
    rounds = []

    def once():
        _trim()
        start_rss = memory.rss_bytes()
        memory.reset_peak(DEVICE)
        cpu = time.process_time()
        with torch.no_grad():
            out = merge()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        rounds.append((time.process_time() - cpu, memory.peak_rss_bytes() - (start_rss or 0)))
        return out

    result = benchmark.pedantic(once, rounds=1 if FULL else 3, iterations=1, warmup_rounds=0)
    experts = _expert_bytes(suite)
    cpu_s, over = min(r[0] for r in rounds), max(r[1] for r in rounds)
    benchmark.extra_info.update({
        "suite": suite.name, "device": DEVICE, "threads": torch.get_num_threads(), "cpu_s": round(cpu_s, 3),
        "experts_mb": round(experts / 2**20, 1), "peak_above_experts_mb": round(over / 2**20, 1),
        "peak_over_experts": round((experts + over) / experts, 3)})
    if DEVICE == "cuda":
        benchmark.extra_info["peak_gpu_mb"] = round(memory.peak_cuda_bytes() / 2**20, 1)
    return result


@pytest.mark.parametrize("spec", SPECS)
def test_data_free_merge(benchmark, experts_suite, spec):
    call = MethodCall.parse(spec).resolve()

    def merge():
        seed_everything(0)
        return execute(call, MergeContext(experts_suite, RunSpec.build(call, experts_suite, device=DEVICE), show_progress=False))

    model = _measured(benchmark, experts_suite, merge)
    benchmark.extra_info["spec"] = spec
    assert hasattr(model, "encoder")


# ------------------------------------------------------------------ fusion_bench's loops, transcribed
def _fb_state_dicts(suite):
    pretrained = suite.build_encoder().to(DEVICE)
    experts = [{k: v.to(DEVICE) for k, v in suite.expert_weights(t).items()} for t in suite.tasks]
    return pretrained, experts


def fusion_bench_task_arithmetic(pretrained_model: nn.Module, experts: list[dict], scaling: float = 0.3):
    """task_arithmetic_merge: out-of-place state-dict arithmetic, loaded into the pretrained model in place."""
    pre = pretrained_model.state_dict(keep_vars=True)
    task_vector = None
    for sd in experts:
        diff = OrderedDict((k, sd[k] - pre[k]) for k in pre)                     # state_dict_sub
        task_vector = diff if task_vector is None else OrderedDict(
            (k, task_vector[k] + diff[k]) for k in task_vector)                   # state_dict_add
    task_vector = OrderedDict((k, scaling * v) for k, v in task_vector.items())  # state_dict_mul
    pretrained_model.load_state_dict(OrderedDict((k, pre[k] + task_vector[k]) for k in pre))
    return pretrained_model


def _state_dict_to_vector(state_dict):
    shared = copy.deepcopy(state_dict)
    return nn.utils.parameters_to_vector([v.reshape(-1) for _, v in sorted(shared.items())])


def fusion_bench_ties(pretrained_model: nn.Module, experts: list[dict], k: float = 20, scaling: float = 0.3):
    """TiesMergingAlgorithm.run with merge_func 'sum': flatten (deep copies), topk_values_mask, resolve_sign,
    disjoint_merge, vector_to_state_dict, load_state_dict."""
    ptm = pretrained_model.state_dict(keep_vars=True)
    flat_ft = torch.vstack([_state_dict_to_vector(sd) for sd in experts])
    flat_ptm = _state_dict_to_vector(ptm)
    all_checks = (flat_ft - flat_ptm).clone()
    n, d = all_checks.shape
    kth_values, _ = all_checks.abs().kthvalue(d - int(d * k / 100), dim=1, keepdim=True)
    updated = all_checks * (all_checks.abs() >= kth_values)
    sign = torch.sign(updated.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())
    rows = torch.where(sign.unsqueeze(0) > 0, updated > 0, updated < 0)
    merged = flat_ptm + scaling * (updated * rows).sum(dim=0)
    reference = OrderedDict(sorted(copy.deepcopy(ptm).items()))
    nn.utils.vector_to_parameters(merged, reference.values())
    pretrained_model.load_state_dict(reference)
    return pretrained_model


@pytest.mark.parametrize("name", ["fusion_bench_task_arithmetic", "fusion_bench_ties"])
def test_fusion_bench_reference(benchmark, experts_suite, name):
    fn = {"fusion_bench_task_arithmetic": fusion_bench_task_arithmetic, "fusion_bench_ties": fusion_bench_ties}[name]
    pretrained, experts = _fb_state_dicts(experts_suite)
    model = _measured(benchmark, experts_suite, lambda: fn(pretrained, experts))
    benchmark.extra_info["spec"] = name
    assert isinstance(model, nn.Module)
