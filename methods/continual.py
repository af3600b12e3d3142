"""Continual (sequential) merging: OPCM and Perturb-and-Merge. Experts arrive one at a time (``ctx.sequence()``).

Task Arithmetic, TIES and the other data-free one-shot methods run under the same protocol through the
harness's adapter (``mergebench run --protocol sequential task_arithmetic``; see ``mergebench.engine.sequential``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.func import functional_call

from mergebench.engine.io import atomic_save_tensors, cache_root
from mergebench.api.activations import is_block_linear_weight
from mergebench.methods.fisher import diagonal_fisher
from mergebench.api.models import encoder_weights
from mergebench.api.registry import Paper, register_method
from mergebench.api.shape_batches import same_shape_batches
from mergebench.api.weights import Weights
from mergebench.suites.mini8 import CONFIGS, mini8_config_dict

OPCM = Paper("Merging Models on the Fly Without Retraining: A Sequential Approach to Scalable Continual Model "
             "Merging", 2025, "2501.09522", None, "https://github.com/tanganke/fusion_bench (fusion_bench/method/opcm)")
PAM = Paper("Train with Perturbation, Infer after Merging: A Two-Stage Framework for Continual Learning", 2025,
            "2505.22389", "NeurIPS", "https://github.com/qhmiao/P-M-for-Continual-Learning")


# ------------------------------------------------------------------ OPCM
def is_linear_weight(key: str) -> bool:
    """The weights OPCM projects: the linear maps of each block and the output projection ``proj``."""
    return is_block_linear_weight(key) or key == "proj"


def opcm_project(previous_tv: Tensor, task_tv: Tensor, alpha: float) -> Tensor:
    """The part of ``task_tv`` outside the dominant subspace of ``previous_tv`` (official merge_linear_weights).

    With previous_tv = U S V^T (full SVD) and r the first index where the cumulative share of singular values
    exceeds ``alpha``: P = U^T task_tv V, zero its diagonal and its top-left r x r block, return U P V^T.
    ``[m, n]`` matrices, or ``[..., m, n]`` batches of them (each with its own r).
    """
    u, s, vh = torch.linalg.svd(previous_tv.double(), full_matrices=True)
    split_rank = (s.cumsum(-1) / s.sum(-1, keepdim=True) > alpha).float().argmax(-1)   # [...]
    projected = u.mT @ task_tv.double() @ vh.mT
    rows = torch.arange(projected.shape[-2], device=s.device) < split_rank[..., None]    # [..., m]
    cols = torch.arange(projected.shape[-1], device=s.device) < split_rank[..., None]    # [..., n]
    projected.diagonal(dim1=-2, dim2=-1).fill_(0)
    projected.masked_fill_(rows[..., :, None] & cols[..., None, :], 0)
    return (u @ projected @ vh).to(task_tv.dtype)


def _opcm_matrices(key: str, tensor: Tensor) -> list[Tensor]:
    """The matrices OPCM projects in a linear weight: open_clip's fused q, k, v in_proj as its three blocks (the
    official code projects each Linear), any other as itself."""
    return list(tensor.chunk(3)) if key.endswith("attn.in_proj_weight") else [tensor]


def _opcm_cleaned(merged_tv: Weights, task_tv: Weights, alpha: float) -> Weights:
    """task_tv with every linear weight projected (``opcm_project``) off merged_tv's dominant subspace; the
    same-shaped matrices projected in one batched call (``shape_batches``)."""
    linear = [k for k in task_tv if is_linear_weight(k)]
    pairs = (((k, i), torch.stack([p, t]))
             for k in linear for i, (p, t) in enumerate(zip(_opcm_matrices(k, merged_tv[k]),
                                                            _opcm_matrices(k, task_tv[k]))))
    parts: dict[str, dict[int, Tensor]] = {}
    for ids, pair in same_shape_batches(pairs):     # [matrices of one shape, 2 (previous, task), m, n]
        for (key, i), projected in zip(ids, opcm_project(pair[:, 0], pair[:, 1], alpha)):
            parts.setdefault(key, {})[i] = projected
    return Weights({k: torch.cat([parts[k][i] for i in sorted(parts[k])]) if k in parts else v
                    for k, v in task_tv.items()})


@register_method(
    "opcm", display_name="OPCM", family="continual", needs="sequential", paper=OPCM,
    defaults_source="alpha 0.5: fusion_bench config/method/opcm/opcm.yaml (the official implementation); the task "
                    "order is the harness's (seeded random orders, like the config's shuffle_order: true)",
    hyperparameter_help={"alpha": "share of the previous merged task vector's singular-value mass whose subspace a "
                                  "new task vector is projected off"},
    ranges={"alpha": "[0, 1]"})
def opcm(ctx, alpha: float = 0.5):
    """Orthogonal projection-based continual merging with adaptive scaling.

    Step 1: tau_merged = tau_1. Step t: for each linear weight, project tau_t off the dominant subspace of the
    previous merged task vector (``opcm_project``: full SVD, the singular directions holding the first ``alpha``
    of the singular-value mass, plus every u_i v_i^T); other tensors take tau_t as is. The unscaled sum
    S_t = lambda_{t-1} tau_merged + projected tau_t is rescaled to the mean norm of the task vectors seen so far:
    tau_merged = S_t / lambda_t with lambda_t = ||S_t|| / mean_i ||tau_i|| (norms over all encoder tensors).
    theta = theta_0 + tau_merged after every step (as the official OPCMForCLIP.run).

    Deviations: open_clip's fused attention in_proj weight is split into its q, k, v blocks and each is
    projected (the official code runs on Hugging Face CLIP, whose q/k/v are separate Linear layers); ``proj`` is
    projected as a linear map. The official code leaves the parameters held directly by non-leaf modules (CLIP's
    class embedding) at the first model's value; here every non-linear tensor (class and positional embeddings,
    patch embedding, LayerNorms, biases) takes the plain sum, as the official code does for leaf modules. SVDs in
    float64.
    """
    theta0 = ctx.pretrained_weights
    merged_tv, norms, previous_lambda = None, [], 1.0
    for task, expert in ctx.sequence():
        task_tv = expert - theta0
        norms.append(task_tv.flatten().norm().item())
        if merged_tv is None:
            merged_tv = task_tv
        else:
            cleaned = _opcm_cleaned(merged_tv, task_tv, alpha)
            unscaled = Weights({k: previous_lambda * merged_tv[k] + cleaned[k] for k in merged_tv})
            previous_lambda = unscaled.flatten().norm().item() / (sum(norms) / len(norms))
            merged_tv = unscaled / previous_lambda
        ctx.log("lambda_t", previous_lambda)
        yield ctx.shared_model(theta0 + merged_tv)


# ------------------------------------------------------------------ Perturb-and-Merge
def pam_coefficient(merged: Weights, delta: Weights, fisher_sum: Weights, fisher_theta_sum: Weights) -> float:
    """alpha_t = -sum_i (merged - theta_i)^T F_i delta / sum_i delta^T F_i delta, clamped to [0, 1].

    ``fisher_sum`` = sum_i F_i and ``fisher_theta_sum`` = sum_i F_i * theta_i over the tasks seen so far (the
    current one included), so sum_i F_i (merged - theta_i) = merged * fisher_sum - fisher_theta_sum: two running
    sums instead of every past expert and Fisher. Computed in float64.
    """
    num = sum(((merged[k].double() * fisher_sum[k] - fisher_theta_sum[k]) * delta[k].double()).sum() for k in delta)
    den = sum((fisher_sum[k] * delta[k].double() ** 2).sum() for k in delta)
    if den <= 0:
        return 1.0  # the new expert equals the merged model (delta = 0) or carries no curvature: nothing to weigh
    return float((-num / den).clamp(0.0, 1.0))


class PerturbedEncoder(nn.Module):
    """Trains ``encoder`` while running it at theta_0 + (1 + s)(theta - theta_0), s drawn per step from
    {0, +epsilon, -epsilon} with equal probability: the paper's stochastic estimate of the finite-difference
    regularizer along the task vector (one forward and backward per step). Its parameters are the encoder's."""

    def __init__(self, encoder: nn.Module, start: Weights, epsilon: float, generator: torch.Generator):
        super().__init__()
        self.encoder = encoder
        self.start = {k: v.detach().clone() for k, v in start.items()}
        self.epsilon = epsilon
        self.generator = generator

    def forward(self, images: Tensor) -> Tensor:
        s = (0.0, self.epsilon, -self.epsilon)[int(torch.randint(3, (1,), generator=self.generator))]
        if s == 0.0:
            return self.encoder(images)
        params = {k: self.start[k] + (1.0 + s) * (p - self.start[k]) for k, p in self.encoder.named_parameters()}
        return functional_call(self.encoder, params, (images,))


