"""Speed of the test-time adaptation loops on the mini8 backbone, with pytest-benchmark.

Skipped by default (``--benchmark-skip`` in pyproject); run with
``pytest tests/benchmarks/test_bench_steps.py --benchmark-only --benchmark-autosave`` (``make bench``).

Each benchmark runs one method on a suite with mini8's architecture, eight tasks and test-set size (random
weights and data: the cost of a step does not depend on the values), the base of an add-on precomputed: at
``STEPS`` steps (the time pytest-benchmark reports: setup and steps) and at twice as many, so that
``extra_info`` holds the cost of one step, the setup (for Surgery and IntervMerge it includes the targets
computed once per image) and the projected time of the official schedule.

To compare two versions of the code, run this file in both on the same machine, interleaved
(``scripts/compare_step_benchmarks.sh``), with ``--benchmark-timer=time.process_time`` on one thread so that
other processes disturb the figures least.
"""

from __future__ import annotations

import pytest
import torch

from mergebench.api.context import MergeContext
from mergebench.api.models import MergedModel, build_encoder, encoder_weights
from mergebench.api.pipeline import MethodCall
from mergebench.api.registry import get_method
from mergebench.engine.execution import execute, seed_everything
from mergebench.engine.runspec import RunSpec
from mergebench.suites.base import Suite, TaskData

STEPS = 10
# method -> (the hyperparameters of the benchmark besides steps, the official schedule's steps); add-ons get a
# precomputed base
SPECS = {
    "adamerging_layerwise": ({}, 500),
    "adamerging_taskwise": ({}, 500),
    "surgery": ({"base": "task_arithmetic"}, 500),
    "intervmerge": ({"base": "task_arithmetic"}, 500),
    "concrete_task_arithmetic": ({}, 2000),
    "adarank": ({}, 10000),
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
    return MergeContext(suite, RunSpec.build("adamerging_taskwise", suite, device="cpu"), show_progress=False)


@pytest.mark.parametrize("name", list(SPECS))
def test_benchmark_adaptation_steps(benchmark, mini8_shaped, name):
    """The method at STEPS steps (timed by pytest-benchmark), and once more at 2 x STEPS: the difference is the
    cost of a step, the rest the setup (precomputed targets included); ``projected_paper_s`` = setup + the
    official schedule's steps x the cost of a step."""
    fn = get_method(name).fn
    kwargs, paper_steps = dict(SPECS[name][0]), SPECS[name][1]
    if "base" in kwargs:
        kwargs["base"] = execute(MethodCall.parse(kwargs["base"]).resolve(), _ctx(mini8_shaped))

    def run(steps):
        return fn(_ctx(mini8_shaped), steps=steps, **kwargs)

    model = benchmark.pedantic(run, args=(STEPS,), rounds=1, iterations=1, warmup_rounds=0)
    assert isinstance(model, MergedModel)
    short = benchmark.stats.stats.mean
    start = benchmark._timer()
    run(2 * STEPS)
    long = benchmark._timer() - start
    per_step = max(long - short, 0.0) / STEPS
    setup = max(short - STEPS * per_step, 0.0)
    benchmark.extra_info.update({"steps": STEPS, "threads": torch.get_num_threads(), "seconds_per_step": per_step,
                                 "setup_s": setup, "paper_steps": paper_steps,
                                 "projected_paper_s": setup + paper_steps * per_step})
