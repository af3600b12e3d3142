"""mini8-lora: the mini8 benchmark with LoRA experts instead of fully fine-tuned ones.

The same pretrained backbone, frozen heads and data splits as its base (mini8, or micro for ``micro-lora``). Per
task, LoRA adapters (``mergebench.api.lora``: rank ``rank``, ``alpha``, on ``attn.in_proj`` (the fused q/k/v weight),
``attn.out_proj``, ``mlp.c_fc`` and ``mlp.c_proj`` of every resblock; nothing else trained) were fitted with
mini8's fine-tuning routine at LoRA's usual higher learning rate (``mergebench.build.mini8_lora``).

The suite's experts are full weights, ``pretrained + scale * B @ A``, so every method runs on it unchanged;
``suite.lora_factors(task)`` (``ctx.lora_factors(task)``) gives the factors to the methods that merge LoRA
adapters as such (CoPA-Merging). Adapters are stored in PEFT's layout (one folder per task,
``adapter_config.json`` + ``adapter_model.safetensors``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from mergebench.api import lora
from mergebench.suites import artifact
from mergebench.suites.base import Suite
from mergebench.suites.mini8.config import LORA_CONFIGS, LoraConfig
from mergebench.suites.mini8.load import load_mini8


def base_identity(base: Suite) -> str:
    """The identity of the base suite as committed (its artifact's, with the committed data), which a LoRA artifact
    names: the same on machines whose generators draw other bytes."""
    return base.info.get("artifact_identity", base.info["cache_key"])


def load_mini8_lora(name: str = "mini8-lora", cache_dir: str | None = None) -> Suite:
    """The committed suite ``name`` (``mini8-lora`` or ``micro-lora``): its base's artifact and its adapters, checked
    file by file."""
    cfg = LORA_CONFIGS[name]
    base = load_mini8(cfg.base, cache_dir=cache_dir)
    meta = artifact.read(name)
    if meta["config"] != dataclasses.asdict(cfg) or meta["base"] != base_identity(base):
        raise artifact.ArtifactError(
            f"the committed {name} artifact was built from LoRA settings {meta['config']} on base {meta['base']}, "
            f"the code asks for {dataclasses.asdict(cfg)} on base {base_identity(base)}; rebuild it with "
            f"`make {name}-artifact`")
    adapters = {k: v for k, v in meta["files"].items() if k.startswith("adapters/")}
    key = base.info["cache_key"] + "+" + artifact.identity({**meta, "sha256": adapters})
    return lora_suite(cfg, base, artifact.path(name), name, key, adapters, meta["build"])


def load_built_lora(cfg: LoraConfig, base: Suite, root: Path, name: str) -> Suite:
    """Adapters built by ``mergebench.build.mini8_lora`` into ``root`` (its ``meta.json`` lists their sha256; its
    name is their key) on the suite ``base``."""
    meta = json.loads((root / "meta.json").read_text())
    return lora_suite(cfg, base, root, name, f"{base.info['cache_key']}+lora-{root.name}", meta["sha256"],
                      meta["build"])


def lora_suite(cfg: LoraConfig, base: Suite, root: Path, name: str, key: str, adapters: dict, build: dict) -> Suite:
    reference = dict(base.pretrained)

    def load_lora(task: str) -> dict:
        return lora.read_peft(root / "adapters" / task, reference)

    def load_expert(task: str):
        return lora.apply_lora(base.pretrained, load_lora(task))

    targets = ", ".join(lora.OPEN_CLIP_TARGETS)
    info = {**base.info, "suite": name, "cache_key": key,
            "checkpoints": {**{k: v for k, v in base.info["checkpoints"].items() if not k.startswith("experts/")},
                            **adapters},
            "experts": f"LoRA r={cfg.rank} alpha={cfg.alpha:g} on {targets} of every resblock (PEFT layout); "
                       f"{cfg.epochs} epochs at lr {cfg.lr:g}",
            "lora": dataclasses.asdict(cfg), "build": {**base.info["build"], "lora": build}}
    return Suite(name=name, tasks=list(base.tasks), encoder_config=dict(base.encoder_config), logit_scale=base.logit_scale,
                 pretrained=base.pretrained, heads=base.heads, data=base.data, load_expert=load_expert,
                 mean=base.mean, std=base.std, info=info, load_lora=load_lora)
