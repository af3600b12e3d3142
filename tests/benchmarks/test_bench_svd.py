"""Merge time of the SVD-based methods on mini8-shaped experts (same-shaped matrices batched, ``shape_batches``).

Skipped by default (``--benchmark-skip`` in pyproject); run with
``pytest tests/benchmarks/test_bench_svd.py --benchmark-only -p no:cacheprovider``. Experts: mini8's architecture
(width 128, 6 blocks) with random weights, 8 experts theta_0 + noise (``test_bench_merge.random_suite``). Timed:
TSV-M, Iso-C, Iso-CTS (the whole merge), OPCM (the whole sequence of 8 arrivals) and AdaRank on Task Arithmetic and
on CART with one Adam step (the SVDs of every attention/MLP task matrix, the masks, one step on one batch of 16
images per task, the final weights).
"""

from __future__ import annotations

import pytest
import torch

from mergebench.api.context import MergeContext
from mergebench.api.pipeline import MethodCall
from mergebench.api.registry import get_method
from mergebench.engine.execution import execute, seed_everything
from mergebench.engine.runspec import RunSpec
from mergebench.engine.sequential import SequentialContext

from test_bench_merge import mini8_shaped  # noqa: F401  (the fixture; tests/benchmarks is on sys.path)

SPECS = ["tsv_merging", "iso_c", "iso_cts", "opcm", "adarank(steps=1)", "adarank_cart(steps=1)"]


def _merge_once(suite, spec: str):
    call = MethodCall.parse(spec).resolve()
    seed_everything(0)
    if call.name == "opcm":
        order = list(suite.tasks)
        ctx = SequentialContext(suite, RunSpec.build(call, suite, device="cpu", orders=[order]), order,
                                show_progress=False)
        *_, model = get_method("opcm").fn(ctx, **call.hparams)   # the model after the last arrival
        return model
    ctx = MergeContext(suite, RunSpec.build(call, suite, device="cpu"), show_progress=False)
    return execute(call, ctx)


@pytest.mark.parametrize("spec", SPECS)
def test_svd_merge_time_mini8_shaped(benchmark, mini8_shaped, spec):  # noqa: F811
    model = benchmark.pedantic(_merge_once, args=(mini8_shaped, spec), rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update({"suite": mini8_shaped.name, "spec": spec, "threads": torch.get_num_threads()})
    assert model.encoder is not None
