"""Model Breadcrumbs (Davari & Belilovsky, ECCV 2024, arXiv 2312.06795).

Each task vector is sparsified before task arithmetic: in every tensor, along its last dimension
(each output row of a weight matrix), the largest-magnitude entries are masked out as outliers
and, of the rest, only the largest ``keep`` fraction is kept, so small perturbations are masked
out too. The merged model is ``theta_0 + scaling * sum_t (m_t * tau_t)``.

This follows the authors' code (github.com/rezazzr/breadcrumbs, ``TaskVectorMiddleKeep`` with
``remove_first=True``): counts are ``int(fraction * last_dim)`` per row, the outliers are removed
first and ``keep`` is a fraction of the row; 0-d tensors are left as they are.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mergebench import Paper, register_method

PAPER = Paper("Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks", 2024, "2312.06795",
              "ECCV", "https://github.com/rezazzr/breadcrumbs")


def breadcrumb_mask(tau: Tensor, top_remove: float, keep: float) -> Tensor:
    """Boolean mask of the entries kept: per row (last dim), drop the top ``top_remove`` fraction by
    magnitude, then keep the ``keep`` fraction of largest magnitude among what remains."""
    if tau.dim() == 0:
        return torch.ones_like(tau, dtype=torch.bool)
    n = tau.shape[-1]
    magnitude = tau.abs()
    mask = torch.ones_like(tau, dtype=torch.bool)
    n_remove = int(n * top_remove)
    if n_remove > 0:
        mask.scatter_(-1, magnitude.topk(n_remove, dim=-1).indices, False)
    n_keep = int(n * keep)
    kept = torch.zeros_like(mask)
    if n_keep > 0:
        remaining = torch.where(mask, magnitude, torch.zeros_like(magnitude))
        kept.scatter_(-1, remaining.topk(n_keep, dim=-1).indices, True)
    return kept & mask


@register_method(
    "model_breadcrumbs", display_name="Model Breadcrumbs", needs="nothing", paper=PAPER, family="data-free",
    defaults_source="keep 10% of each row after masking its top 1% (beta=0.9 sparsity, gamma=0.99 percentile) and "
                    "scaling 0.4: the Model Breadcrumbs configuration of Microsoft's mttl library; the paper "
                    "selects them on validation data and reports that they carry over as tasks are added",
    hyperparameter_help={"top_remove": "fraction of each row's largest-magnitude entries masked out (gamma)",
                         "keep": "fraction of each row kept among the rest, largest magnitudes first (1 - beta)",
                         "scaling": "alpha in theta_0 + alpha * sum_t (m_t * tau_t)"})
def model_breadcrumbs(ctx, top_remove: float = 0.01, keep: float = 0.1, scaling: float = 0.4):
    """theta_0 + alpha * sum_t (m_t * tau_t), where m_t masks the outliers and the small entries of each row of tau_t."""
    if not (0.0 <= top_remove < 1.0 and 0.0 < keep <= 1.0):
        raise ValueError(f"need 0 <= top_remove < 1 and 0 < keep <= 1, got top_remove={top_remove}, keep={keep}")
    merged = ctx.pretrained_weights
    for task in ctx.tasks:
        tau = ctx.task_vector(task)
        merged = merged + scaling * tau.map(lambda name, t: t * breadcrumb_mask(t, top_remove, keep))
    return ctx.shared_model(merged)
