"""TIES-Merging: trim, elect sign, disjoint merge."""

from __future__ import annotations

from typing import Literal

import torch

from mergebench.registry import Paper, register_method
from mergebench.weights import Weights, stack

TIES = Paper("TIES-Merging: Resolving Interference When Merging Models", 2023, "2306.01708", "NeurIPS",
             "https://github.com/prateeky2806/ties-merging")


def trim_top_k(vectors: torch.Tensor, k: float) -> torch.Tensor:
    """Keep each row's entries with |v| >= its ``(n - int(n * k / 100))``-th smallest magnitude, zero the rest.

    This is the official ``topk_values_mask`` (prateeky2806/ties-merging ``src/utils/merge_utils.py``, copied by
    fusion_bench): the threshold rank keeps ``int(n * k / 100) + 1`` entries (plus ties), at least one; k=100 keeps
    all (where the official ``kthvalue(0)`` would raise).
    """
    n = vectors.shape[1]
    rank = n - int(n * k / 100)
    if rank < 1:
        return vectors.clone()
    threshold = vectors.abs().kthvalue(rank, dim=1, keepdim=True).values
    return vectors * (vectors.abs() >= threshold)


def elect_sign(trimmed: torch.Tensor) -> torch.Tensor:
    """sgn(sum_t trimmed_t), with zeros resolved to the sign of the total mass (official code)."""
    sign = trimmed.sum(0).sign()
    majority = sign.sum().sign()
    return sign.where(sign != 0, majority)


def disjoint_merge(trimmed: torch.Tensor, sign: torch.Tensor, merge: str = "sum") -> torch.Tensor:
    """Combine only the entries that agree with the elected sign (sgn(v) == sign and v != 0, i.e. v * sign > 0):
    their sum or their mean."""
    selected = sign_agreeing(trimmed, sign)
    if merge == "sum":
        return selected.sum(0)
    return selected.sum(0) / (selected != 0).sum(0).clamp(min=1)


def sign_agreeing(trimmed: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Each row's entries that are nonzero and agree with the elected sign (the rest zeroed)."""
    return trimmed.where(trimmed * sign > 0, 0.0)


def ties_task_vectors(task_vectors: list[Weights], k: float = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Trimmed task vectors (rows) that agree with the elected sign; shared by TIES and AdaMerging++."""
    flat = torch.stack([tv.flatten() for tv in task_vectors])
    trimmed = trim_top_k(flat, k)
    sign = elect_sign(trimmed)
    return sign_agreeing(trimmed, sign), sign


@register_method("ties_merging", display_name="TIES-Merging", family="data-free", paper=TIES,
                 defaults_source="k=20 and merge='sum' with scaling 0.3: the ViT-B/32 setting of the AdaMerging "
                                 "repository (main_ties_merging.py) and fusion_bench; the TIES paper's 'dis-mean' "
                                 "is available as merge='mean' (then tune scaling near 1)",
                 hyperparameter_help={"k": "percent of each task vector kept (by magnitude, over the whole model)",
                                      "scaling": "lambda applied to the merged task vector",
                                      "merge": "disjoint 'sum' or 'mean' of sign-agreeing entries"},
                 ranges={"k": "(0, 100]", "scaling": "[0, inf)"})
def ties_merging(ctx, k: float = 20.0, scaling: float = 0.3, merge: Literal["sum", "mean"] = "sum"):
    """theta = theta_0 + lambda * disjoint_merge(elect_sign(trim_k(tau_1..tau_T))).

    Trimming keeps the top-k % of each task vector over the whole flattened model, as the official
    implementation does (not per layer). The context streams the stacked task vectors one tensor at a time,
    with each task's threshold and the elected sign's whole-model majority computed in passes of their own.
    """
    task_vectors = stack(list(ctx.task_vectors().values()))   # [T, n]
    trimmed = trim_top_k(task_vectors, k)
    sign = elect_sign(trimmed)
    return ctx.shared_model(ctx.pretrained_weights + scaling * disjoint_merge(trimmed, sign, merge))
