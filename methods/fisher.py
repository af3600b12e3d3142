"""Fisher merging: parameter averaging weighted by each expert's diagonal Fisher information."""

from __future__ import annotations

from typing import Literal

import torch
from torch.func import functional_call, grad, jacrev, vmap

from mergebench.api.registry import Paper, register_method
from mergebench.api.weights import Weights

FISHER = Paper("Merging Models with Fisher-Weighted Averaging", 2022, "2111.09832", "NeurIPS",
               "https://github.com/mmatena/model_merging")


def diagonal_fisher(encoder: torch.nn.Module, head: torch.nn.Module, images: torch.Tensor,
                    generator: torch.Generator | None, batch_size: int = 32, chunk_size: int = 8,
                    labels: torch.Tensor | None = None, exact: bool = False) -> Weights:
    """E_x E_{y ~ p(y|x)} (d log p(y|x) / d theta)^2 per parameter, from per-example gradients.

    With ``exact`` the inner expectation is computed exactly, sum_y p(y|x) (d log p(y|x) / d theta)^2 over all
    classes (one gradient per class: the official estimator, mmatena/model_merging ``fisher.py``
    ``_compute_exact_fisher_for_batch``); the class gradients of an example share its forward pass
    (``torch.func.jacrev``). Otherwise one label is sampled per example from the model's own predictive
    distribution (an unbiased but noisy estimate; with a confident model it rarely samples the classes whose
    gradients are large). With ``labels`` the true labels are used instead (the empirical Fisher). Per-example
    gradients come from ``torch.func.vmap``, so the squares are of single-example gradients, not of a
    batch-summed gradient.
    """
    params = {k: v.detach() for k, v in encoder.named_parameters()}

    def log_probs(p, x):
        return torch.log_softmax(head(functional_call(encoder, p, (x.unsqueeze(0),))), dim=-1)[0]

    def log_prob(p, x, onehot):
        return (log_probs(p, x) * onehot).sum()

    per_example = vmap(grad(log_prob), in_dims=(None, 0, 0), chunk_size=chunk_size)
    fisher = {k: torch.zeros_like(v) for k, v in params.items()}
    for i, batch in enumerate(images.split(batch_size)):
        with torch.no_grad():
            probs = torch.softmax(head(encoder(batch)), dim=-1)
        if exact and labels is None:
            # [B, C, *shape] per chunk: keep about chunk_size gradients in memory at once, whatever C is
            jac = vmap(jacrev(log_probs), in_dims=(None, 0), chunk_size=max(1, chunk_size // probs.shape[-1]))
            grads = jac(params, batch)
            for k in fisher:
                fisher[k] += torch.einsum("bc,bc...->...", probs, grads[k].pow(2))
            continue
        if labels is None:
            y = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(batch.device)
        else:
            y = labels[i * batch_size:(i + 1) * batch_size].to(batch.device)
        onehot = torch.nn.functional.one_hot(y, probs.shape[-1]).to(probs.dtype)
        grads = per_example(params, batch, onehot)
        for k in fisher:
            fisher[k] += grads[k].pow(2).sum(0)
    return Weights({k: v / len(images) for k, v in fisher.items()})


def fisher_average(task_vectors: list[Weights], fishers: list[Weights], coefs: list[float]) -> Weights:
    """sum_k c_k F_k tau_k / sum_k c_k F_k, per parameter (elementwise)."""
    merged = Weights()
    for k in task_vectors[0]:
        num = sum(c * f[k] * tv[k] for c, f, tv in zip(coefs, fishers, task_vectors))
        merged[k] = num / sum(c * f[k] for c, f in zip(coefs, fishers))
    return merged


@register_method(
    "fisher_merging", display_name="Fisher Merging", family="data-based closed form", paper=FISHER, needs="unlabeled",
    defaults_source="256 training examples per task, minimal Fisher weight 1e-6 and per-model normalization by the "
                    "global norm of the Fisher: fusion_bench config/method/fisher_merging/clip_fisher_merging.yaml "
                    "(num_fisher_examples 256, minimal_fisher_weight 1e-6, normalize_fisher_weight true); the exact "
                    "expectation over classes: mmatena/model_merging model_merging/fisher.py",
    hyperparameter_help={"n_exemplars": "unlabeled training images per task for the Fisher estimate",
                         "estimator": "'exact': sum over classes of p(y|x) times the squared gradient (official); "
                                      "'sampled': one label drawn from p(y|x) per image (cheaper with many classes)",
                         "eps": "added to every Fisher entry (minimal_fisher_weight)",
                         "normalize": "weight each model by 1/||F_k|| (normalized to sum 1)"},
    paper_budget={"n_exemplars": 256}, smoke={"n_exemplars": 4},
    ranges={"n_exemplars": "[1, inf)", "eps": "[0, inf)"})
def fisher_merging(ctx, n_exemplars: int = 256, eps: float = 1e-6, normalize: bool = True,
                   estimator: Literal["exact", "sampled"] = "exact"):
    """theta = sum_k c_k F_k theta_k / sum_k c_k F_k, F_k the diagonal Fisher of expert k on task k.

    F_k = mean over task-k training images x of sum_y p_k(y|x) (d log p_k(y|x)/d theta)^2, the exact expectation
    over the expert's prediction p_k(.|x) (its head: the suite's frozen cosine classifier of task k) as in the
    official code (mmatena/model_merging ``model_merging/fisher.py``; one gradient per class), plus ``eps``. With
    ``normalize``, c_k = (1/||F_k||) / sum_j (1/||F_j||) (fusion_bench); otherwise c_k = 1/K. Applied to every
    parameter of the encoder, computed as theta_0 + sum_k c_k F_k tau_k / sum_k c_k F_k (the same average, with
    less cancellation).

    ``estimator='sampled'`` draws one label per image from p_k(.|x) instead (an unbiased but noisy estimate, for
    heads with many classes). fusion_bench squares the gradient of a batch-summed, sqrt(p)-weighted loss, which
    is not a sum of per-example squares; this follows the official per-example form.
    """
    fishers, tvs = [], []
    for i, task in enumerate(ctx.tasks):
        generator = torch.Generator().manual_seed(ctx.seed * 1000 + i)
        images = ctx.exemplars(task, n=n_exemplars, split="train")
        f = diagonal_fisher(ctx.expert_encoder(task), ctx.head(task), images, generator,
                            exact=estimator == "exact")
        keys = ctx.pretrained_weights.keys()
        fishers.append(Weights({k: f[k] + eps for k in keys}))
        tvs.append(ctx.task_vector(task))
    if normalize:
        inv_norms = torch.stack([1.0 / f.flatten().norm() for f in fishers])
        coefs = (inv_norms / inv_norms.sum()).tolist()
    else:
        coefs = [1.0 / len(fishers)] * len(fishers)
    return ctx.shared_model(ctx.pretrained_weights + fisher_average(tvs, fishers, coefs))
