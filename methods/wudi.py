"""WUDI merging: data-free interference minimization with the task vectors as a proxy for the layer inputs."""

from __future__ import annotations

from typing import Literal

import torch

from mergebench.methods.activations import is_block_linear_weight
from mergebench.registry import Paper, register_method
from mergebench.weights import Weights

WUDI = Paper("Whoever Started the Interference Should End It: Guiding Data-Free Model Merging via Task Vectors",
             2025, "2503.08099", "ICML", "https://github.com/nathanielyvo/WUDI-Merging")


def wudi_loss(merged: torch.Tensor, task_matrices: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """sum_t ||(tau_m - tau_t) tau_t^T||_F^2 / ||tau_t||_F^2 (torch [out, in] layout).

    Shapes: merged ``[..., out, in]``, task_matrices ``[..., T, out, in]``, sq_norms ``[..., T]``; leading
    dims (layers of the same shape) are summed.
    """
    inner = (merged.unsqueeze(-3) - task_matrices) @ task_matrices.transpose(-1, -2)
    return (inner.pow(2).sum((-2, -1)) / sq_norms).sum()


def wudi_matrix(task_matrices: torch.Tensor, steps: int = 300, lr: float = 1e-5) -> tuple[torch.Tensor, list]:
    """Adam on the WUDI objective from tau_m = sum_t tau_t; returns the result and the loss per step.

    ``task_matrices`` is ``[T, out, in]`` or ``[L, T, out, in]`` (L layers of one shape). The layers' losses
    are separable and Adam is elementwise, so optimizing them together gives exactly the per-layer results.

    The objective is a quadratic: with A_t = tau_t^T tau_t / ||tau_t||^2, S = sum_t A_t and P = sum_t tau_t A_t,
    loss = tr(tau_m S tau_m^T) - 2 tr(tau_m P^T) + c and its gradient is 2 (tau_m S - P). S and P are formed
    once (float64), so each step costs one [out, in] x [in, in] product instead of T products of [out, out]
    size as in the direct form (``wudi_loss``); the gradients, hence Adam's steps, are the same.
    """
    t = task_matrices.float()
    t64 = t.double()
    sq = t64.flatten(-2).pow(2).sum(-1).clamp_min(torch.finfo(torch.float64).tiny)        # [..., T]
    a = t64.transpose(-1, -2) @ t64 / sq[..., None, None]                                 # [..., T, in, in]
    s_mat = a.sum(-3).float()
    p_mat = (t64 @ a).sum(-3).float()
    const = (t64 @ a * t64).sum((-3, -2, -1)).sum().item()
    del a, t64
    merged = torch.nn.Parameter(t.sum(-3).clone())
    opt = torch.optim.Adam([merged], lr=lr, weight_decay=0.0)
    losses = []
    with torch.no_grad():
        for _ in range(steps):
            ms = merged @ s_mat
            losses.append(((ms * merged).sum() - 2 * (merged * p_mat).sum()).item() + const)
            merged.grad = 2 * (ms - p_mat)
            opt.step()
    return merged.detach(), losses


@register_method(
    "wudi_merging", display_name="WUDI Merging", family="data-free", paper=WUDI,
    defaults_source="Adam lr 1e-5, 300 steps, initialized at the sum of task vectors, no scaling, only the four "
                    "linear weights of each block, other parameters left at theta_0: the official repository "
                    "(nathanielyvo/WUDI-Merging, get_redundant_task_vector and its ViT script); "
                    "others='mean' / all 2-D weights is fusion_bench's variant",
    hyperparameter_help={"steps": "Adam iterations per layer", "lr": "Adam learning rate",
                         "others": "'pretrained': non-optimized tensors keep theta_0 (official); "
                                   "'mean': they take the mean task vector and every 2-D tensor is optimized "
                                   "(fusion_bench)"},
    paper_budget={"steps": 300}, smoke={"steps": 2},
    ranges={"steps": "[1, inf)", "lr": "(0, inf)"})
def wudi_merging(ctx, steps: int = 300, lr: float = 1e-5, others: Literal["pretrained", "mean"] = "pretrained"):
    """Per linear weight: tau_m = argmin sum_t ||(tau_m - tau_t) tau_t^T||^2 / ||tau_t||^2 by Adam; theta = theta_0 + tau_m.

    The rows of tau_t approximately span the inputs seen by the layer during fine-tuning, so they stand in for
    data. Initialized at sum_t tau_t, full batch, float32; the layers of one shape are optimized as one batch
    (the objective is separable and Adam elementwise, so this equals layer-by-layer optimization). With others='pretrained' (the
    official script) only attn in_proj/out_proj and mlp c_fc/c_proj weights get a task vector; with 'mean' every
    2-D tensor is optimized and the rest takes the mean task vector.
    """
    tvs = list(ctx.task_vectors().values())
    merged = Weights({k: torch.zeros_like(v) if others == "pretrained" else sum(tv[k] for tv in tvs) / len(tvs)
                      for k, v in tvs[0].items()})
    groups: dict[tuple, list[str]] = {}    # layers of one shape are optimized together (same result, fewer steps)
    for key, ref in tvs[0].items():
        if (is_block_linear_weight(key) if others == "pretrained" else ref.dim() == 2):
            groups.setdefault(tuple(ref.shape), []).append(key)
    for shape, keys in groups.items():
        stacked = torch.stack([torch.stack([tv[k] for tv in tvs]) for k in keys])   # [L, T, out, in]
        result, losses = wudi_matrix(stacked, steps, lr)
        ctx.log(f"wudi_loss/{'x'.join(map(str, shape))}", losses[-1])
        for k, r in zip(keys, result):
            merged[k] = r.to(tvs[0][k].dtype)
    return ctx.shared_model(ctx.pretrained_weights + merged)
