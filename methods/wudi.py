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
    """sum_t ||(tau_m - tau_t) tau_t^T||_F^2 / ||tau_t||_F^2 (torch [out, in] layout)."""
    inner = (merged.unsqueeze(0) - task_matrices) @ task_matrices.transpose(1, 2)
    return (inner.pow(2).sum((1, 2)) / sq_norms).sum()


def wudi_matrix(task_matrices: torch.Tensor, steps: int = 300, lr: float = 1e-5) -> tuple[torch.Tensor, list]:
    """Adam on the WUDI objective from tau_m = sum_t tau_t; returns the result and the loss per step."""
    t = task_matrices.float()
    sq = t.flatten(1).pow(2).sum(1).clamp_min(torch.finfo(torch.float32).tiny)
    merged = torch.nn.Parameter(t.sum(0).clone())
    opt = torch.optim.Adam([merged], lr=lr, weight_decay=0.0)
    losses = []
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = wudi_loss(merged, t, sq)
            loss.backward()
            opt.step()
            losses.append(loss.item())
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
                                   "(fusion_bench)"})
def wudi_merging(ctx, steps: int = 300, lr: float = 1e-5, others: Literal["pretrained", "mean"] = "pretrained"):
    """Per linear weight: tau_m = argmin sum_t ||(tau_m - tau_t) tau_t^T||^2 / ||tau_t||^2 by Adam; theta = theta_0 + tau_m.

    The rows of tau_t approximately span the inputs seen by the layer during fine-tuning, so they stand in for
    data. Initialized at sum_t tau_t, full batch, one layer at a time, float32. With others='pretrained' (the
    official script) only attn in_proj/out_proj and mlp c_fc/c_proj weights get a task vector; with 'mean' every
    2-D tensor is optimized and the rest takes the mean task vector.
    """
    tvs = list(ctx.task_vectors().values())
    merged = Weights()
    for key, ref in tvs[0].items():
        optimize = is_block_linear_weight(key) if others == "pretrained" else ref.dim() == 2
        stacked = torch.stack([tv[key] for tv in tvs])
        if optimize:
            merged[key], losses = wudi_matrix(stacked, steps, lr)
            ctx.log("wudi_final_loss_per_layer", losses[-1])
        elif others == "mean":
            merged[key] = stacked.mean(0)
        else:
            merged[key] = torch.zeros_like(ref)
    return ctx.shared_model(ctx.pretrained_weights + merged)
