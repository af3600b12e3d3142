"""TIES-Merging: trim, elect sign, disjoint merge."""

from __future__ import annotations

from typing import Literal

import torch

from mergebench.registry import Paper, register_method
from mergebench.weights import Weights

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
    sign = torch.sign(trimmed.sum(0))
    majority = torch.sign(sign.sum())
    return torch.where(sign == 0, majority, sign)


def sign_agreeing(trimmed: torch.Tensor, sign: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Each row's entries that are nonzero and agree with the elected sign (the rest zeroed).

    That is sgn(v) == sign and v != 0, i.e. v * sign > 0 (sign is -1, 0 or 1); ``inplace`` zeroes the others in
    ``trimmed`` itself."""
    product = trimmed * sign
    if inplace:  # masked_fill_: multiplying by a bool mask would first convert it to a float copy
        return trimmed.masked_fill_(product.le_(0).bool(), 0.0)
    return torch.where(product > 0, trimmed, 0.0)


def disjoint_merge(trimmed: torch.Tensor, sign: torch.Tensor, merge: str = "sum", inplace: bool = False) -> torch.Tensor:
    """Combine only the entries that agree with the elected sign: their sum or their mean (``inplace``: the
    disagreeing entries of ``trimmed`` are zeroed in place)."""
    selected = sign_agreeing(trimmed, sign, inplace)
    if merge == "sum":
        return selected.sum(0)
    return selected.sum(0) / (selected != 0).sum(0).clamp(min=1)


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

    Trimming keeps the top-k % of each task vector over the whole flattened model, as the
    official implementation does (not per layer).

    Streamed (the same operations as ``trim_top_k``, ``elect_sign`` and ``disjoint_merge`` on the stacked,
    flattened task vectors, tensor by tensor): each task's threshold from its own flattened magnitudes, one task
    at a time; then one tensor across the tasks at a time. An entry whose trimmed values cancel exactly takes
    the sign of the whole model's sign mass (official), known only at the end: those few entries are completed
    then. Memory stays near the experts' own size.
    """
    thresholds = ties_thresholds(ctx, k)
    merged, pending, sign_mass = Weights(), [], 0
    for key, stacked in ctx.task_vector_stacks():
        if thresholds is not None:  # trim_top_k, in place
            stacked.masked_fill_(stacked.abs() < thresholds.view(-1, *[1] * (stacked.dim() - 1)), 0.0)
        trimmed = stacked
        sign = torch.sign(trimmed.sum(0))
        sign_mass += int(sign.sum().item())
        undecided = (sign == 0).logical_and_((trimmed != 0).any(0))   # exact cancellation: the majority decides
        if undecided.any():
            pending.append((key, undecided, trimmed[:, undecided].clone()))
        merged[key] = disjoint_merge(trimmed, sign, merge, inplace=True).mul_(scaling).add_(ctx.pretrained_weights[key])
    majority = torch.sign(torch.tensor(float(sign_mass)))
    for key, where, values in pending:
        completed = disjoint_merge(values, majority.to(values.device), merge)
        merged[key][where] = completed.mul_(scaling).add_(ctx.pretrained_weights[key][where])
    return ctx.shared_model(merged)


def ties_thresholds(ctx, k: float) -> torch.Tensor | None:
    """Per task, ``trim_top_k``'s threshold: the rank-(n - int(n k / 100)) smallest |tau_t| over the whole model,
    each task's magnitudes flattened in turn into one buffer (None: k keeps every entry)."""
    theta0 = ctx.pretrained_weights
    n = sum(v.numel() for v in theta0.values())
    rank = n - int(n * k / 100)
    if rank < 1:
        return None
    flat = torch.empty(n, device=ctx.device, dtype=next(iter(theta0.values())).dtype)
    out = []
    for task in ctx.tasks:
        start = 0
        for _, v, (expert,) in ctx.per_tensor(tasks=[task]):
            torch.sub(expert, v, out=flat[start:start + v.numel()].view_as(v))
            start += v.numel()
        out.append(kth_smallest_(flat.abs_(), rank))
    return torch.stack(out)


def kth_smallest_(values: torch.Tensor, rank: int) -> torch.Tensor:
    """The rank-th smallest entry (1-based) of a 1-D tensor, as ``kthvalue`` gives it, reordering ``values``.

    On the CPU numpy's in-place partition needs no extra memory; ``kthvalue`` copies the values and keeps
    int64 indices (three times the buffer), which at full model size is more than the experts' headroom.
    """
    if values.device.type != "cpu":
        return values.kthvalue(rank).values
    array = values.numpy()
    array.partition(rank - 1)
    return values.new_tensor(array[rank - 1])
