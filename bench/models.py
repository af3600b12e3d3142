"""Backbones, classification heads and the merged-model interface.

Every suite's encoder is an open_clip ``VisionTransformer``, so methods touch the same module
names on mini8 as on the real ViT-B/32 (``transformer.resblocks.N.attn``, ``ln_post``, ``proj``).
"""

from __future__ import annotations

import copy
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn

from mergebench.weights import Weights

LOGIT_SCALE = 100.0  # CLIP's learned temperature saturates at 100; used for every head


def build_encoder(config: Mapping) -> VisionTransformer:
    """An open_clip VisionTransformer from a plain config dict (the ``vision_cfg`` fields we use)."""
    cfg = dict(config)
    act = cfg.pop("act", "gelu")
    act_layer = {"gelu": nn.GELU, "quick_gelu": _QuickGELU}[act]
    return VisionTransformer(
        image_size=cfg["image_size"], patch_size=cfg["patch_size"], width=cfg["width"],
        layers=cfg["layers"], heads=cfg["heads"], mlp_ratio=cfg.get("mlp_ratio", 4.0),
        output_dim=cfg["output_dim"], act_layer=act_layer,
    )


class _QuickGELU(nn.Module):
    """OpenAI CLIP's activation (the OpenAI ViT weights need it)."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ClassificationHead(nn.Module):
    """A frozen cosine classifier, like CLIP's zero-shot heads: logits = s * <f/|f|, w_c/|w_c|>."""

    def __init__(self, weight: Tensor):
        super().__init__()
        self.register_buffer("weight", F.normalize(weight.float(), dim=-1))

    def forward(self, features: Tensor) -> Tensor:
        return LOGIT_SCALE * F.normalize(features, dim=-1) @ self.weight.t()


class MergedModel(nn.Module):
    """What a merging method returns: ``forward(images, task) -> image features``.

    The harness applies the suite's frozen head of ``task`` to the features. Everything the
    model stores (parameters and buffers) counts towards its size; what it stores beyond one
    backbone is reported as added parameters.
    """

    def forward(self, images: Tensor, task: str) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class SharedModel(MergedModel):
    """One encoder for every task (Task Arithmetic, TIES, AdaMerging after merging, ...)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, images, task):
        return self.encoder(images)


class PerTaskModel(MergedModel):
    """A separate encoder per task (the Individual upper bound: stores one backbone per task)."""

    def __init__(self, encoders: Mapping[str, nn.Module]):
        super().__init__()
        self.encoders = nn.ModuleDict(encoders)

    def forward(self, images, task):
        return self.encoders[task](images)


def load_weights(encoder: nn.Module, weights: Mapping[str, Tensor]) -> nn.Module:
    """A copy of ``encoder`` holding ``weights`` (strict: a missing or extra key is an error)."""
    model = copy.deepcopy(encoder)
    reference = model.state_dict()
    missing = sorted(set(reference) - set(weights))
    unexpected = sorted(set(weights) - set(reference))
    if missing or unexpected:
        raise KeyError(f"weights do not match the encoder: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, tensor in weights.items():
        if tuple(tensor.shape) != tuple(reference[name].shape):
            raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, the encoder expects {tuple(reference[name].shape)}")
    model.load_state_dict({k: v.to(reference[k].dtype) for k, v in weights.items()})
    return model


def freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def encoder_weights(encoder: nn.Module) -> Weights:
    """The encoder's floating-point tensors, detached, as arithmetic-ready Weights."""
    return Weights({k: v.detach().clone() for k, v in encoder.state_dict().items() if v.is_floating_point()})


def stored_tensors(module: nn.Module) -> Iterable[Tensor]:
    """Every distinct tensor a module stores (parameters and buffers, shared storage counted once)."""
    seen = set()
    for t in list(module.parameters()) + list(module.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            yield t
