"""Measurements from the model that runs: stored parameters and FLOPs per image.

FLOPs are counted by fvcore as multiply-accumulates (MACs; fvcore's "flop" is one fused
multiply-add) over matrix products, convolutions, attention and normalization. Elementwise
operators (add, mul, activation functions, ...) are not MACs; they are listed in the record
under ``uncounted_ops`` so that nothing is skipped silently. Any other operator fvcore does not
know makes the count fail with its name.
"""

from __future__ import annotations

import warnings
from collections import Counter
from math import prod

import torch
from torch import nn

from mergebench.api.models import MergedModel, stored_tensors

# Operators that carry no multiply-accumulates: shape ops and elementwise arithmetic.
ELEMENTWISE_OPS = {
    "aten::add", "aten::add_", "aten::sub", "aten::sub_", "aten::mul", "aten::mul_", "aten::div", "aten::div_",
    "aten::sigmoid", "aten::relu", "aten::relu_", "aten::gelu", "aten::tanh", "aten::softmax", "aten::neg",
    "aten::exp", "aten::abs", "aten::clamp", "aten::clamp_min", "aten::rsub", "aten::pow", "aten::sqrt", "aten::rsqrt",
    "aten::unflatten", "aten::flatten", "aten::reshape", "aten::view", "aten::permute", "aten::transpose",
    "aten::contiguous", "aten::expand", "aten::cat", "aten::stack", "aten::slice", "aten::select", "aten::index",
    "aten::zeros", "aten::zeros_like", "aten::ones_like", "aten::new_zeros", "aten::copy_", "aten::to",
    "aten::pad", "aten::constant_pad_nd", "aten::where", "aten::masked_fill", "aten::squeeze", "aten::unsqueeze",
    "aten::split", "aten::chunk", "aten::sum", "aten::mean", "aten::maximum", "aten::minimum",
    "aten::scatter", "aten::index_put_", "aten::fill_", "aten::clone", "aten::detach", "aten::type_as",
    "aten::ge", "aten::gt", "aten::lt", "aten::le", "aten::eq", "aten::ne", "aten::log", "aten::sign",
    "aten::linalg_vector_norm", "aten::norm", "aten::frobenius_norm", "aten::max", "aten::min",
}


def _sdpa_macs(inputs, outputs):
    """scaled_dot_product_attention: Q K^T and A V, each batch * heads * Nq * Nk * d MACs."""
    q, k, v = (i.type().sizes() for i in inputs[:3])
    *batch, nq, d = q
    nk, dv = k[-2], v[-1]
    return prod(batch) * nq * nk * (d + dv)


def _bmm_like_macs(inputs, outputs):
    """Batched matrix products fvcore may not cover (baddbmm, einsum-free paths)."""
    out = outputs[0].type().sizes()
    a = inputs[0].type().sizes() if len(inputs) < 3 else inputs[1].type().sizes()
    return prod(out) * a[-1]


def _native_mha_macs(inputs, outputs):
    """nn.MultiheadAttention's fused inference path: in-projection, Q K^T, A V, out-projection."""
    q, k = inputs[0].type().sizes(), inputs[1].type().sizes()
    *batch, nq, d = q
    nk = k[-2]
    b = prod(batch)
    return b * nq * d * d + 2 * b * nk * d * d + 2 * b * nq * nk * d + b * nq * d * d


EXTRA_HANDLES = {
    "aten::scaled_dot_product_attention": _sdpa_macs,
    "aten::_native_multi_head_attention": _native_mha_macs,
    "aten::baddbmm": _bmm_like_macs,
    "aten::addbmm": _bmm_like_macs,
}


class _TaskForward(nn.Module):
    """Binds the task so fvcore can trace ``forward(images)``."""

    def __init__(self, model: MergedModel, task: str):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, images):
        return self.model(images, self.task)


class UncountedOperatorError(RuntimeError):
    pass


def count_macs(model: nn.Module, image_shape: tuple, task: str | None = None, device="cpu") -> dict:
    """MACs per image of ``model`` (a MergedModel with ``task``, or a plain encoder)."""
    with warnings.catch_warnings():  # fvcore.nn scripts its focal losses at import, which torch warns is deprecated
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated", category=FutureWarning)
        from fvcore.nn import FlopCountAnalysis  # lazy: only runs that count FLOPs load fvcore

    wrapped = _TaskForward(model, task) if task is not None else model
    x = torch.zeros(1, *image_shape, device=device)
    analysis = FlopCountAnalysis(wrapped.eval(), x).set_op_handle(**EXTRA_HANDLES)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    with torch.no_grad():
        total = analysis.total()
    unknown = {op: n for op, n in analysis.unsupported_ops().items() if op not in ELEMENTWISE_OPS}
    if unknown:
        raise UncountedOperatorError(
            f"fvcore cannot count operators {dict(unknown)}; add a handle in mergebench.engine.metrics.EXTRA_HANDLES "
            f"(or list it in ELEMENTWISE_OPS if it has no multiply-accumulates)")
    return {"macs": int(total), "by_operator": {k: int(v) for k, v in analysis.by_operator().items()},
            "uncounted_ops": sorted(analysis.unsupported_ops())}


def model_macs(model: MergedModel, tasks: list[str], image_shape: tuple, device="cpu") -> dict:
    """MACs per image for each task's forward pass, and their mean."""
    per_task, uncounted = {}, set()
    for task in tasks:
        result = count_macs(model, image_shape, task, device)
        per_task[task] = result["macs"]
        uncounted.update(result["uncounted_ops"])
    return {"unit": "MAC (multiply-accumulate) per image, counted by fvcore", "per_task": per_task,
            "mean": sum(per_task.values()) / len(per_task), "uncounted_ops": sorted(uncounted)}


def tensor_bytes(t: torch.Tensor) -> float:
    """Storage of a tensor; boolean masks count one bit per element (they are stored bit-packed)."""
    return t.numel() / 8 if t.dtype == torch.bool else t.numel() * t.element_size()


def parameter_counts(model: nn.Module, backbone_numel: int, backbone_bytes: float) -> dict:
    """What the merged model stores, from its tensors, relative to one backbone copy.

    ``added`` is everything beyond one backbone: 0 for a single merged encoder, seven
    backbones for eight separate experts, the adapters / interventions / masks of add-ons.
    Boolean masks are also reported in bits (``added_bits``).
    """
    tensors = list(stored_tensors(model))
    numel = sum(t.numel() for t in tensors)
    nbytes = sum(tensor_bytes(t) for t in tensors)
    dtypes = Counter(str(t.dtype).replace("torch.", "") for t in tensors)
    added = numel - backbone_numel
    added_bytes = nbytes - backbone_bytes
    return {
        "backbone": backbone_numel, "stored": numel, "added": added,
        "added_pct": 100.0 * added / backbone_numel, "added_bytes": added_bytes,
        "added_bits": sum(t.numel() for t in tensors if t.dtype == torch.bool),
        "dtypes": dict(dtypes),
    }
