"""LoRA experts: low-rank factors on the open_clip encoder and their PEFT files.

A LoRA expert is the pretrained encoder plus, per adapted matrix ``W`` (out, in), a delta
``scale * B @ A`` with ``A`` (r, in), ``B`` (out, r) and ``scale = alpha / r`` (``alpha / sqrt(r)``
with rsLoRA), as in PEFT. mergebench adapts, in every resblock of the open_clip
``VisionTransformer``:

- ``attn.in_proj``: the fused q/k/v projection ``attn.in_proj_weight`` (3*width, width) of
  ``nn.MultiheadAttention``, one LoRA on the whole matrix (open_clip has no separate q/k/v);
- ``attn.out_proj``, ``mlp.c_fc``, ``mlp.c_proj``: their ``.weight``.

Biases, layer norms, embeddings and ``proj`` are not adapted (PEFT's ``bias="none"``).

Files follow PEFT's save layout: a folder with ``adapter_config.json`` (``peft_type: LORA``,
``r``, ``lora_alpha``, ``target_modules``, ``use_rslora``, ``rank_pattern``, ``alpha_pattern``)
and ``adapter_model.safetensors`` holding ``base_model.model.<module>.lora_A.weight`` and
``.lora_B.weight``. Module names are open_clip's (``transformer.resblocks.N.attn.in_proj``,
optionally under ``visual.``) or Hugging Face CLIP's (``vision_model.encoder.layers.N.self_attn.
q_proj`` ...; q, k and v become three adapters on the row blocks of ``in_proj_weight``, mapped
with ``mergebench.suites.checkpoints.hf``'s layer names).
"""

from __future__ import annotations

import json
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from mergebench.errors import MergebenchError
from mergebench.suites.checkpoints.hf import LAYER_KEYS
from mergebench.api.weights import Weights
from mergebench.engine.io import atomic_save_tensors, atomic_write_text

# open_clip module -> the weight its LoRA updates (per resblock)
OPEN_CLIP_TARGETS = {"attn.in_proj": "attn.in_proj_weight", "attn.out_proj": "attn.out_proj.weight",
                     "mlp.c_fc": "mlp.c_fc.weight", "mlp.c_proj": "mlp.c_proj.weight"}
PEFT_PREFIX = "base_model.model."


class LoraError(MergebenchError, ValueError):
    """A LoRA adapter that cannot be applied: bad config, unknown module, wrong shape."""


@dataclass
class LoraFactor:
    """One adapter: ``weight[rows] += scale * B @ A`` for the encoder tensor ``target``."""

    target: str                     # e.g. transformer.resblocks.0.attn.in_proj_weight
    A: Tensor                       # (r, in)
    B: Tensor                       # (out, r)
    scale: float                    # alpha / r (PEFT's scaling)
    rows: tuple[int, int] | None = None  # the row block of ``target`` it updates (HF q/k/v), None: all rows

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> Tensor:
        return (self.B @ self.A) * self.scale

    def to(self, *args, **kwargs) -> "LoraFactor":
        return LoraFactor(self.target, self.A.to(*args, **kwargs), self.B.to(*args, **kwargs), self.scale, self.rows)


def lora_delta(factors: Mapping[str, LoraFactor], like: Mapping[str, Tensor]) -> Weights:
    """The full-size task vector of ``factors`` (zeros where nothing is adapted), keys of ``like``."""
    out = Weights({k: torch.zeros_like(v) for k, v in like.items()})
    for name, f in factors.items():
        if f.target not in out:
            raise LoraError(f"adapter {name!r} targets {f.target!r}, which the encoder does not have")
        block = out[f.target] if f.rows is None else out[f.target][f.rows[0]:f.rows[1]]
        if tuple(block.shape) != (f.B.shape[0], f.A.shape[1]):
            raise LoraError(f"adapter {name!r}: B @ A is {f.B.shape[0]}x{f.A.shape[1]}, its target {f.target!r}"
                            f"{'' if f.rows is None else f' rows {f.rows}'} is {tuple(block.shape)}")
        block += f.delta()
    return out


def apply_lora(base: Mapping[str, Tensor], factors: Mapping[str, LoraFactor]) -> Weights:
    """``base`` plus every adapter's ``scale * B @ A`` on its target (an expert's full weights)."""
    delta = lora_delta(factors, base)
    return Weights({k: v + delta[k] for k, v in base.items()})


# ------------------------------------------------------------------ PEFT files
def save_peft(folder: str | Path, factors: Mapping[str, LoraFactor], rank: int, alpha: float,
              base_model: str = "", prefix: str = "") -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT's layout, open_clip names)."""
    folder = Path(folder)
    tensors = {}
    for name, f in factors.items():
        tensors[f"{PEFT_PREFIX}{prefix}{name}.lora_A.weight"] = f.A
        tensors[f"{PEFT_PREFIX}{prefix}{name}.lora_B.weight"] = f.B
    atomic_save_tensors(tensors, folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none",
              "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}, "fan_in_fan_out": False,
              "target_modules": sorted(OPEN_CLIP_TARGETS), "base_model_name_or_path": base_model,
              "task_type": None, "inference_mode": True}
    atomic_write_text(folder / "adapter_config.json", json.dumps(config, indent=1))
    return folder


_HF_LAYER = re.compile(r"^(?:vision_model\.)?encoder\.layers\.(\d+)\.(.+)$")
_OC_LAYER = re.compile(r"^(?:visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")


