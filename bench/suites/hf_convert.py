"""Hugging Face ``CLIPVisionModel`` (or ``CLIPVisionModelWithProjection`` / ``CLIPModel``) <-> open_clip keys.

open_clip's ``VisionTransformer`` and HF's CLIP vision tower compute the same function; only the
names and two layouts differ: HF keeps separate q/k/v projections (open_clip: one ``in_proj``,
rows q then k then v), and HF's ``visual_projection`` is a Linear (weight ``(out, width)``) where
open_clip stores ``proj`` as ``(width, out)``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pickle

import torch
from torch import Tensor

from mergebench.errors import MergebenchError

_SIMPLE = {
    "embeddings.class_embedding": "class_embedding",
    "embeddings.patch_embedding.weight": "conv1.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "pre_layrnorm.weight": "ln_pre.weight", "pre_layrnorm.bias": "ln_pre.bias",
    "post_layernorm.weight": "ln_post.weight", "post_layernorm.bias": "ln_post.bias",
}
_LAYER = {
    "self_attn.out_proj.weight": "attn.out_proj.weight", "self_attn.out_proj.bias": "attn.out_proj.bias",
    "layer_norm1.weight": "ln_1.weight", "layer_norm1.bias": "ln_1.bias",
    "layer_norm2.weight": "ln_2.weight", "layer_norm2.bias": "ln_2.bias",
    "mlp.fc1.weight": "mlp.c_fc.weight", "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight", "mlp.fc2.bias": "mlp.c_proj.bias",
}
_IGNORED = ("embeddings.position_ids",)
# transformers >= 5 saves a CLIPVisionModel without the ``vision_model.`` prefix
_BARE_VISION = ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")
_LAYER_RE = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")


class ConversionError(MergebenchError, ValueError):
    pass


def hf_to_open_clip(state: dict[str, Tensor], source: str = "<state dict>") -> dict[str, Tensor]:
    """HF CLIP vision keys -> open_clip VisionTransformer keys (text-tower keys are dropped).

    Without ``visual_projection.weight`` (a plain ``CLIPVisionModel``) the result has no ``proj``;
    the caller decides where it comes from.
    """
    out, qkv = {}, {}
    for key, value in state.items():
        k = key
        for prefix in ("module.", "model.", "clip_model.", "clip."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k == "visual_projection.weight":
            out["proj"] = value.t().contiguous()
            continue
        if k.startswith("vision_model."):
            k = k[len("vision_model."):]
        elif not k.startswith(_BARE_VISION):
            continue  # text tower, logit_scale, text_projection
        if k in _IGNORED:
            continue
        if k in _SIMPLE:
            out[_SIMPLE[k]] = value
            continue
        m = _LAYER_RE.match(k)
        if m is None:
            raise ConversionError(f"{source}: no open_clip equivalent for HF key {key!r}")
        layer, rest = m.group(1), m.group(2)
        qm = re.match(r"^self_attn\.([qkv])_proj\.(weight|bias)$", rest)
        if qm:
            qkv.setdefault((layer, qm.group(2)), {})[qm.group(1)] = value
            continue
        if rest not in _LAYER:
            raise ConversionError(f"{source}: no open_clip equivalent for HF key {key!r}")
        out[f"transformer.resblocks.{layer}.{_LAYER[rest]}"] = value
    for (layer, kind), parts in qkv.items():
        missing = [p for p in "qkv" if p not in parts]
        if missing:
            raise ConversionError(f"{source}: layer {layer} lacks self_attn.{missing[0]}_proj.{kind}")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    if not out:
        raise ConversionError(f"{source}: no CLIP vision keys (vision_model.* or embeddings.*/encoder.*) found")
    return out


_TEXT_SIMPLE = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias",
}


def hf_text_to_open_clip(state: dict[str, Tensor], source: str = "<state dict>") -> dict[str, Tensor]:
    """The text tower of an HF ``CLIPModel`` (``text_model.*``, ``text_projection``, ``logit_scale``) as open_clip
    ``CLIP`` keys; empty when the state has no text tower (a ``CLIPVisionModel``)."""
    out, qkv = {}, {}
    for key, value in state.items():
        k = key
        for prefix in ("module.", "model.", "clip_model.", "clip."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k == "text_projection.weight":  # a Linear (out, width); open_clip multiplies x @ text_projection
            out["text_projection"] = value.t().contiguous()
            continue
        if k == "logit_scale":
            out["logit_scale"] = value
            continue
        if not k.startswith("text_model."):
            continue
        k = k[len("text_model."):]
        if k == "embeddings.position_ids":
            continue
        if k in _TEXT_SIMPLE:
            out[_TEXT_SIMPLE[k]] = value
            continue
        m = _LAYER_RE.match(k)
        if m is None:
            raise ConversionError(f"{source}: no open_clip equivalent for HF key {key!r}")
        layer, rest = m.group(1), m.group(2)
        qm = re.match(r"^self_attn\.([qkv])_proj\.(weight|bias)$", rest)
        if qm:
            qkv.setdefault((layer, qm.group(2)), {})[qm.group(1)] = value
            continue
        if rest not in _LAYER:
            raise ConversionError(f"{source}: no open_clip equivalent for HF key {key!r}")
        out[f"transformer.resblocks.{layer}.{_LAYER[rest]}"] = value
    for (layer, kind), parts in qkv.items():
        missing = [p for p in "qkv" if p not in parts]
        if missing:
            raise ConversionError(f"{source}: text layer {layer} lacks self_attn.{missing[0]}_proj.{kind}")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    return out


def open_clip_to_hf(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse (open_clip VisionTransformer keys -> CLIPVisionModelWithProjection keys)."""
    simple = {v: k for k, v in _SIMPLE.items()}
    layer_map = {v: k for k, v in _LAYER.items()}
    out = {}
    for key, value in state.items():
        if key == "proj":
            out["visual_projection.weight"] = value.t().contiguous()
        elif key in simple:
            out[f"vision_model.{simple[key]}"] = value
        else:
            m = re.match(r"^transformer\.resblocks\.(\d+)\.(.+)$", key)
            if m is None:
                raise ConversionError(f"no HF equivalent for open_clip key {key!r}")
            layer, rest = m.groups()
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]
                for name, part in zip("qkv", value.chunk(3, 0)):
                    out[f"vision_model.encoder.layers.{layer}.self_attn.{name}_proj.{kind}"] = part.contiguous()
            else:
                out[f"vision_model.encoder.layers.{layer}.{layer_map[rest]}"] = value
    return out


