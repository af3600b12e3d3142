"""LOT Merging: layer-wise closed-form minimization of the feature drift between the merged model and each expert."""

from __future__ import annotations

from typing import Literal

import torch

from mergebench.activations import as_matrix, expert_sites, from_matrix, gram, lot_linear, sq_norms
from mergebench.registry import Paper, register_method

LOT = Paper("Towards Minimizing Feature Drift in Model Merging: Layer-wise Task Vector Fusion for Adaptive "
            "Knowledge Integration", 2025, "2505.23859", "NeurIPS", "https://github.com/SunWenJu123/model-merging")


def lot_norm_scale(deltas: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
    """Per-dimension gamma* = sum_k s_kj dgamma_kj / sum_k s_kj with s_kj the (mean) squared normalized inputs."""
    sq = sq.to(torch.float64)
    den = sq.sum(0)
    merged = (sq * deltas.to(torch.float64)).sum(0) / den.clamp_min(torch.finfo(torch.float64).tiny)
    return torch.where(den > 0, merged, deltas.to(torch.float64).mean(0))


@register_method(
    "lot_merging", display_name="LOT Merging", family="data-based closed form", paper=LOT, needs="unlabeled",
    defaults_source="scaling 1.2 (the paper's ViT-B/32 value; 1.5 for ViT-L/14) and 64 unlabeled training exemplars "
                    "per task (the largest of the paper's 4/16/64); rtol 1e-8 and "
                    "io_layers='mean' (embeddings, final norm and head take the mean task vector, as the paper "
                    "describes) are this project's choices",
    hyperparameter_help={
        "scaling": "lambda in theta_0 + lambda * T*",
        "n_exemplars": "unlabeled training images per task run through its expert",
        "rtol": "eigenvalues of sum_k G_k below rtol * the largest are dropped in the pseudo-inverse",
        "io_layers": "'mean': conv1, ln_pre, ln_post and proj take the mean task vector (paper); "
                     "'closed_form': they are solved like the block layers (conv1 as a linear map on patches)",
    }, paper_budget={"n_exemplars": 64}, smoke={"n_exemplars": 8},
    ranges={"scaling": "[0, inf)", "n_exemplars": "[1, inf)", "rtol": "[0, inf)"})
def lot_merging(ctx, scaling: float = 1.2, n_exemplars: int = 64, rtol: float = 1e-8,
                io_layers: Literal["mean", "closed_form"] = "mean"):
    """theta = theta_0 + lambda * T*, T* minimizing each layer's feature drift to every expert in closed form.

    For each linear map of the residual blocks (attn in_proj, attn out_proj, mlp c_fc, mlp c_proj), with X_k the
    layer's inputs when expert k runs on ``n_exemplars`` unlabeled training images of task k (all tokens):
    T* = (sum_k T_k G_k)(sum_k G_k)^+, G_k = X_k^T X_k / N_k, T_k the expert's task matrix ([out, in]).
    For each LayerNorm scale, per dimension: gamma* = sum_k s_kj gamma_kj / sum_k s_kj, s_kj the mean squared
    normalized input of that LN in expert k. Biases, LN shifts, class/positional embeddings: the mean task vector.
    With io_layers='closed_form' the patch embedding (conv1 as a linear map on flattened patches), ln_pre,
    ln_post and the output projection proj (CLS token inputs) are solved in closed form as well.

    Layers are processed one at a time: the experts walk through the network in lock step (see
    ``mergebench.activations``), so only one layer's inputs are held. The pseudo-inverse is an
    eigendecomposition of sum_k G_k in float64 with a relative eigenvalue cutoff ``rtol``.

    Deviations: the Gram matrices are normalized by the token count (identical to the paper's sum when every
    task has the same number of exemplars, and balanced when a task has fewer images); the official code was not
    available, so the layer set and the handling of embeddings follow the paper's description.
    """
    tvs = list(ctx.task_vectors().values())
    delta = sum(tvs) / len(tvs)  # mean task vector: the closed form for biases, shifts and embeddings
    for sites in expert_sites(ctx, n_exemplars, "train"):
        site = sites[0]
        if site.group == "io" and io_layers == "mean":
            continue
        key = site.weight
        if site.kind == "linear":
            t = (as_matrix(key, tv[key]) for tv in tvs)
            g = (gram(s.inputs) for s in sites)  # lazily: one float64 Gram matrix alive at a time
            delta[key] = from_matrix(key, lot_linear(t, g, rtol), tvs[0][key])
        else:
            sq = torch.stack([sq_norms(s.inputs) for s in sites])
            delta[key] = lot_norm_scale(torch.stack([tv[key] for tv in tvs]), sq).to(tvs[0][key].dtype)
    return ctx.shared_model(ctx.pretrained_weights + scaling * delta)
