"""WUDI merging: data-free interference minimization with the task vectors as a proxy for the layer inputs."""

from __future__ import annotations

from functools import reduce
from typing import Iterable, Literal

import torch

from mergebench.activations import is_block_linear_weight
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


def wudi_terms(task_matrices: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """The quadratic form of one layer's WUDI objective from its task matrices ``[out, in]``, read one at a time.

    With A_t = tau_t^T tau_t / ||tau_t||^2: S = sum_t A_t, P = sum_t tau_t A_t and c = sum_t <tau_t A_t, tau_t>
    (float64 sums over the tasks, no task axis kept), returned with the start sum_t tau_t as
    ``(start, S, P, c)``: float32 tensors and a float. tau_t A_t is formed as (tau_t tau_t^T) tau_t / ||tau_t||^2 where that is cheaper
    (out < in / 2); then c_t = ||tau_t tau_t^T||_F^2 / ||tau_t||^2, the same number.
    """
    s64 = p64 = start = None
    const = 0.0
    for tau in task_matrices:
        t64 = tau.double()
        out, inp = t64.shape
        sq = t64.pow(2).sum().clamp_min(torch.finfo(torch.float64).tiny)
        if s64 is None:
            s64, p64 = t64.new_zeros(inp, inp), torch.zeros_like(t64)
            start = tau.float().clone()
        else:
            start += tau
        a = (t64.t() @ t64).div_(sq)                                  # A_t, [in, in]
        s64 += a
        if 2 * out < inp:
            gram = t64 @ t64.t()                                      # [out, out]
            p64.addmm_(gram, t64, alpha=1.0 / sq.item())
            const += (gram.pow(2).sum() / sq).item()
        else:
            ta = t64 @ a
            p64 += ta
            const += (ta * t64).sum().item()
        del a
    return start, s64.float(), p64.float(), const


def wudi_optimize(start: torch.Tensor, s_mat: torch.Tensor, p_mat: torch.Tensor, const: float, steps: int = 300,
                  lr: float = 1e-5) -> tuple[torch.Tensor, list[float]]:
    """Adam from ``start`` on loss = tr(tau_m S tau_m^T) - 2 tr(tau_m P^T) + c, whose gradient is 2 (tau_m S - P):
    one [out, in] x [in, in] product per step. Returns the result and the loss per step."""
    merged = torch.nn.Parameter(start.clone())
    opt = torch.optim.Adam([merged], lr=lr, weight_decay=0.0)
    losses = torch.empty(steps, dtype=torch.float64, device=start.device)   # read once: no sync per step
    with torch.no_grad():
        for i in range(steps):
            ms = merged @ s_mat
            losses[i] = (ms * merged).sum() - 2 * (merged * p_mat).sum()
            merged.grad = ms.sub_(p_mat).mul_(2)
            opt.step()
    return merged.detach(), [loss + const for loss in losses.tolist()]


def wudi_matrix(task_matrices: torch.Tensor, steps: int = 300, lr: float = 1e-5) -> tuple[torch.Tensor, list]:
    """Adam on the WUDI objective from tau_m = sum_t tau_t; returns the result and the loss per step.

    ``task_matrices`` is ``[T, out, in]`` or ``[L, T, out, in]`` (L layers of one shape, optimized one after the
    other; the loss per step is their sum).

    The objective is a quadratic: with A_t = tau_t^T tau_t / ||tau_t||^2, S = sum_t A_t and P = sum_t tau_t A_t,
    loss = tr(tau_m S tau_m^T) - 2 tr(tau_m P^T) + c and its gradient is 2 (tau_m S - P). S and P are formed
    once (float64, ``wudi_terms``), so each step costs one [out, in] x [in, in] product instead of T products of
    [out, out] size as in the direct form (``wudi_loss``); the gradients, hence Adam's steps, are the same.
    """
    if task_matrices.dim() == 4:
        results, per_layer = zip(*(wudi_matrix(layer, steps, lr) for layer in task_matrices))
        return torch.stack(results), [sum(step) for step in zip(*per_layer)]
    return wudi_optimize(*wudi_terms(task_matrices.float()), steps, lr)


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
    data. Initialized at sum_t tau_t, full batch, float32, one layer at a time (the objective is separable, so
    this is the whole model's optimization; memory stays near the experts' own). With others='pretrained' (the
    official script) only attn in_proj/out_proj and mlp c_fc/c_proj weights get a task vector; with 'mean' every
    2-D tensor is optimized and the rest takes the mean task vector. A tensor whose task vectors are all zero
    (on LoRA experts: the unadapted ``proj`` and positional embedding) stays at theta_0; fusion_bench's
    ``wudi_merging`` divides 0 by 0 there and returns NaN (measured on mini8-lora).

    On LoRA experts (mini8-lora) WUDI scores 31.7, below the pretrained model (59.2; 71.2 on mini8's
    fully fine-tuned experts), and that is the method's own result: the official code
    (``vit/wudi_main.py``, ``get_redundant_task_vector``) and fusion_bench's ``wudi_merging`` (300
    steps, the same four weights per block) give the same weights on the same experts (relative
    difference 2.5e-7) and the same accuracy. Its premise, that the rows of tau_t span the layer's
    inputs, does not hold for a rank-8 update s B_t A_t: its rows span the 8 dimensions of A_t's row
    space, which are unrelated across tasks (two tasks' A row spaces overlap 0.061, chance 0.0625
    for 8 / 128), and the layer's inputs mostly lie elsewhere: 8.5 % of an expert's layer-input
    energy falls in the top-8 row space of its task matrix (a random 8-dim subspace: 5.1 %;
    mini8's full experts: 24 %). The eight row spaces being nearly orthogonal, the objective sees
    almost no interference in the sum of the task vectors, its start (Adam moves it by 16 % of its
    norm, 35 % on mini8; the objective's exact least-squares minimizer, a diagnostic, scores 47.7),
    while on the actual inputs that sum interferes: on the block weights it scores 28.2 (54.7 on
    mini8); the LoRA updates are also larger (mean |tau| 0.0043 against 0.0016 on mini8).
    """
    theta0 = ctx.pretrained_weights
    optimized = [k for k, v in theta0.items() if (is_block_linear_weight(k) if others == "pretrained" else v.dim() == 2)]
    merged, final_loss = Weights(), {}
    for key, theta0_k, experts in ctx.progress(ctx.per_tensor(), total=len(theta0), desc="WUDI (per tensor)"):
        # one layer at a time: its task matrices, then Adam
        if key in optimized:
            result, losses = wudi_optimize(*wudi_terms(e - theta0_k for e in experts), steps, lr)
            shape = "x".join(map(str, theta0_k.shape))
            final_loss[shape] = final_loss.get(shape, 0.0) + losses[-1]
            merged[key] = result.to(theta0_k.dtype).add_(theta0_k)
        elif others == "pretrained":
            merged[key] = theta0_k
        else:
            merged[key] = reduce(torch.Tensor.add_, (e - theta0_k for e in experts)).div_(len(experts)).add_(theta0_k)
    for shape, loss in final_loss.items():   # summed over the layers of one shape
        ctx.log(f"wudi_loss/{shape}", loss)
    return ctx.shared_model(merged)
