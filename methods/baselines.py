"""Reference points and the simplest merges: Pretrained, Individual, Weight Averaging, Task Arithmetic."""

from __future__ import annotations

import torch
from torch import Tensor

from mergebench.models import PerTaskModel
from mergebench.registry import Paper, register_method
from mergebench.weights import Weights

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
    """theta = theta_0 + lambda * sum_t (theta_t - theta_0).

    One tensor at a time, in place (the same operations in the same order as the expression above, so the same
    result), so that memory stays near the experts' own size.
    """
    merged = Weights()
    for key, theta0, experts in ctx.per_tensor():
        merged[key] = task_vector_sum(theta0, experts, scaling)
    return ctx.shared_model(merged)


def task_vector_sum(theta0: Tensor, experts: list[Tensor], scaling: float | None = None) -> Tensor:
    """sum_t (theta_t - theta_0) of one tensor, accumulated in task order into a new tensor; with ``scaling``,
    theta_0 + scaling * that sum (each part finished while it is in the cache)."""
    acc = torch.empty_like(theta0)
    scratch = torch.empty(min(acc.numel(), CACHE_PART), dtype=acc.dtype, device=acc.device)
    for part, base, *parts in cache_sized_parts(acc, theta0, *experts):
        torch.sub(parts[0], base, out=part)
        for theta_t in parts[1:]:
            part.add_(torch.sub(theta_t, base, out=scratch[:part.numel()]))
        if scaling is not None:
            part.mul_(scaling).add_(base)
    return acc


# Elements per part (128 KiB of float32: a part of the result, theta_0 and a scratch stay in L2). At most torch's
# parallel grain (32,768), so each operation on a part runs on the calling thread: a part split across threads pays a
# synchronisation per operation, which on a loaded machine measured 5-10x slower than the whole-tensor operations.
CACHE_PART = 1 << 15


def cache_sized_parts(out: Tensor, *inputs: Tensor):
    """Matching flat parts of ``out`` and of each input (same shape): on the CPU of ``CACHE_PART`` elements, so that
    an accumulation over T inputs reads each input from memory once while the partial result stays in the cache
    (the elementwise operations, hence the results, are those on the whole tensors); elsewhere the whole tensors."""
    flat = [t.view(-1) if t.is_contiguous() else t.reshape(-1) for t in (out, *inputs)]
    if flat[0].data_ptr() != out.data_ptr() or not out.is_contiguous():
        raise ValueError("cache_sized_parts writes into a contiguous output")
    step = CACHE_PART if out.device.type == "cpu" else max(out.numel(), 1)
    for start in range(0, out.numel(), step):
        yield [t[start:start + step] for t in flat]