def finetune_recipe(name: str, info: dict):
    """The expert fine-tuning settings of the suite ``name`` (with ``info``) when it can fine-tune (mini8 and
    micro), else None."""
    cfg = CONFIGS.get(name)
    if cfg is None or info.get("mini8_config") != mini8_config_dict(cfg):
        return None
    return cfg


PERTURB_VERSION = 1  # bump when the perturbed training changes


def perturbed_expert(ctx, task: str, epsilon: float, cfg) -> Weights:
    """The expert of ``task`` re-fine-tuned from theta_0 with the perturbation, cached by suite key and settings."""
    from mergebench.build.train import train  # lazy: the build tool loads only when P&M re-fine-tunes an expert

    settings = {"suite": ctx.suite_info["cache_key"], "task": task, "epsilon": epsilon, "seed": cfg.seed,
                "epochs": cfg.finetune_epochs, "lr": cfg.finetune_lr, "batch_size": cfg.batch_size,
                "weight_decay": cfg.weight_decay, "version": PERTURB_VERSION}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_root()) / "perturb_and_merge" / f"{key}.safetensors"
    images, labels = ctx.training_set(task)  # counted as used data even when cached: the cache was built from it
    if path.exists():
        return Weights(load_file(path)).to(ctx.device)
    encoder = ctx.encoder(device="cpu")  # a fresh copy of theta_0, on the CPU (as the suite's experts were trained)
    start = encoder_weights(encoder)
    wrapped = PerturbedEncoder(encoder, start, epsilon, torch.Generator().manual_seed(cfg.seed * 31 + 7))
    # the suite's training data is in its stored order there; ours is the context's fixed shuffle (same images)
    train(wrapped, ctx.class_embeddings(task), images, labels, cfg.finetune_epochs, cfg.finetune_lr, cfg,
          f"perturbed fine-tune {task}", ctx.show_progress)
    weights = encoder_weights(encoder)
    atomic_save_tensors(dict(weights), path)
    return weights.to(ctx.device)


