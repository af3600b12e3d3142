"""Concrete subspace learning (Tang et al., 2023): a mask shared by all task vectors, learned at test time.

One logit per parameter entry, shared by the tasks. Each step samples a Concrete (relaxed
Bernoulli, Gumbel-sigmoid) mask ``m`` from the logits, rescales it per tensor to mean 1
(``m / mean(m)``) and merges inside the masked subspace,
``theta = theta_0 + m * sum_t lambda_t tau_t``; the logits are trained by Adam to minimise the
summed prediction entropy of every task's head on unlabeled test batches. The inner merge is Task
Arithmetic (fixed lambda) or AdaMerging (lambda adapted: a meta-learning phase in which each mask
step is evaluated after one inner Adam step on freshly reset coefficients, then AdaMerging on the
final masked task vectors).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from mergebench.functional import FunctionalMerge
from mergebench.methods.adaptive import BF16_DEVIATION, entropy_objective, functional_merge, minimize_entropy, unlabeled_streams
from mergebench.registry import Paper, register_method

CONCRETE = Paper("Concrete Subspace Learning based Interference Elimination for Multi-task Model Merging", 2023,
                 "2312.06173", "arXiv", "https://github.com/tanganke/fusion_bench")

MaskKind = Literal["continuous", "discrete"]


class ConcreteMask(nn.Module):
    """fusion_bench's ``MaskModel(parameter_type="logits")``: one logit per entry of every merged tensor."""

    def __init__(self, like: dict[str, Tensor], init_logits: float, temperature: float):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.keys = list(like)
        self.logits = nn.ParameterList([nn.Parameter(torch.full_like(like[k], float(init_logits))) for k in self.keys])
        self.temperature = temperature

    def sample(self, kind: MaskKind = "continuous") -> dict[str, Tensor]:
        """A relaxed Bernoulli sample (differentiable, ``rsample``) or a Bernoulli sample (binary), per key."""
        if kind not in ("continuous", "discrete"):
            raise ValueError(f"mask kind must be 'continuous' or 'discrete', got {kind!r}")
        out = {}
        for k, logits in zip(self.keys, self.logits):
            if kind == "continuous":
                out[k] = torch.distributions.RelaxedBernoulli(torch.tensor(self.temperature, device=logits.device),
                                                            logits=logits).rsample()
            else:
                out[k] = torch.distributions.Bernoulli(logits=logits).sample()
        return out


def density(mask: dict[str, Tensor]) -> float:
    """Sum of the mask over its number of entries (fusion_bench's ``mask_sparsity``)."""
    return sum(m.sum().item() for m in mask.values()) / sum(m.numel() for m in mask.values())


def rescaled(mask: dict[str, Tensor]) -> dict[str, Tensor]:
    """m / mean(m) per tensor, as the official code (an all-zero tensor stays zero instead of becoming NaN)."""
    return {k: m / m.mean().clamp_min(torch.finfo(m.dtype).tiny) for k, m in mask.items()}


def _concrete_setup(ctx, granularity: str, scaling: float, init_logits: float, temperature: float,
                    batch_size: int):
    streams = unlabeled_streams(ctx, batch_size)  # first: a context without data fails before any work
    fm = functional_merge(ctx, granularity, scaling, clamp=None)  # official clamp_weights: false
    return streams, fm, ConcreteMask(fm.theta0, init_logits, temperature)


def _final_mask(ctx, mask: ConcreteMask, eval_mask: MaskKind, key: str) -> dict[str, Tensor]:
    with torch.no_grad():
        m = mask.sample(eval_mask)
    ctx.log(f"{key}/mask_density", density(m))
    return rescaled(m)


def _log_masked_lambdas(ctx, fm: FunctionalMerge, key: str):
    lam = fm.coefficients().detach()
    for i, t in enumerate(ctx.tasks):
        ctx.log(f"{key}/lambda_mean/{t}", lam[:, i].mean().item())


