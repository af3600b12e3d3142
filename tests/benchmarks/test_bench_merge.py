"""Merge time of the data-free and closed-form methods (issue 5), with pytest-benchmark.

Skipped by default (``--benchmark-skip`` in pyproject); run with
``pytest tests/benchmarks/test_bench_merge.py --benchmark-only``. Three backbones:

- ``micro``: the micro suite (the test fixture);
- ``mini8``: mini8's architecture with 8 experts, random weights and data (nothing to build);
- ``vit_b32``: the ``synthetic-vitb32`` suite (open_clip ViT-B/32, random weights, 8 random experts, 1% of the
  real splits); it runs only on a GPU, or on the CPU when ``MERGEBENCH_BENCH_VITB32=1`` (minutes per method on a
  CPU). Peak memory per data-free merge: ``test_bench_data_free.py``.

Only the merge is timed (``spec.fn(ctx, **hparams)``: reading experts and exemplars included, evaluation not).
"""

from __future__ import annotations

import os

import pytest
import torch

from mergebench.api.context import MergeContext
from mergebench.api.models import MergedModel, build_encoder, encoder_weights
from mergebench.api.pipeline import MethodCall
from mergebench.api.registry import get_method
from mergebench.engine.execution import seed_everything
from mergebench.engine.runspec import RunSpec
from mergebench.suites.base import Suite, TaskData

SPECS = ["lot_merging", "regmean", "fisher_merging", "cat_merging", "dare", "dare(merge='ties_merging(scaling=0.5)')",
         "tall_masks", "consensus_ta", "consensus_ties", "tsv_merging", "iso_c", "iso_cts", "wudi_merging"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_suite(name: str, encoder: dict, tasks: int = 8, n_train: int = 256, n_val: int = 128, classes: int = 10):
    """A suite with random pretrained weights, experts = pretrained + small noise, random uint8 data."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    pretrained = encoder_weights(build_encoder(encoder))
    names = [f"task{i}" for i in range(tasks)]
    experts = {t: pretrained.map(lambda k, v: v + 1e-3 * torch.randn(v.shape, generator=g)) for t in names}
    size = encoder["image_size"]

    def split(n):
        return {t: TaskData(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
                            torch.randint(0, classes, (n,), generator=g)) for t in names}

    data = {"train": split(n_train), "val": split(n_val), "test": split(8)}
    heads = {t: torch.randn(classes, encoder["output_dim"], generator=g) for t in names}
    return Suite(name, names, dict(encoder), pretrained, heads, data, lambda t: experts[t],
                 info={"cache_key": f"{name}-random"})


@pytest.fixture(scope="module")
def mini8_shaped():
    from mergebench.suites.mini8 import CONFIGS

    return random_suite("mini8-shaped", CONFIGS["mini8"].encoder)


@pytest.fixture(scope="module")
def vit_b32_shaped():
    if DEVICE == "cpu" and os.environ.get("MERGEBENCH_BENCH_VITB32") != "1":
        pytest.skip("ViT-B/32 merge benchmarks need a GPU (or MERGEBENCH_BENCH_VITB32=1)")
    from mergebench.suites import get_suite

    return get_suite("synthetic-vitb32", fraction=0.01, verbose=False)   # 1% of the real splits: data for exemplars


def _merge_once(suite, spec: str) -> MergedModel:
    call = MethodCall.parse(spec).resolve()
    seed_everything(0)
    ctx = MergeContext(suite, RunSpec.build(call, suite, device=DEVICE), show_progress=False)
    model = get_method(call.name).fn(ctx, **call.hparams)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return model


def _bench(benchmark, suite, spec, rounds):
    model = benchmark.pedantic(_merge_once, args=(suite, spec), rounds=rounds, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update({"suite": suite.name, "device": DEVICE, "spec": spec})
    assert isinstance(model, MergedModel)


@pytest.mark.parametrize("spec", SPECS)
def test_merge_time_micro(benchmark, micro, spec):
    _bench(benchmark, micro, spec, rounds=3)


@pytest.mark.parametrize("spec", SPECS)
def test_merge_time_mini8_backbone(benchmark, mini8_shaped, spec):
    _bench(benchmark, mini8_shaped, spec, rounds=1)


@pytest.mark.parametrize("spec", SPECS)
def test_merge_time_vit_b32(benchmark, vit_b32_shaped, spec):
    _bench(benchmark, vit_b32_shaped, spec, rounds=1)
