"""mini8 and micro, with fully fine-tuned or LoRA experts: the suites built locally (``bench/suites/mini8.py``,
``bench/suites/mini8_lora.py``), registered with what they know about their results."""

from __future__ import annotations

import dataclasses

from mergebench.suites.base import Suite
from mergebench.suites.registry import MergingSanity, register_suite

# mini8 must behave like the real benchmark (docs/leaderboards.md, "What the committed mini8
# leaderboard shows"): these are its thresholds
SANITY = MergingSanity(expert_gap=35.0, task_gap=20.0, interference=10.0, recovery=0.35, auroc=0.75, span=10.0)
# mini8 stands in for the real benchmark's full fine-tuned experts, so its ranking is also checked against the
# published table (LoRA experts and the test-size suites have no published counterpart)
RANKED = dataclasses.replace(SANITY, ranking_tau=0.8)


@register_suite(sanity=RANKED)
def mini8(build: bool = True, verbose: bool = True, cache_dir: str | None = None) -> Suite:
    """eight procedural 32-px tasks, analogues of the real benchmark's, built on a CPU in minutes (the default)"""
    from mergebench.suites.mini8 import load_mini8
    return load_mini8("mini8", cache_dir=cache_dir, build=build, verbose=verbose)


@register_suite(sanity=SANITY)
def micro(build: bool = True, verbose: bool = True, cache_dir: str | None = None) -> Suite:
    """mini8's code path at test size: three tasks, a 2-layer encoder, built in seconds"""
    from mergebench.suites.mini8 import load_mini8
    return load_mini8("micro", cache_dir=cache_dir, build=build, verbose=verbose)


@register_suite("mini8-lora", sanity=SANITY)
def mini8_lora(build: bool = True, verbose: bool = True) -> Suite:
    """mini8 with LoRA experts (rank 8 on every resblock), their factors given to the methods that ask"""
    from mergebench.suites.mini8_lora import load_mini8_lora
    return load_mini8_lora("mini8-lora", build=build, verbose=verbose)


@register_suite("micro-lora", sanity=SANITY)
def micro_lora(build: bool = True, verbose: bool = True) -> Suite:
    """micro with LoRA experts (rank 2)"""
    from mergebench.suites.mini8_lora import load_mini8_lora
    return load_mini8_lora("micro-lora", build=build, verbose=verbose)
