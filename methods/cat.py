"""CAT Merging: training-free conflict trimming (projection for linear weights, masking for norm parameters)."""

from __future__ import annotations

import torch

from mergebench.activations import as_matrix, from_matrix, gram, lockstep_sites, sq_norms
from mergebench.models import freeze
from mergebench.registry import Paper, register_method

CAT = Paper("CAT Merging: A Training-Free Approach for Resolving Conflicts in Model Merging", 2025, "2505.06977",
            "ICML", "https://github.com/SunWenJu123/model-merging")


def cat_linear_bases(task_matrices: torch.Tensor, grams: torch.Tensor, lam: float, c: int) -> list[torch.Tensor]:
    """B_k (``[out, c]``, orthonormal columns) for each task k.

    B_k spans the top-c eigenvectors of
    M_k = sum_{i != k} T_i (G_k - lam G_i) T_i^T: the output directions in which the other tasks' vectors
    change task k's features most while carrying little of their own tasks' knowledge. Torch [out, in] layout.
    """
    # the products in float32 (they dominate the cost), the eigendecomposition in float64
    t = task_matrices.float()
    g = grams.float()
    own = t @ g @ t.transpose(1, 2)                             # T_i G_i T_i^T  [K, out, out]
    own_sum = own.sum(0)
    bases = []
    for k in range(len(t)):
        others = [i for i in range(len(t)) if i != k]
        cross = (t[others] @ g[k] @ t[others].transpose(1, 2)).sum(0)
        m = (cross - lam * (own_sum - own[k])).double()
        evals, evecs = torch.linalg.eigh((m + m.t()) / 2)
        bases.append(evecs[:, evals.argsort(descending=True)[:c]])
    return bases


def cat_project(task_matrices: torch.Tensor, bases: list[torch.Tensor]) -> torch.Tensor:
    """T_i <- (I - B_k B_k^T) T_i for every k != i, applied in task order."""
    out = task_matrices.to(torch.float64).clone()
    for k, b in enumerate(bases):
        if b.shape[1] == 0:
            continue
        others = [i for i in range(len(out)) if i != k]
        out[others] -= b @ (b.t() @ out[others])
    return out