def _module_target(module: str, width_rows: int | None) -> tuple[str, str, tuple[int, int] | None]:
    """PEFT module name -> (mergebench adapter name, target tensor, row block)."""
    m = _OC_LAYER.match(module)
    if m and m.group(2) in OPEN_CLIP_TARGETS:
        name = f"transformer.resblocks.{m.group(1)}.{m.group(2)}"
        return name, f"transformer.resblocks.{m.group(1)}.{OPEN_CLIP_TARGETS[m.group(2)]}", None
    bare = module
    for prefix in ("clip_model.", "model.", "clip."):
        bare = bare.removeprefix(prefix)
    m = _HF_LAYER.match(bare)
    if m:
        layer, rest = m.groups()
        qkv = re.match(r"^self_attn\.([qkv])_proj$", rest)
        if qkv:
            i = "qkv".index(qkv.group(1))
            return (f"transformer.resblocks.{layer}.attn.in_proj.{qkv.group(1)}",
                    f"transformer.resblocks.{layer}.attn.in_proj_weight", (i * width_rows, (i + 1) * width_rows))
        if f"{rest}.weight" in LAYER_KEYS:
            target = LAYER_KEYS[f"{rest}.weight"]
            return f"transformer.resblocks.{layer}.{target.removesuffix('.weight')}", \
                f"transformer.resblocks.{layer}.{target}", None
    if bare.startswith("text_model."):
        raise LoraError(f"adapter module {module!r} is in the text tower; mergebench's heads are the backbone's "
                        f"zero-shot heads, so only image-tower adapters can be applied")
    raise LoraError(f"adapter module {module!r} has no LoRA target in mergebench's encoder (supported: open_clip "
                    f"transformer.resblocks.N.{{{', '.join(OPEN_CLIP_TARGETS)}}} and HF vision_model.encoder.layers.N."
                    f"{{self_attn.q_proj,k_proj,v_proj,out_proj, mlp.fc1, mlp.fc2}})")


def read_peft(folder: str | Path, reference: Mapping[str, Tensor]) -> dict[str, LoraFactor]:
    """The LoRA factors of a PEFT adapter folder, checked against the encoder tensors ``reference``."""
    folder = Path(folder)
    cfg_file, weights_file = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not cfg_file.exists():
        raise LoraError(f"{folder} is not a PEFT adapter folder: no adapter_config.json")
    cfg = json.loads(cfg_file.read_text())
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise LoraError(f"{cfg_file}: peft_type {cfg.get('peft_type')!r}; only LORA adapters are supported")
    if cfg.get("fan_in_fan_out"):
        raise LoraError(f"{cfg_file}: fan_in_fan_out adapters (GPT-2 Conv1D) are not supported")
    if not weights_file.exists():
        bins = folder / "adapter_model.bin"
        if not bins.exists():
            raise LoraError(f"{folder}: no adapter_model.safetensors (or adapter_model.bin)")
        try:
            state = torch.load(bins, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
            raise LoraError(f"{bins}: not a readable state dict of adapter weights ({str(e).splitlines()[0][:160]}); "
                            f"save the adapter as adapter_model.safetensors") from None
    else:
        try:
            state = load_file(weights_file)
        except (SafetensorError, OSError) as e:
            raise LoraError(f"{weights_file}: not a readable safetensors file ({e}); the file may be corrupt or "
                            f"truncated") from None
    width_rows = None
    in_proj = [k for k in reference if k.endswith("attn.in_proj_weight")]
    if in_proj:
        width_rows = reference[in_proj[0]].shape[0] // 3
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        m = re.match(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$", key)
        if m is None:
            raise LoraError(f"{weights_file}: key {key!r} is not a LoRA factor (lora_A/lora_B weight); adapters with "
                            f"trained biases or modules_to_save are not supported")
        pairs.setdefault(m.group(1), {})[m.group(2)] = value.float()
    if not pairs:
        raise LoraError(f"{weights_file}: no lora_A/lora_B tensors")
    r_default, alpha_default = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    factors = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise LoraError(f"{weights_file}: module {module!r} has no {missing}.weight")
        name, target, rows = _module_target(module, width_rows)
        if target not in reference:
            raise LoraError(f"{weights_file}: module {module!r} maps to {target!r}, which the encoder does not have")
        A, B = ab["A"], ab["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise LoraError(f"{weights_file}: module {module!r} has lora_A {tuple(A.shape)} and lora_B "
                            f"{tuple(B.shape)}; expected (r, in) and (out, r)")
        rank = A.shape[0]
        alpha = _pattern(cfg.get("alpha_pattern") or {}, module, alpha_default)
        declared = _pattern(cfg.get("rank_pattern") or {}, module, r_default)
        if declared != rank:
            raise LoraError(f"{weights_file}: module {module!r} has rank {rank}, the config says r={declared}")
        scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
        factors[name] = LoraFactor(target, A, B, scale, rows)
    lora_delta(factors, {f.target: reference[f.target] for f in factors.values()})  # shapes, naming the module
    return factors


def _pattern(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern: the value of the key that ends the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def factors_summary(factors: Mapping[str, LoraFactor]) -> dict:
    ranks = sorted({f.rank for f in factors.values()})
    return {"adapters": len(factors), "ranks": ranks}