DEFAULTS_SOURCE_TA = (
    "official code (tanganke/fusion_bench, config/method/concrete_subspace/clip_concrete_task_arithmetic.yaml, "
    "fusion_bench/method/concrete_subspace/clip_concrete_task_arithmetic.py): Adam lr 1e-3 on the mask logits, "
    "initial logits 0, temperature 0.5, Task Arithmetic scaling 0.3 (not clamped), batch 16 (one batch per task "
    "per step, entropy summed over tasks), mask rescaled to mean 1 per tensor, evaluation mask a continuous "
    "sample, 2000 steps (the official schedule)")

DEFAULTS_SOURCE_ADA = (
    "official code (tanganke/fusion_bench, config/method/concrete_subspace/clip_concrete_{layer,task}_wise_"
    "adamerging.yaml, fusion_bench/method/concrete_subspace/clip_concrete_adamerging.py): mask Adam lr 1e-3, "
    "inner (base) Adam lr 1 on the coefficients, AdaMerging Adam lr 1e-3, coefficients initialised at 0.3 and "
    "not clamped, initial logits 0, temperature 0.5, batch 16 (one batch per task per step), evaluation mask a "
    "continuous sample rescaled to mean 1, 1000 mask steps + 1000 AdaMerging steps (the official schedule)")

HELP = {
    "steps": "Adam steps on the mask logits (official: 2000 for Concrete TA, 1000 for Concrete AdaMerging)",
    "adamerging_steps": "AdaMerging steps on the coefficients with the final mask fixed (official 1000)",
    "lr": "Adam learning rate of the mask logits (official 1e-3)",
    "base_lr": "Adam learning rate of the one inner step on the coefficients per mask step (official 1)",
    "adamerging_lr": "Adam learning rate of the final AdaMerging phase (official 1e-3)",
    "scaling": "Task Arithmetic scaling / initial AdaMerging coefficient of every task (official 0.3)",
    "temperature": "temperature of the Concrete (relaxed Bernoulli) mask (official 0.5)",
    "init_logits": "initial value of every mask logit (official 0: keep probability 0.5)",
    "batch_size": "unlabeled test images per task per step (official 16)",
    "eval_mask": "mask of the returned model: 'continuous' (official) Concrete sample, or 'discrete' Bernoulli sample",
    "granularity": "AdaMerging coefficients: 'layer' (one per tensor per task) or 'task' (one per task)",
}

NOTES = """

    Budget: the official schedule (see ``defaults_source``; ``--budget smoke``: 2 steps per phase).
    Deviations from the official code: the mask covers the encoder's own floating-point tensors
    (the official MaskModel covers every trainable tensor of the CLIP vision model, which is the
    same set); the data is the test split through ``ctx.unlabeled`` (shuffled, seeded by the run's
    seed). The returned model is the one evaluation-mask sample drawn under the run's seed, as
    the official code draws one; it is one plain encoder (0 added parameters).
""" + BF16_DEVIATION


@register_method("concrete_task_arithmetic", display_name="Concrete TA", paper=CONCRETE, needs="unlabeled",
                 family="test-time adaptation", defaults_source=DEFAULTS_SOURCE_TA, hyperparameter_help=HELP,
                 paper_budget={"steps": 2000, "batch_size": 16}, smoke={"steps": 2}, notes=NOTES,
                 ranges={"steps": "[1, inf)", "lr": "(0, inf)", "scaling": "[0, inf)", "temperature": "(0, inf)",
                         "batch_size": "[1, inf)"})
