"""Backbones, classification heads and the merged-model interface.

Every suite's encoder is an open_clip ``VisionTransformer``, so methods touch the same module
names on mini8 as on the real ViT-B/32 (``transformer.resblocks.N.attn``, ``ln_post``, ``proj``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal, Mapping

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn

from mergebench.api.weights import Weights

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

    def __init__(self, weight: Tensor, scale: float = LOGIT_SCALE):
        super().__init__()
        self.register_buffer("weight", F.normalize(weight.float(), dim=-1))
        self.scale = scale

    def forward(self, features: Tensor) -> Tensor:
        return self.scale * F.normalize(features, dim=-1) @ self.weight.t()


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


Granularity = Literal["task", "layer"]


@dataclass
class MergeState:
    """How a merged encoder was built from theta_0 and the task vectors (AdaMerging's result)."""

    granularity: Granularity
    coefficients: Tensor            # clamped, (n_tensors or 1, T), task order of the suite
    ties_k: float | None = None     # task vectors TIES-processed with this k (AdaMerging++), or raw
    extra: dict = field(default_factory=dict)


class AdaMergedModel(SharedModel):
    """A SharedModel that remembers its merge coefficients (a plain attribute, so it is not stored/counted)."""

    def __init__(self, encoder: nn.Module, merge_state: MergeState):
        super().__init__(encoder)
        self.merge_state = merge_state


def load_weights(encoder: nn.Module, weights: Mapping[str, Tensor]) -> nn.Module:
    """A copy of ``encoder`` holding ``weights`` (strict: a missing or extra key is an error)."""
    model = copy.deepcopy(encoder)
    reference = model.state_dict()
    _check_weights(reference, weights)
    model.load_state_dict({k: v.to(reference[k].dtype) for k, v in weights.items()})
    return model


def _check_weights(reference: Mapping[str, Tensor], weights: Mapping[str, Tensor]) -> None:
    missing = sorted(set(reference) - set(weights))
    unexpected = sorted(set(weights) - set(reference))
    if missing or unexpected:
        raise KeyError(f"weights do not match the encoder: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, tensor in weights.items():
        if tuple(tensor.shape) != tuple(reference[name].shape):
            raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, the encoder expects {tuple(reference[name].shape)}")


def encoder_from_weights(config: Mapping, weights: Mapping[str, Tensor], device: str | torch.device | None = None,
                         adopt: Callable[[Tensor], bool] | None = None) -> VisionTransformer:
    """A new encoder holding ``weights`` (strict, like ``load_weights``), on ``device`` (default: the weights').

    Built on the meta device, so nothing is randomly initialised (no time spent, no global RNG drawn) and no
    second model is allocated. Each tensor is copied, except where ``adopt(tensor)`` says the encoder may own it
    as it is (a fresh merge result: no copy, no extra memory); a tensor of another dtype or device is copied.
    """
    with torch.device("meta"):
        model = build_encoder(config)
    reference = model.state_dict()
    _check_weights(reference, weights)
    state = {}
    for name, ref in reference.items():
        t = weights[name]
        target = torch.device(device) if device is not None else t.device
        if adopt is not None and t.dtype == ref.dtype and t.device == target and not t.requires_grad and adopt(t):
            state[name] = t if t.is_contiguous() else t.contiguous()
        else:
            state[name] = t.detach().to(device=target, dtype=ref.dtype, copy=True)
    model.load_state_dict(state, assign=True)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:  # a tensor the state dict does not hold (a non-persistent buffer) would be uninitialised
        raise RuntimeError(f"encoder tensors not set from the weights: {left[:5]}")
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