def rescale_to_norms(projected: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Each projected task matrix ``[K, ...]`` scaled back to its original Frobenius norm (a zero one stays zero)."""
    dims = tuple(range(1, original.dim()))
    before = original.to(projected.dtype).norm(dim=dims, keepdim=True)
    after = projected.norm(dim=dims, keepdim=True)
    return projected * torch.where(after > 0, before / after.clamp_min(torch.finfo(after.dtype).tiny), 1.0)


def cat_mask(values: torch.Tensor, scores_in: torch.Tensor | None, lam: float, c: int) -> torch.Tensor:
    """Elementwise parameters (LN scale or shift, linear biases) ``[K, d]``: zero, for each k, the top-c dims
    of the others.

    The score of dim j for task k is sum_{i != k} (s_kj - lam s_ij) T_ij^2, s the mean squared input of the
    parameter (the normalized LN input for the scale; 1 for a shift or bias, whose input is constant). The c
    dims of highest score are masked, whatever its sign.
    """
    v = values.to(torch.float64)
    s = torch.ones_like(v) if scores_in is None else scores_in.to(torch.float64)
    keep = torch.ones_like(v, dtype=torch.bool)
    for k in range(len(v)):
        others = [i for i in range(len(v)) if i != k]
        score = ((s[k] - lam * s[others]) * v[others] ** 2).sum(0)
        top = score.argsort(descending=True)[:c]
        keep[torch.tensor(others)[:, None], top[None, :]] = False
    return v * keep


@register_method(
    "cat_merging", display_name="CAT Merging", family="data-based closed form", paper=CAT, needs="unlabeled",
    defaults_source="lambda 5, lambda_ln 10, c (rank) 4, scaling 0.4 and 2 exemplars per task, features taken on "
                    "theta_0 + scaling * tau_k and each projected task vector rescaled to its norm: reported from the "
                    "official code (SunWenJu123/model-merging), which could not be read here (UNVERIFIED); the "
                    "earlier values came from a third-party port (ZeroNLP/RCP-Merging baselines/catmerge)",
    hyperparameter_help={"scaling": "Task Arithmetic coefficient applied to the sum of trimmed task vectors; also "
                                    "the coefficient of the per-task models theta_0 + scaling * tau_k that give the "
                                    "features",
                         "lam": "linear weights: trade-off between removed interference and kept own-task knowledge",
                         "lam_ln": "the same trade-off for the elementwise parameters (norm scales and shifts, "
                                   "linear biases)",
                         "c": "directions (linear weights) or dims (elementwise parameters) removed per task and "
                              "layer",
                         "n_exemplars": "unlabeled training images per task"},
    paper_budget={"n_exemplars": 2},
    ranges={"scaling": "[0, inf)", "lam": "[0, inf)", "lam_ln": "[0, inf)", "c": "[1, inf)", "n_exemplars": "[1, inf)"})
def cat_merging(ctx, scaling: float = 0.4, lam: float = 5.0, lam_ln: float = 10.0, c: int = 4,
                n_exemplars: int = 2):
    """theta = theta_0 + lambda * sum_i Phi(T_i): Task Arithmetic on conflict-trimmed task vectors.

    Features: for each task k the model theta_0 + lambda tau_k runs on ``n_exemplars`` of task k's training
    images. For every linear map (conv1 as a linear map on patches, the four linear maps of each block, proj) and
    each task k, B_k = the top-c eigenvectors of M_k = sum_{i != k} T_i (G_k - lam G_i) T_i^T ([out, out], torch
    layout), G the Gram matrices of the layer's inputs; each other task's vector is projected off them,
    T_i <- (I - B_k B_k^T) T_i, and then rescaled to its original norm. For the elementwise parameters (LayerNorm
    scales; LayerNorm shifts and linear biases, whose input is the constant 1) the top-c dims by
    sum_{i != k} (s_kj - lam_ln s_ij) T_ij^2 are masked in the other tasks' vectors. Embeddings (class token,
    positional embedding) are not trimmed. One layer is processed at a time.

    Not checked against the official code (it could not be read here): the per-token mean Gram matrices (the tasks
    are weighted equally), that exactly c directions / dims are removed whatever the sign of their objective
    (with lam_ln > 1 the shift and bias scores are all negative, so a positive-only rule would never mask them),
    that linear biases are masked like the shifts with lam_ln, and that the norm is restored per task matrix.
    """
    tvs = list(ctx.task_vectors().values())
    theta0 = ctx.pretrained_weights
    encoders = [freeze(ctx.encoder(theta0 + scaling * tv)) for tv in tvs]
    images = [ctx.exemplars(task, n=n_exemplars, split="train") for task in ctx.tasks]
    trimmed = [tv.map(lambda k, v: v.clone()) for tv in tvs]

    def mask_elementwise(key, scores_in):
        masked = cat_mask(torch.stack([tv[key] for tv in tvs]), scores_in, lam_ln, c)
        for tr, m in zip(trimmed, masked):
            tr[key] = m.to(tvs[0][key].dtype)

    for sites in lockstep_sites(encoders, images):
        key, bias = sites[0].weight, sites[0].bias
        if sites[0].kind == "linear":
            t = torch.stack([as_matrix(key, tv[key]) for tv in tvs])
            g = torch.stack([gram(s.inputs) for s in sites])
            projected = rescale_to_norms(cat_project(t, cat_linear_bases(t, g, lam, c)), t)
            for tr, p in zip(trimmed, projected):
                tr[key] = from_matrix(key, p, tvs[0][key])
        else:
            mask_elementwise(key, torch.stack([sq_norms(s.inputs) for s in sites]))
        if bias is not None:
            mask_elementwise(bias, None)
    return ctx.shared_model(theta0 + scaling * sum(trimmed))
