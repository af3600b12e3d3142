"""Reference points and the simplest merges: Pretrained, Individual, Weight Averaging, Task Arithmetic."""

from __future__ import annotations

import torch

from mergebench.models import PerTaskModel
from mergebench.registry import Paper, register_method
from mergebench.weights import Weights, cache_sized_parts

TASK_VECTORS = Paper("Editing Models with Task Arithmetic", 2023, "2212.04089", "ICLR",
                     "https://github.com/mlfoundations/task_vectors")


@register_method("pretrained", display_name="Pretrained (zero-shot)", family="reference",
                 paper=Paper("Learning Transferable Visual Models From Natural Language Supervision", 2021,
                             "2103.00020", "ICML"))
def pretrained(ctx):
    """The pretrained encoder with each task's zero-shot head: the lower reference."""
    return ctx.shared_model(ctx.pretrained_weights)


@register_method("individual", display_name="Individual (fine-tuned experts)", family="reference",
                 adds_params=True, paper=TASK_VECTORS)
def individual(ctx):
    """Each task evaluated with its own expert: the upper reference. Stores one backbone per task."""
    return PerTaskModel({t: ctx.expert_encoder(t) for t in ctx.tasks})


@register_method("weight_averaging", display_name="Weight Averaging", family="data-free",
                 paper=Paper("Model soups: averaging weights of multiple fine-tuned models improves accuracy "
                             "without increasing inference time", 2022, "2203.05482", "ICML"))
def weight_averaging(ctx):
    """theta = mean_t theta_t (equivalently Task Arithmetic with scaling 1/T). One tensor at a time."""
    merged = Weights()
    for key, _, experts in ctx.per_tensor():
        acc = torch.empty_like(experts[0])
        for part, *parts in cache_sized_parts(acc, *experts):   # (theta_1 + theta_2 + ...) / T in task order
            part.copy_(parts[0])
            for theta_t in parts[1:]:
                part.add_(theta_t)
            part.div_(len(experts))
        merged[key] = acc
    return ctx.shared_model(merged)


@register_method("task_arithmetic", display_name="Task Arithmetic", family="data-free", paper=TASK_VECTORS,
                 defaults_source="scaling 0.3: AdaMerging (Yang et al., ICLR 2024) and fusion_bench use 0.3 for "
                                 "ViT-B/32; the task-vectors paper picks it on validation from {0, 0.05, ..., 1}",
                 hyperparameter_help={"scaling": "lambda in theta_0 + lambda * sum_t tau_t"},
                 ranges={"scaling": "[0, inf)"})
def task_arithmetic(ctx, scaling: float = 0.3):
    """theta = theta_0 + lambda * sum_t (theta_t - theta_0)."""
    return ctx.shared_model(ctx.pretrained_weights + scaling * sum(ctx.task_vectors().values()))
