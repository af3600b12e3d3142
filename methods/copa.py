"""CoPA-Merging (Zeng et al., 2025; later titled RobustMerge): merging LoRA experts as LoRA factors.

Paper: "Parameter-Efficient Merging for Multimodal Large Language Models with Complementary
Parameter Adaptation", arXiv 2502.17159 (v2 onwards: "RobustMerge: Parameter-Efficient Model
Merging for MLLMs with Direction Robustness", NeurIPS 2025). Official code:
github.com/AuroraZengfh/RobustMerge, ``llava/model/builder.py::load_and_merge_pretrained_model``
(the first commit labels the block "CoPA-Merging"; later commits only rename it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mergebench.api.lora import LoraFactor, lora_delta
from mergebench.api.registry import Paper, register_method

COPA = Paper("Parameter-Efficient Merging for Multimodal Large Language Models with Complementary Parameter "
             "Adaptation (RobustMerge)", 2025, "2502.17159", "NeurIPS", "https://github.com/AuroraZengfh/RobustMerge")

NO_LORA = "CoPA-Merging needs LoRA experts; run on mini8-lora or give PEFT adapters"

DEFAULTS_SOURCE = (
    "official code (AuroraZengfh/RobustMerge, llava/model/builder.py): mask_ratio 0.2 (each LoRA matrix keeps "
    "its entries with |w| >= the int(0.8 n)-th smallest magnitude, i.e. the top 20 %), att_ratio 0.2 (the "
    "per-rank scales are raised to their 80th percentile over the rank), fuse_weight 2.0 on both merged "
    "factors; the same values in every commit of the repository")

HELP = {
    "keep": "fraction of each task's lora_A / lora_B entries kept by magnitude (official mask_ratio 0.2)",
    "floor_quantile": "each task's per-rank scales are clamped from below at this quantile over the rank "
                      "(official clamp(s, 1 - att_ratio) with att_ratio 0.2)",
    "fuse_weight": "multiplies both merged factors, so the merged delta by its square (official 2.0)",
}


def trim_magnitude(stacked: Tensor, keep: float) -> Tensor:
    """Mask of each row's entries with |w| >= its int(n * (1 - keep))-th smallest magnitude (official rule).

    The same threshold rank as ``ties.trim_top_k`` (one entry more than top-``keep``), with ``keep`` a fraction.
    """
    n = stacked.shape[1]
    k = int(n * (1 - keep))
    if k < 1:
        return torch.ones_like(stacked, dtype=torch.bool)
    threshold = stacked.abs().kthvalue(k, dim=1, keepdim=True).values
    return stacked.abs() >= threshold


def rank_scales(A: Tensor, A_kept: Tensor, floor_quantile: float) -> Tensor:
    """(T, r) complementary scales: sum|A row| / sum|kept A row|, clamped from below per task.

    The official ``clamp(x, 1 - att_ratio, 0)`` sorts each task's r scales and clamps to
    [sorted[int(r * floor_quantile)], max]. A row with nothing kept (0 in the denominator) would
    give inf / nan in the official code; here it takes the task's largest finite scale.
    """
    s = A.abs().sum(-1) / A_kept.abs().sum(-1)
    finite = torch.isfinite(s)
    largest = torch.where(finite, s, torch.zeros_like(s)).amax(-1, keepdim=True).clamp(min=1.0)
    s = torch.where(finite, s, largest)
    r = s.shape[1]
    ordered = s.sort(dim=1).values
    low, high = ordered[:, int(r * floor_quantile)].unsqueeze(1), ordered[:, -1].unsqueeze(1)
    return torch.clamp(s, low, high)


def copa_merge_factors(factors: list[LoraFactor], keep: float = 0.2, floor_quantile: float = 0.8,
                       fuse_weight: float = 2.0) -> LoraFactor:
    """One module's CoPA merge of T adapters (equal rank): a LoRA factor with the same rank.

    A_m = w * sum_t mask(A_t) * A_t;  B_m = w * sum_t s_t * (mask(B_t) * B_t) / sum_t s_t  (s_t scales B_t's
    columns). Each task's LoRA scaling (alpha / r) is folded into its B first, which leaves the
    magnitude masks and the scales unchanged; the merged factor has scaling 1.
    """
    ranks = {f.rank for f in factors}
    if len(ranks) != 1:
        raise ValueError(f"CoPA-Merging merges adapters of equal rank (the official code stacks them); "
                         f"{factors[0].target} has ranks {sorted(ranks)}")
    A = torch.stack([f.A for f in factors])                      # (T, r, in)
    B = torch.stack([f.B * f.scale for f in factors])            # (T, out, r)
    T = len(factors)
    mask_A = trim_magnitude(A.reshape(T, -1), keep).reshape(A.shape)
    mask_B = trim_magnitude(B.reshape(T, -1), keep).reshape(B.shape)
    A_kept, B_kept = A * mask_A, B * mask_B
    s = rank_scales(A, A_kept, floor_quantile)                   # (T, r)
    merged_A = fuse_weight * A_kept.sum(0)
    merged_B = (fuse_weight * s.unsqueeze(1) * B_kept).sum(0) / s.sum(0)
    return LoraFactor(factors[0].target, merged_A, merged_B, 1.0, factors[0].rows)


@register_method("copa_merging", display_name="CoPA-Merging", paper=COPA, needs="nothing", family="LoRA merging",
                 requires=("lora",), defaults_source=DEFAULTS_SOURCE, hyperparameter_help=HELP,
                 ranges={"keep": "(0, 1]", "floor_quantile": "[0, 1]", "fuse_weight": "[0, inf)"})
def copa_merging(ctx, keep: float = 0.2, floor_quantile: float = 0.8, fuse_weight: float = 2.0):
    """CoPA-Merging: training-free merging of LoRA experts in their low-rank factors.

    Per adapted module, each task's ``lora_A`` and ``lora_B`` are pruned to their largest-magnitude
    ``keep`` fraction. *Complementary parameter adaptation*: each rank direction i of task t gets
    the scale s_t[i] = ||A_t[i, :]||_1 / ||pruned A_t[i, :]||_1 (how much of that direction the
    pruning removed), raised to the task's ``floor_quantile`` value over the rank so that the gap
    between strong and weak directions (the stark singular values the paper analyses) shrinks.
    *Cross-task normalization*: the merged ``B`` is the s-weighted mean of the pruned ``B_t``
    column by column, ``sum_t s_t B_t / sum_t s_t``; the merged ``A`` is the sum of the pruned
    ``A_t``; both are multiplied by ``fuse_weight``. The merged encoder is
    ``theta_0 + B_m @ A_m`` on every adapted matrix, plus the mean of any non-LoRA change of
    the experts (the official code averages the non-LoRA trainables, there the LLaVA projector;
    on mini8-lora and PEFT experts it is zero).

    Where mergebench differs from the official code: adapters on the fused ``in_proj_weight`` of
    open_clip are one module (HF q/k/v adapters stay three, as PEFT saves them); each task's LoRA
    scaling is folded into its ``B`` (identical to the official result when all tasks share
    alpha / r, and defined when they do not); a rank direction that pruning empties gets its task's
    largest finite scale instead of inf. The singular-value analysis of the paper motivates the
    scales; as in the official code, no SVD is computed. Runs only on LoRA experts
    (``mini8-lora``, ``micro-lora``, PEFT adapters in a real-suite manifest).

    Defaults on vision LoRA experts: ``keep`` 0.2, ``floor_quantile`` 0.8 and ``fuse_weight`` 2.0 are
    constants of the official merge (``mask_ratio``, ``att_ratio``, ``fuse_weight`` in
    ``llava/model/builder.py``, the same in every commit), written for LLaVA's LoRA adapters (the
    repository's example is llava-v1.5-7b). ``keep`` and ``floor_quantile`` are relative (a fraction of each
    matrix's entries, a quantile over its rank), so they carry over to any adapter shape as they
    are. ``fuse_weight`` is an absolute gain (the merged update times 4) that nothing in the paper
    or code derives from the adapters; it is kept at the official value, untested on vision
    adapters. The LoRA scale alpha / r = 2 of mini8-lora is LLaVA's convention (r 128, alpha 256).

    On mini8-lora CoPA-Merging scores 57.1, below the pretrained model (59.2), and that is what
    the method does there: the official merge loop (``builder.py``, run on the same adapters)
    gives the same merged update (relative difference 1e-7) and the same accuracy. The merge sums
    the A factors over tasks and averages the B factors, so its update, sum_s sum_t c_s B_s A_t,
    holds every cross product B_s A_t (s != t); such a product is a task's update only where the
    tasks' A factors share a row space. mini8-lora's adapters are initialized per task (their own
    seeds), and training keeps their A row spaces apart: the mean overlap of two tasks' A row
    spaces (||Q_s^T Q_t||_F^2 / r) is 0.061, chance level for r / in = 8 / 128 = 0.0625, and the
    cross products are 92 % of the norm of the merged update (means over the 24 adapted
    matrices).
    """
    if not ctx.has_lora_experts:
        raise ValueError(NO_LORA)
    per_task = {t: ctx.lora_factors(t) for t in ctx.tasks}
    names = list(per_task[ctx.tasks[0]])
    for t, factors in per_task.items():
        if set(factors) != set(names):
            diff = sorted(set(factors) ^ set(names))
            raise ValueError(f"CoPA-Merging merges the same adapted modules of every expert; {t!r} differs from "
                             f"{ctx.tasks[0]!r} in {diff[:3]}")
    merged = {n: copa_merge_factors([per_task[t][n] for t in ctx.tasks], keep, floor_quantile, fuse_weight)
              for n in names}
    pretrained = ctx.pretrained_weights
    # what the experts changed beyond their adapters (zero for pure LoRA experts) is averaged, as the official code
    residual = sum(ctx.task_vector(t) - lora_delta(per_task[t], pretrained) for t in ctx.tasks) / len(ctx.tasks)
    return ctx.shared_model(pretrained + lora_delta(merged, pretrained) + residual)
