"""Speed of the test-time adaptation loops on the mini8 backbone, with pytest-benchmark.

Skipped by default (``--benchmark-skip`` in pyproject); run with
``pytest tests/benchmarks/test_bench_steps.py --benchmark-only --benchmark-autosave`` (``make bench``).

Each benchmark runs one method for ``STEPS`` optimisation steps on a suite with mini8's architecture, eight
tasks and test-set size (random weights and data: the cost of a step does not depend on the values), the base
of an add-on precomputed. The time covers the method's setup and its steps (for Surgery and IntervMerge the
setup includes the targets' precomputation), so ``seconds / STEPS`` is what one step costs at this schedule and
an upper bound of its cost at the paper's. ``extra_info`` stores the steps and seconds per step.

To compare two versions of the code, run this file in both (the same machine, one after the other) and compare
the saved runs (``pytest-benchmark compare``).
"""

from __future__ import annotations

import pytest
import torch

from mergebench.context import MergeContext
from mergebench.models import MergedModel, build_encoder, encoder_weights
from mergebench.pipeline import MethodCall
from mergebench.registry import get_method
from mergebench.run import execute, seed_everything
from mergebench.suites.base import Suite, TaskData

STEPS = 20
# method -> the hyperparameters of the benchmark (besides steps); add-ons get a precomputed base
SPECS = {
    "adamerging_layerwise": {},
    "adamerging_taskwise": {},
    "surgery": {"base": "task_arithmetic"},
    "intervmerge": {"base": "task_arithmetic"},
    "concrete_task_arithmetic": {},
    "adarank": {},
}


@pytest.fixture(scope="module")
def mini8_shaped():
    """mini8's backbone, 8 tasks and test-set size, random weights and data (nothing to build)."""
    from mergebench.suites.mini8 import CONFIGS

    cfg = CONFIGS["mini8"]
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    pretrained = encoder_weights(build_encoder(cfg.encoder))
    tasks = [f"task{i}" for i in range(8)]
    experts = {t: pretrained.map(lambda k, v: v + 0.01 * torch.randn(v.shape, generator=g)) for t in tasks}
    size = cfg.encoder["image_size"]
    data = {"test": {t: TaskData(torch.randint(0, 256, (cfg.n_test, 3, size, size), dtype=torch.uint8, generator=g),
                                 torch.randint(0, 10, (cfg.n_test,), generator=g)) for t in tasks}}
    heads = {t: torch.randn(10, cfg.encoder["output_dim"], generator=g) for t in tasks}
    return Suite("mini8-shaped", tasks, dict(cfg.encoder), pretrained, heads, data, lambda t: experts[t],
                 info={"cache_key": "mini8-shaped-random"})


def _ctx(suite):
    seed_everything(0)
    return MergeContext(suite, "unlabeled", "cpu", 0, show_progress=False)


@pytest.mark.parametrize("name", list(SPECS))
def test_benchmark_adaptation_steps(benchmark, mini8_shaped, name):
    fn = get_method(name).fn
    kwargs = dict(SPECS[name])
    if "base" in kwargs:
        kwargs["base"] = execute(MethodCall.parse(kwargs["base"]).resolve(), _ctx(mini8_shaped))
    model = benchmark.pedantic(lambda: fn(_ctx(mini8_shaped), steps=STEPS, **kwargs), rounds=2, iterations=1,
                               warmup_rounds=0)
    assert isinstance(model, MergedModel)
    benchmark.extra_info.update({"steps": STEPS, "threads": torch.get_num_threads(),
                                 "seconds_per_step": benchmark.stats.stats.mean / STEPS})