def hf_vision_config(folder: str | Path) -> dict:
    """The vision config of an HF folder as a ``build_encoder`` config (for shape checks)."""
    cfg = json.loads((Path(folder) / "config.json").read_text())
    if "vision_config" in cfg:  # a full CLIPModel
        cfg = {**cfg["vision_config"], "projection_dim": cfg.get("projection_dim", cfg["vision_config"].get("projection_dim"))}
    return {"image_size": cfg.get("image_size"), "patch_size": cfg.get("patch_size"), "width": cfg.get("hidden_size"),
            "layers": cfg.get("num_hidden_layers"), "heads": cfg.get("num_attention_heads"),
            "act": cfg.get("hidden_act"), "output_dim": cfg.get("projection_dim")}


def read_hf_folder(folder: str | Path, trust_pickle: bool = False) -> dict[str, Tensor]:
    """The raw state dict of an HF model folder (safetensors preferred; ``.bin`` read with weights_only, or with
    ``trust_pickle`` by mergebench's restricted unpickler when it holds more than a state dict)."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise ConversionError(f"{folder} is not a Hugging Face model folder (no config.json)")
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        from safetensors.torch import load_file
        state = {}
        for shard in shards:
            state.update(load_file(shard))
        return state
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if not bins:
        raise ConversionError(f"{folder}: no model.safetensors or pytorch_model.bin")
    state = {}
    for b in bins:
        try:
            state.update(torch.load(b, map_location="cpu", weights_only=True))
        except pickle.UnpicklingError as e:
            if not trust_pickle:
                raise ConversionError(
                    f"{b} is not a plain state dict: a weights-only load refuses it "
                    f"({str(e).splitlines()[0][:160]}). Reading it would run pickle code: pass --trust-pickle only "
                    f"if you trust the file (mergebench then admits only tensor data, see docs/reliability.md, "
                    f"\"What --trust-pickle trusts\"), or convert it to model.safetensors.") from None
            from mergebench.suites.zoo import _as_state_dict, trusted_torch_load
            state.update(_as_state_dict(trusted_torch_load(b), b))
    return state
