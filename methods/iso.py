"""Iso-C and Iso-CTS: isotropic merging (flattened spectrum of the merged task matrix, common + task subspaces)."""

from __future__ import annotations

import torch

from mergebench.api.linalg import polar, polar_and_singular_values, svd, top_singular
from mergebench.api.registry import Paper, register_method
from mergebench.api.shape_batches import same_shape_batches
from mergebench.api.weights import Weights

ISO = Paper("No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces", 2025,
            "2502.04959", "ICML", "https://github.com/danielm1405/iso-merging")


def iso_c_matrix(task_matrices: torch.Tensor) -> torch.Tensor:
    """Iso-C for one layer: Delta = sum_t T_t = U S V^T -> mean(S) U V^T (every singular value equal).
    ``[T, m, n]`` -> ``[m, n]``, or ``[..., T, m, n]`` -> ``[..., m, n]`` (same-shaped layers at once)."""
    rotation, s = polar_and_singular_values(task_matrices.float().sum(-3))    # U V^T and S
    return s.mean(-1)[..., None, None] * rotation


def iso_cts_matrix(task_matrices: torch.Tensor, common_fraction: float = 0.8) -> torch.Tensor:
    """Iso-CTS for one layer: the top k_c directions of the sum (common space) plus, per task, the top s
    directions of its component orthogonal to the common space; bases orthogonalized, spectrum flattened.
    ``[T, m, n]`` -> ``[m, n]``, or ``[..., T, m, n]`` -> ``[..., m, n]`` (same-shaped layers at once).
    """
    t = task_matrices.float()
    *batch, num, m, n = t.shape
    total = t.sum(-3)
    u, s, vh = svd(total)
    r = s.shape[-1]
    k_c = int(r * common_fraction)
    per_task = round((r - k_c) / num)
    k_c = r - per_task * num
    us, ss, vhs = [u[..., :k_c]], [s[..., :k_c]], [vh[..., :k_c, :]]
    if per_task > 0:
        uc = u[..., None, :, :k_c]                              # [..., 1, m, k_c]: the same for every task
        residual = t - uc @ (uc.mT @ t)                         # remove the common space (left side), batched
        ut, st, vht = top_singular(residual, per_task)
        us = [ut.transpose(-3, -2).reshape(*batch, m, num * per_task)] + us
        ss = [st.reshape(*batch, num * per_task)] + ss
        vhs = [vht.reshape(*batch, num * per_task, n)] + vhs
    u_all, s_all, vh_all = torch.cat(us, -1), torch.cat(ss, -1), torch.cat(vhs, -2)
    return s_all.mean(-1)[..., None, None] * (polar(u_all) @ polar(vh_all))


def _iso(ctx, scaling: float, layer_fn) -> Weights:
    theta0 = ctx.pretrained_weights
    merged = {}
    for keys, stacks in same_shape_batches(ctx.task_vector_stacks()):   # [layers of one shape, T, *shape]
        delta = layer_fn(stacks).to(stacks.dtype) if stacks.dim() == 4 else stacks.mean(1)
        merged.update({key: (d * scaling).add_(theta0[key]) for key, d in zip(keys, delta)})
    return ctx.shared_model(Weights({key: merged[key] for key in theta0}))


ISO_DEFAULTS = ("scaling 1.5: fusion_bench's documented ViT-B/32 setting for Iso-C and Iso-CTS (the official code "
                "selects alpha on val over 0.1..3.0; fusion_bench's config default is 1.0)")


@register_method("iso_c", display_name="Iso-C", family="data-free", paper=ISO, defaults_source=ISO_DEFAULTS,
                 hyperparameter_help={"scaling": "alpha in theta_0 + alpha * Delta_iso"},
                 ranges={"scaling": "[0, inf)"})
def iso_c(ctx, scaling: float = 1.5):
    """Per 2-D weight: Delta = sum_t tau_t, Delta_iso = mean(sigma) U V^T; other tensors: mean tau.

    theta = theta_0 + alpha * Delta_iso. The sum (not the mean) is flattened, as in the official code, so the
    paper's alpha applies. An SVD that fails to converge is retried in float64, then with the gesvd algorithm
    (``mergebench.api.linalg.svd``) instead of failing the run.
    """
    return _iso(ctx, scaling, iso_c_matrix)


@register_method("iso_cts", display_name="Iso-CTS", family="data-free", paper=ISO,
                 defaults_source=ISO_DEFAULTS + "; common_fraction 0.8: official config/method/iso_cts.yaml",
                 hyperparameter_help={"scaling": "alpha in theta_0 + alpha * Delta",
                                      "common_fraction": "share of the rank given to the common subspace"},
                 ranges={"scaling": "[0, inf)", "common_fraction": "[0, 1]"})
def iso_cts(ctx, scaling: float = 1.5, common_fraction: float = 0.8):
    """Iso-CTS: common subspace (top 80% of the rank of sum_t tau_t) + task-specific subspaces (the rest, split
    equally: each task's top directions orthogonal to the common space), orthogonalized, with a flat spectrum.

    Per 2-D weight; other tensors take the mean task vector. theta = theta_0 + alpha * Delta.

    On LoRA experts (mini8-lora) Iso-CTS scores 70.9, 2.6 below Task Arithmetic (6.0 above it on
    mini8's fully fine-tuned experts, where the official code and fusion_bench give the same weights,
    relative difference 5e-6, and the same 78.5). On rank-8 updates its construction is not
    determined by the task vectors: the sum of the eight has rank at most 64, below the common
    space's k_c = 104 of 128 directions, so the common space already holds every task's directions
    (and 40 of its 104 directions have singular value 0, their vectors LAPACK's arbitrary
    completion), and what is left of a task after removing it is rounding noise (relative norm
    9e-7, against 0.27 on mini8). The task-specific subspaces are that noise's singular vectors, and
    the flat spectrum gives every one of the 128 directions the same weight. Its gain over Iso-C
    (+4.3 on mini8) turns to -2.7 here (Iso-C: 73.6). The result also follows
    floating-point rounding: the official code (``src/utils/iso.py``) and fusion_bench's (identical
    to each other, 70.5), which compute the same projection in another order, differ from
    mergebench's by 0.62 in relative weight; redrawing the singular-value-0 vectors (equally valid
    SVDs) gives 71.1 to 71.7.
    """
    return _iso(ctx, scaling, lambda t: iso_cts_matrix(t, common_fraction))
