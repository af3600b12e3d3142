"""Hugging Face CLIP checkpoints: their keys as open_clip's, their folders and their configs.

open_clip's ``VisionTransformer`` (and ``CLIP``'s text tower) and HF's CLIP towers compute the same function; only
the names and two layouts differ: HF keeps separate q/k/v projections (open_clip: one ``in_proj``, rows q then k
then v), and HF's ``visual_projection`` / ``text_projection`` are Linears (weight ``(out, width)``) where open_clip
stores ``proj`` / ``text_projection`` as ``(width, out)``.
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from mergebench.errors import MergebenchError
from mergebench.suites.checkpoints.trusted_pickle import as_state_dict, trusted_torch_load

# HF key inside one transformer layer -> open_clip's (both towers); q/k/v are fused separately
LAYER_KEYS = {
    "self_attn.out_proj.weight": "attn.out_proj.weight", "self_attn.out_proj.bias": "attn.out_proj.bias",
    "layer_norm1.weight": "ln_1.weight", "layer_norm1.bias": "ln_1.bias",
    "layer_norm2.weight": "ln_2.weight", "layer_norm2.bias": "ln_2.bias",
    "mlp.fc1.weight": "mlp.c_fc.weight", "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight", "mlp.fc2.bias": "mlp.c_proj.bias",
}
_LAYER_RE = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")
_QKV_RE = re.compile(r"^self_attn\.([qkv])_proj\.(weight|bias)$")
_WRAPPERS = ("module.", "model.", "clip_model.", "clip.")


@dataclass(frozen=True)
class _Tower:
    prefix: str                  # the tower's keys in a CLIPModel
    bare: tuple                  # keys a tower saved alone starts with (transformers >= 5 drops ``vision_model.``)
    simple: dict                 # HF key -> open_clip key outside the layers
    projection: tuple            # (HF Linear, open_clip matrix), transposed
    extra: tuple = ()            # keys copied as they are
    layer: str = "layer"         # how an error names a layer


_TOWERS = {
    "vision": _Tower("vision_model.", ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm."),
                     {"embeddings.class_embedding": "class_embedding",
                      "embeddings.patch_embedding.weight": "conv1.weight",
                      "embeddings.position_embedding.weight": "positional_embedding",
                      "pre_layrnorm.weight": "ln_pre.weight", "pre_layrnorm.bias": "ln_pre.bias",
                      "post_layernorm.weight": "ln_post.weight", "post_layernorm.bias": "ln_post.bias"},
                     ("visual_projection.weight", "proj")),
    "text": _Tower("text_model.", (),
                   {"embeddings.token_embedding.weight": "token_embedding.weight",
                    "embeddings.position_embedding.weight": "positional_embedding",
                    "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"},
                   ("text_projection.weight", "text_projection"), extra=("logit_scale",), layer="text layer"),
}
_IGNORED = ("embeddings.position_ids",)


class ConversionError(MergebenchError, ValueError):
    pass


def hf_to_open_clip(state: dict[str, Tensor], source: str = "<state dict>", tower: str = "vision"
                    ) -> dict[str, Tensor]:
    """One tower of an HF CLIP state dict with open_clip's keys: ``tower="vision"`` (a ``CLIPVisionModel``,
    ``CLIPVisionModelWithProjection`` or ``CLIPModel``) as ``VisionTransformer`` keys, ``"text"`` as ``CLIP``'s
    text-tower keys (with ``text_projection`` and ``logit_scale``). The other tower's keys are dropped.

    The vision tower without ``visual_projection.weight`` (a plain ``CLIPVisionModel``) has no ``proj``; the caller
    decides where it comes from. A state without the text tower gives an empty text tower; one without the vision
    tower is an error.
    """
    spec = _TOWERS[tower]
    out, qkv = {}, {}
    for key, value in state.items():
        k = key
        for prefix in _WRAPPERS:
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k == spec.projection[0]:
            out[spec.projection[1]] = value.t().contiguous()
            continue
        if k in spec.extra:
            out[k] = value
            continue
        if k.startswith(spec.prefix):
            k = k[len(spec.prefix):]
        elif not k.startswith(spec.bare):
            continue  # the other tower, its projection, logit_scale
        if k in _IGNORED:
            continue
        if k in spec.simple:
            out[spec.simple[k]] = value
            continue
        m = _LAYER_RE.match(k)
        if m is None:
            raise ConversionError(f"{source}: no open_clip equivalent for HF key {key!r}")
        layer, rest = m.group(1), m.group(2)
        qm = _QKV_RE.match(rest)
        if qm:
            qkv.setdefault((layer, qm.group(2)), {})[qm.group(1)] = value
            continue
        if rest not in LAYER_KEYS:
            raise ConversionError(f"{source}: no open_clip equivalent for HF key {key!r}")
        out[f"transformer.resblocks.{layer}.{LAYER_KEYS[rest]}"] = value
    for (layer, kind), parts in qkv.items():
        missing = [p for p in "qkv" if p not in parts]
        if missing:
            raise ConversionError(f"{source}: {spec.layer} {layer} lacks self_attn.{missing[0]}_proj.{kind}")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    if tower == "vision" and not out:
        raise ConversionError(f"{source}: no CLIP vision keys (vision_model.* or embeddings.*/encoder.*) found")
    return out


def open_clip_to_hf(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse for the image tower (open_clip VisionTransformer keys -> CLIPVisionModelWithProjection keys)."""
    spec = _TOWERS["vision"]
    simple = {v: k for k, v in spec.simple.items()}
    layer_map = {v: k for k, v in LAYER_KEYS.items()}
    out = {}
    for key, value in state.items():
        if key == spec.projection[1]:
            out[spec.projection[0]] = value.t().contiguous()
        elif key in simple:
            out[f"{spec.prefix}{simple[key]}"] = value
        else:
            m = re.match(r"^transformer\.resblocks\.(\d+)\.(.+)$", key)
            if m is None:
                raise ConversionError(f"no HF equivalent for open_clip key {key!r}")
            layer, rest = m.groups()
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]
                for name, part in zip("qkv", value.chunk(3, 0)):
                    out[f"{spec.prefix}encoder.layers.{layer}.self_attn.{name}_proj.{kind}"] = part.contiguous()
            else:
                out[f"{spec.prefix}encoder.layers.{layer}.{layer_map[rest]}"] = value
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
            state.update(as_state_dict(trusted_torch_load(b), b))
    return state