def concrete_task_arithmetic(ctx, steps: int = 2000, lr: float = 1e-3, scaling: float = 0.3, temperature: float = 0.5,
                             init_logits: float = 0.0, batch_size: int = 16, eval_mask: MaskKind = "continuous"):
    """Concrete Task Arithmetic: theta = theta_0 + m * scaling * sum_t tau_t with a Concrete mask m shared by the
    tasks (rescaled to mean 1 per tensor), its logits trained by entropy minimisation on unlabeled test batches;
    Task Arithmetic has no inner optimisation (its scaling is fixed)."""
    streams, fm, mask = _concrete_setup(ctx, "task", scaling, init_logits, temperature, batch_size)
    fm.lambdas.requires_grad_(False)
    minimize_entropy(ctx, fm, list(mask.parameters()), steps=steps, lr=lr, streams=streams, desc="Concrete TA",
                     log_key="concrete_task_arithmetic", weights=lambda: fm.merged_weights(rescaled(mask.sample())))
    return ctx.shared_model(fm.final_weights(_final_mask(ctx, mask, eval_mask, "concrete_task_arithmetic")))


@register_method("concrete_adamerging", display_name="Concrete AdaMerging", paper=CONCRETE, needs="unlabeled",
                 family="test-time adaptation", defaults_source=DEFAULTS_SOURCE_ADA, hyperparameter_help=HELP,
                 paper_budget={"steps": 1000, "adamerging_steps": 1000, "batch_size": 16},
                 smoke={"steps": 2, "adamerging_steps": 2}, notes=NOTES,
                 ranges={"steps": "[1, inf)", "adamerging_steps": "[1, inf)", "lr": "(0, inf)", "base_lr": "(0, inf)",
                         "adamerging_lr": "(0, inf)", "scaling": "[0, inf)", "temperature": "(0, inf)",
                         "batch_size": "[1, inf)"})
def concrete_adamerging(ctx, granularity: Literal["layer", "task"] = "layer", steps: int = 1000,
                        adamerging_steps: int = 1000, lr: float = 1e-3, base_lr: float = 1.0,
                        adamerging_lr: float = 1e-3, scaling: float = 0.3, temperature: float = 0.5,
                        init_logits: float = 0.0, batch_size: int = 16, eval_mask: MaskKind = "continuous"):
    """Concrete AdaMerging (layer-wise by default): bi-level. Each mask step samples a Concrete mask m, resets the
    coefficients to their initial value, takes one inner Adam step on them (entropy of the merge with m
    detached), then one Adam step on the mask logits (entropy of the merge with m, at the updated coefficients;
    first-order, as the official code). Then one evaluation mask is drawn and AdaMerging trains the coefficients
    from their initial value on the masked task vectors: theta = theta_0 + m * sum_t lambda_t tau_t."""
    key = "concrete_adamerging"
    streams, fm, mask = _concrete_setup(ctx, granularity, scaling, init_logits, temperature, batch_size)
    init = fm.lambdas.detach().clone()
    heads = {t: ctx.head(t) for t in ctx.tasks}
    base_opt = torch.optim.Adam([fm.lambdas], lr=base_lr)  # its state persists across mask steps, as official
    mask_opt = torch.optim.Adam(mask.parameters(), lr=lr)
    for _ in ctx.progress(range(steps), desc="Concrete AdaMerging (mask)"):
        m = rescaled(mask.sample())
        with torch.no_grad():
            fm.lambdas.copy_(init)
        inner = entropy_objective(ctx, fm, fm.merged_weights({k: v.detach() for k, v in m.items()}), streams, heads)
        base_opt.zero_grad()
        inner.backward()
        base_opt.step()
        outer = entropy_objective(ctx, fm, fm.merged_weights(m), streams, heads)
        mask_opt.zero_grad()
        outer.backward()
        mask_opt.step()
        ctx.log(f"{key}/inner_loss", inner.item())
        ctx.log(f"{key}/loss", outer.item())
    final = _final_mask(ctx, mask, eval_mask, key)
    with torch.no_grad():
        fm.lambdas.copy_(init)
    minimize_entropy(ctx, fm, [fm.lambdas], steps=adamerging_steps, lr=adamerging_lr, streams=streams,
                     desc="Concrete AdaMerging (coefficients)", log_key=f"{key}/adamerging",
                     weights=lambda: fm.merged_weights(final))
    _log_masked_lambdas(ctx, fm, key)
    return ctx.shared_model(fm.final_weights(final))