@register_method(
    "perturb_and_merge", display_name="Perturb-and-Merge (P&M)", family="continual", needs="sequential",
    sequential_data="labeled", paper=PAM,
    defaults_source="epsilon 0.5 and the three perturbation states drawn with probability 1/3 each: the paper's "
                    "experimental settings; global (one) coefficient: the paper's choice (its ablation against "
                    "per-module coefficients); 256 Fisher examples per task: fusion_bench's Fisher-merging default "
                    "(the paper does not bound it); the official code was not available here",
    hyperparameter_help={"perturb_training": "re-fine-tune each expert from theta_0 with the task-vector "
                                             "perturbation where the suite can fine-tune (else merge the experts as "
                                             "given; the record's notes say which)",
                         "epsilon": "perturbation size along the task vector",
                         "fisher_examples": "labeled training images of the arriving task for its diagonal Fisher"},
    paper_budget={"fisher_examples": 256}, smoke={"fisher_examples": 8},
    ranges={"epsilon": "[0, inf)", "fisher_examples": "[1, inf)"})
def perturb_and_merge(ctx, perturb_training: bool = True, epsilon: float = 0.5, fisher_examples: int = 256):
    """theta_t = theta_{t-1} + alpha_t (theta_t* - theta_{t-1}), the closed-form alpha_t of P&M.

    Infer after merging: with H_i ~ diag empirical Fisher F_i of expert i on task i's training data,
    alpha_t = -sum_{i<=t} (theta_{t-1} - theta_i*)^T F_i delta_t / sum_{i<=t} delta_t^T F_i delta_t,
    delta_t = theta_t* - theta_{t-1} (the minimizer of the second-order estimate of the total loss increase over
    the tasks seen), clamped to [0, 1] (the paper's convex combination); theta_1 = theta_1*. Train with
    perturbation (``perturb_training``): each expert is fine-tuned with the loss evaluated, at each step, at
    theta, theta + epsilon tau or theta - epsilon tau (tau = theta - theta_0, probability 1/3 each), which
    estimates the paper's finite-difference regularizer tau^T H tau at no extra cost.

    Deviations: the paper trains each task from the previous merged model with LoRA (rank 10 on key and value
    projections); here, to keep the experts of every method the same kind and order-independent (cacheable),
    the perturbed experts are full fine-tunings from theta_0 with the suite's own expert recipe, read from the
    suite at run time (mini8: ``finetune_epochs`` 10, AdamW at ``finetune_lr`` 1.5e-4 with warmup and cosine
    decay, batch 128, weight decay 0.1, frozen head, 12,000 training images per task; measured: 287 s for one task
    on one thread of an AVX2-only AMD EPYC, about 38 minutes for the eight), cached under the cache root by
    suite key and settings. Suites without a fine-tuning recipe (the real suite) merge the given experts (the
    record's notes say so). The Fisher uses ``fisher_examples`` images; alpha is clamped to [0, 1]. The official
    code could not be read here: the coefficient and the perturbation follow the paper's equations (as summarized
    in a paper review); check them against the official repository.
    """
    cfg = finetune_recipe(ctx.suite_name, ctx.suite_info) if perturb_training else None
    if perturb_training and cfg is None:
        ctx.note("perturb_training", f"skipped: suite {ctx.suite_name!r} has no fine-tuning recipe; merged the "
                                     f"experts as given")
    elif perturb_training:
        ctx.note("perturb_training", f"experts re-fine-tuned from theta_0 with the perturbation (epsilon={epsilon}; "
                                     f"{cfg.finetune_epochs} epochs at lr {cfg.finetune_lr})")
    else:
        ctx.note("perturb_training", "off: merged the experts as given")
    merged, fisher_sum, fisher_theta_sum = None, None, None
    for i, (task, expert) in enumerate(ctx.sequence()):
        if cfg is not None:
            expert = perturbed_expert(ctx, task, epsilon, cfg)
        images, labels = ctx.exemplars(task, n=fisher_examples, split="train", labels=True)
        fisher = diagonal_fisher(ctx.encoder(expert), ctx.head(task), images, None, labels=labels)
        fisher = Weights({k: fisher[k].double() for k in expert})
        fisher_theta = Weights({k: fisher[k] * expert[k].double() for k in expert})
        fisher_sum = fisher if fisher_sum is None else fisher_sum + fisher
        fisher_theta_sum = fisher_theta if fisher_theta_sum is None else fisher_theta_sum + fisher_theta
        if merged is None:
            alpha, merged = 1.0, expert
        else:
            delta = expert - merged
            alpha = pam_coefficient(merged, delta, fisher_sum, fisher_theta_sum)
            merged = merged + alpha * delta
        ctx.log("alpha", alpha)
        yield ctx.shared_model(merged)
