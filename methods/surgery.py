"""Representation Surgery (Yang et al., ICML 2024): a per-task low-rank fix of the merged embedding."""

from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
from torch import Tensor, nn

from mergebench.methods.adaptive import TWO_BATCH_BUDGET, TWO_BATCH_SMOKE, ExpertEmbeddings, l1
from mergebench.api.models import MergedModel, freeze
from mergebench.api.registry import Paper, register_method

SURGERY = Paper("Representation Surgery for Multi-Task Model Merging", 2024, "2402.02705", "ICML",
                "https://github.com/EnnengYang/RepresentationSurgery")


class SurgeryAdapter(nn.Module):
    """f_hat = f - W_up ReLU(W_down f), no biases; W_down default nn.Linear init, W_up zero (identity at init)."""

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, f: Tensor) -> Tensor:
        return f - self.up(torch.relu(self.down(f)))


class SurgeryModel(MergedModel):
    """A base merged model followed by the task's surgery adapter on its final embedding."""

    def __init__(self, base: MergedModel, tasks: Sequence[str], dim: int, rank: int):
        super().__init__()
        self.base = freeze(base)
        self.adapters = nn.ModuleDict({t: SurgeryAdapter(dim, rank) for t in tasks})

    def forward(self, images: Tensor, task: str) -> Tensor:
        return self.adapters[task](self.base(images, task))


@register_method(
    "surgery", display_name="Representation Surgery", paper=SURGERY, needs="unlabeled", adds_params=True,
    family="test-time adaptation",
    defaults_source=(
        "official code (EnnengYang/RepresentationSurgery, src/merging_model.py, "
        "src/main_*_with_surgery.py): rank 16, Adam lr 1e-3 betas (0.9, 0.999), batch 16, two batches per task "
        "per iteration with one Adam step per batch, L1 (mean) to the expert's embedding, 500 iterations "
        "(iterations=500 in the official scripts)"),
    paper_budget=TWO_BATCH_BUDGET, smoke=TWO_BATCH_SMOKE,
    hyperparameter_help={
        "base": "the merge to fix (any method spec; it is frozen)",
        "rank": "adapter rank (official 16)",
        "steps": "iterations; each makes batches_per_task Adam steps per task (official 500)",
        "lr": "Adam learning rate (official 1e-3)",
        "batch_size": "unlabeled test images per batch (official 16)",
        "batches_per_task": "batches (= Adam steps) of each task per iteration (official 2)",
    },
    ranges={"rank": "[1, inf)", "steps": "[1, inf)", "lr": "(0, inf)", "batch_size": "[1, inf)",
            "batches_per_task": "[1, inf)"})
def surgery(ctx, base="task_arithmetic", rank: int = 16, steps: int = 500, lr: float = 1e-3,
            batch_size: int = 16, batches_per_task: int = 2):
    """Representation Surgery: for each task t, f_hat = f - W_up,t ReLU(W_down,t f) on the base model's final
    (unnormalised, after ``proj``) image embedding f, before the head's L2 normalisation; W_up is zero-initialised
    so the adapter starts as the identity. The 2 * rank * dim parameters of each task are trained with Adam to
    minimise the L1 distance to the embedding of that task's fine-tuned expert on unlabeled test batches. The
    base model is frozen: its weights, including trained merge coefficients, are not changed.

    Budget: the official 500 iterations of 2 x 16 unlabeled test images per task (``--budget smoke``: 2).
    Deviations from the official code: one Adam optimizer over all adapters whose other tasks' gradients are
    None at each step (PyTorch >= 2 ``zero_grad``), so a task's adapter only moves on its own batches. The base
    and expert embeddings of each unlabeled image are computed once, without gradients (both models are frozen,
    the adapters do not affect them), and looked up for every batch that draws the image; the batches and the
    per-batch Adam steps are the official ones. The expert is the true fine-tuned encoder
    for every base, as in the official code.
    """
    base_model = freeze(base)
    experts = ExpertEmbeddings(ctx)
    # (base embedding, expert embedding) of each batch: both frozen, so computed once per image
    streams = {t: ctx.unlabeled(t, batch_size, through=(partial(base_model, task=t), partial(experts, task=t)))
               for t in ctx.tasks}
    dim = ctx.embed_dim
    model = SurgeryModel(base_model, ctx.tasks, dim, rank).to(ctx.device)
    opt = torch.optim.Adam(model.adapters.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    for _ in ctx.progress(range(steps), desc="Representation Surgery"):
        losses = []
        for t in ctx.tasks:
            for f, target in (next(streams[t]) for _ in range(batches_per_task)):
                loss = l1(model.adapters[t](f), target)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
        ctx.log("surgery/loss", sum(losses) / len(losses))
    return model.eval()
