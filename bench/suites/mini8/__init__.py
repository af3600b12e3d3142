"""mini8 and micro, with fully fine-tuned or LoRA experts: eight procedural 32-px tasks, analogues of the real
benchmark's, loaded from their committed artifacts (``bench/suites/artifacts``) and registered with what they know
about their results.

This package holds the frozen configurations (:mod:`.config`), the task generators (:mod:`.tasks`, :mod:`.data`)
and the loading (:mod:`.load`, :mod:`.lora`); the recipe that built the artifacts (pretraining, fine-tuning, the
probes) is the build tool :mod:`mergebench.build`, which this package never imports.
"""

from __future__ import annotations

import dataclasses

from mergebench.suites.base import Suite
from mergebench.suites.mini8.config import CONFIGS, LORA_CONFIGS, LoraConfig, Mini8Config, mini8_config_dict
from mergebench.suites.mini8.data import generate_data, tensors_sha256
from mergebench.suites.mini8.load import ArtifactDataWarning, load_built, load_mini8
from mergebench.suites.mini8.lora import load_built_lora, load_mini8_lora
from mergebench.suites.registry import MergingSanity, register_suite

# mini8 must behave like the real benchmark (docs/leaderboards.md, "What the committed mini8
# leaderboard shows"): these are its thresholds
SANITY = MergingSanity(expert_gap=35.0, task_gap=20.0, interference=10.0, recovery=0.35, auroc=0.75, span=10.0)
# mini8 stands in for the real benchmark's full fine-tuned experts, so its ranking is also checked against the
# published table (LoRA experts and the test-size suites have no published counterpart)
RANKED = dataclasses.replace(SANITY, ranking_tau=0.8, mechanisms=True)


# the seed methods' headline configurations, on the leaderboard beside their defaults: Representation Surgery and
# IntervMerge on layer-wise AdaMerging (Surgery's Table 1 and IntervMerge's main table report them on AdaMerging)
SHOWCASE = ("surgery(base=adamerging_layerwise)", "intervmerge(base=adamerging_layerwise)")


@register_suite(sanity=RANKED, showcase=SHOWCASE)
def mini8(build: bool = True, verbose: bool = True, cache_dir: str | None = None) -> Suite:
    """eight procedural 32-px tasks, analogues of the real benchmark's, from a committed artifact (the default)"""
    return load_mini8("mini8", cache_dir=cache_dir)


@register_suite(sanity=SANITY)
def micro(build: bool = True, verbose: bool = True, cache_dir: str | None = None) -> Suite:
    """mini8's code path at test size: three tasks, a 2-layer encoder"""
    return load_mini8("micro", cache_dir=cache_dir)


@register_suite("mini8-lora", sanity=SANITY)
def mini8_lora(build: bool = True, verbose: bool = True) -> Suite:
    """mini8 with LoRA experts (rank 8 on every resblock), their factors given to the methods that ask"""
    return load_mini8_lora("mini8-lora")


@register_suite("micro-lora", sanity=SANITY)
def micro_lora(build: bool = True, verbose: bool = True) -> Suite:
    """micro with LoRA experts (rank 2)"""
    return load_mini8_lora("micro-lora")


__all__ = ["CONFIGS", "LORA_CONFIGS", "LoraConfig", "Mini8Config", "mini8_config_dict", "generate_data",
           "tensors_sha256", "ArtifactDataWarning", "load_built", "load_mini8", "load_built_lora", "load_mini8_lora",
           "SANITY", "RANKED"]
