"""CAT Merging: training-free conflict trimming (projection for linear weights, masking for norm parameters)."""

from __future__ import annotations

import torch

from mergebench.methods.activations import as_matrix, expert_sites, from_matrix, gram, sq_norms
from mergebench.registry import Paper, register_method

CAT = Paper("CAT Merging: A Training-Free Approach for Resolving Conflicts in Model Merging", 2025, "2505.06977",
            "ICML", "https://github.com/SunWenJu123/model-merging")


def cat_linear_bases(task_matrices: torch.Tensor, grams: torch.Tensor, lam: float, c: int) -> list[torch.Tensor]:
    """B_k (``[out, <=c]``, orthonormal columns) for each task k.

    B_k spans the top eigenvectors (positive eigenvalues only) of
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
        top = evals.argsort(descending=True)[:c]
        bases.append(evecs[:, top[evals[top] > 0]])
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


def cat_mask(values: torch.Tensor, scores_in: torch.Tensor | None, lam: float, c: int) -> torch.Tensor:
    """Elementwise parameters (LN scale or shift) ``[K, d]``: zero, for each k, the top-c dims of the others.

    The score of dim j for task k is sum_{i != k} (s_kj - lam s_ij) T_ij^2, s the mean squared input of the
    parameter (the normalized LN input for the scale; 1 for the shift, whose input is constant). Only dims
    with a positive score are masked.
    """
    v = values.to(torch.float64)
    s = torch.ones_like(v) if scores_in is None else scores_in.to(torch.float64)
    keep = torch.ones_like(v, dtype=torch.bool)
    for k in range(len(v)):
        others = [i for i in range(len(v)) if i != k]
        score = ((s[k] - lam * s[others]) * v[others] ** 2).sum(0)
        top = score.argsort(descending=True)[:c]
        top = top[score[top] > 0]
        keep[torch.tensor(others)[:, None], top[None, :]] = False
    return v * keep


@register_method(
    "cat_merging", display_name="CAT Merging", family="data-based closed form", paper=CAT, needs="unlabeled",
    defaults_source="UNVERIFIED (the official code was unavailable): lam 1.0 and c 3 come from a third-party port "
                    "(ZeroNLP/RCP-Merging baselines/catmerge), scaling 0.3 is Task Arithmetic's ViT-B/32 value (CAT "
                    "ends with Task Arithmetic on the trimmed vectors), 5 exemplars per task is the port's value "
                    "('a few exemplars' in the paper)",
    hyperparameter_help={"scaling": "Task Arithmetic coefficient applied to the sum of trimmed task vectors",
                         "lam": "trade-off between removed interference and kept own-task knowledge",
                         "c": "directions (linear weights) or dims (norm parameters) removed per task and layer",
                         "n_exemplars": "unlabeled training images per task run through its expert"})
def cat_merging(ctx, scaling: float = 0.3, lam: float = 1.0, c: int = 3, n_exemplars: int = 5):
    """theta = theta_0 + lambda * sum_i Phi(T_i): Task Arithmetic on conflict-trimmed task vectors.

    For every linear map (conv1 as a linear map on patches, the four linear maps of each block, proj) and each
    task k, B_k = the top-c eigenvectors of M_k = sum_{i != k} T_i (G_k - lam G_i) T_i^T ([out, out], torch
    layout), G the Gram matrices of the layer's inputs when each expert runs on its own task's exemplars; each
    other task's vector is projected off them, T_i <- (I - B_k B_k^T) T_i. For LayerNorm scales (and shifts,
    whose input is the constant 1) the top-c dims by sum_{i != k} (s_kj - lam s_ij) T_ij^2 are masked in the other
    tasks' vectors. Linear biases and embeddings are not trimmed. One layer is processed at a time.

    Deviations: the Gram matrices are per-token means (the tasks are weighted equally); only eigen-directions and
    dims with a positive objective are removed.
    """
    tvs = list(ctx.task_vectors().values())
    trimmed = [tv.map(lambda k, v: v.clone()) for tv in tvs]
    for sites in expert_sites(ctx, n_exemplars, "train"):
        key = sites[0].weight
        if sites[0].kind == "linear":
            t = torch.stack([as_matrix(key, tv[key]) for tv in tvs])
            g = torch.stack([gram(s.inputs) for s in sites])
            projected = cat_project(t, cat_linear_bases(t, g, lam, c))
            for tr, p in zip(trimmed, projected):
                tr[key] = from_matrix(key, p, tvs[0][key])
        else:
            sq = torch.stack([sq_norms(s.inputs) for s in sites])
            masked = cat_mask(torch.stack([tv[key] for tv in tvs]), sq, lam, c)
            bias = sites[0].bias
            masked_b = cat_mask(torch.stack([tv[bias] for tv in tvs]), None, lam, c)
            for tr, m, mb in zip(trimmed, masked, masked_b):
                tr[key], tr[bias] = m.to(tvs[0][key].dtype), mb.to(tvs[0][bias].dtype)
    return ctx.shared_model(ctx.pretrained_weights + scaling * sum(trimmed))
