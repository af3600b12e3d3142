"""Test-time adaptation: the machinery shared by the methods that train on unlabeled test batches (AdaMerging and
its ++ form, Concrete, AdaRank, Representation Surgery, IntervMerge).

* :func:`functional_merge`: the engine's :class:`~mergebench.engine.functional.FunctionalMerge` (the merged encoder as a
  function of trainable merge coefficients, with its fast functional ViT forward) on the context's experts,
  raw or TIES-processed (AdaMerging++); :class:`~mergebench.api.models.MergeState` /
  :class:`~mergebench.api.models.AdaMergedModel` are what an AdaMerging base hands to an add-on that trains the
  coefficients further (IntervMerge's joint training).
* Data helpers: per-task unlabeled streams (always through ``ctx.unlabeled``), expert
  embeddings as distillation targets, and the entropy objective with its Adam loop
  (:func:`minimize_entropy`, configured by keyword: ``minimize_entropy(ctx, merge, params, steps=..., lr=...,
  streams=..., desc=..., log_key=...)``).
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn

from mergebench.engine.evaluate import prediction_entropy
from mergebench.engine.functional import FunctionalMerge
from mergebench.api.models import Granularity, MergedModel, MergeState
from mergebench.api.weights import Weights
from mergebench.methods.ties import ties_task_vectors


# the official loop's budget in EnnengYang/AdaMerging, kept by Representation Surgery's (same authors) and
# IntervMerge's official scripts: 500 iterations of two batches of 16 unlabeled test images per task
TWO_BATCH_BUDGET = {"steps": 500, "batch_size": 16, "batches_per_task": 2}
TWO_BATCH_SMOKE = {"steps": 2}

# the registration notes' paragraph of every method whose loop runs under ``ctx.autocast()``
BF16_DEVIATION = """\
    Deviation from the official fp32 code when the run's ``precision`` is ``bf16`` (what the default ``auto``
    picks where the device multiplies bfloat16 in hardware, else ``fp32``, as the official code): the loop's
    encoder forward and backward passes run under bfloat16 autocast; the merge, the trained parameters, Adam and
    the loss stay in float32.
    """


def task_vectors_for(ctx, ties_k: float | None = None) -> list[Weights]:
    """The task vectors in task order: raw, or TIES trimmed + sign-elected (AdaMerging++), unmerged."""
    tvs = [ctx.task_vector(t) for t in ctx.tasks]
    if ties_k is None:
        return tvs

    selected, _ = ties_task_vectors(tvs, ties_k)
    return [tvs[0].unflatten(row.clone()) for row in selected]


def functional_merge(ctx, granularity: Granularity = "layer", init: float | Tensor = 0.3,
                     ties_k: float | None = None, clamp: tuple[float, float] | None = (0.0, 1.0)) -> FunctionalMerge:
    """A FunctionalMerge on the context's suite (skeleton = a fresh pretrained encoder)."""
    return FunctionalMerge(ctx.encoder(), ctx.pretrained_weights, task_vectors_for(ctx, ties_k), granularity, init,
                           clamp)


def functional_merge_from_state(ctx, state: MergeState) -> FunctionalMerge:
    """Resume training the coefficients of an AdaMerging result."""
    return functional_merge(ctx, state.granularity, state.coefficients, state.ties_k)


# ------------------------------------------------------------------ data and targets
def unlabeled_streams(ctx, batch_size: int = 16) -> dict[str, Iterator[Tensor]]:
    """{task: endless shuffled unlabeled batches} (raises DataNotDeclaredError if undeclared)."""
    return {t: ctx.unlabeled(t, batch_size) for t in ctx.tasks}


class ExpertEmbeddings:
    """Final (unnormalised) embeddings of each task's true fine-tuned expert, the distillation target."""

    def __init__(self, ctx):
        self.ctx = ctx
        self._encoders: dict[str, nn.Module] = {}

    @torch.no_grad()
    def __call__(self, images: Tensor, task: str) -> Tensor:
        if task not in self._encoders:
            self._encoders[task] = self.ctx.expert_encoder(task)
        return self._encoders[task](images)


def entropy(logits: Tensor) -> Tensor:
    """Mean over the batch of the Shannon entropy of softmax(logits)."""
    return prediction_entropy(logits).mean()


def entropy_objective(ctx, merge: FunctionalMerge, weights: dict[str, Tensor], streams: dict[str, Iterator[Tensor]],
                      heads: dict[str, nn.Module], batches_per_task: int = 1) -> Tensor:
    """The test-time objective of AdaMerging and its descendants: the sum over tasks (``batches_per_task``
    batches each, drawn in task order) of each batch's mean prediction entropy under the merged encoder
    ``weights``. All batches go through the encoder in one pass (it is per-image, so this equals one pass
    per batch), at the run's precision (``ctx.autocast()``: the merge before it and the loss after it stay in
    float32)."""
    tasks = [t for t in ctx.tasks for _ in range(batches_per_task)]
    batches = [next(streams[t]) for t in tasks]
    with ctx.autocast():
        features = merge.embed(torch.cat(batches), weights)
    features = features.float().split([len(b) for b in batches])
    return sum(entropy(heads[t](f)) for t, f in zip(tasks, features))


def minimize_entropy(ctx, merge: FunctionalMerge, params: Sequence[Tensor], *, steps: int, lr: float,
                     streams: dict[str, Iterator[Tensor]], desc: str, log_key: str, batches_per_task: int = 1,
                     weights: Callable[[], dict[str, Tensor]] | None = None) -> None:
    """Adam (betas 0.9/0.999, no weight decay, as the official codes) on ``params`` for ``steps`` steps of
    :func:`entropy_objective`; ``weights()`` builds the merged weights of a step (default
    ``merge.merged_weights()``). Logs ``{log_key}/loss`` per step."""
    heads = {t: ctx.head(t) for t in ctx.tasks}
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    for _ in ctx.progress(range(steps), desc=desc):
        loss = entropy_objective(ctx, merge, (weights or merge.merged_weights)(), streams, heads, batches_per_task)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ctx.log(f"{log_key}/loss", loss.item())


def l1(student: Tensor, teacher: Tensor) -> Tensor:
    """torch.nn.L1Loss(reduction='mean'): mean over batch x embedding dims, as both official codes."""
    return F.l1_loss(student, teacher)


def single_encoder(model: nn.Module) -> VisionTransformer:
    """The one open_clip VisionTransformer inside a merged model (add-ons that edit the encoder need it)."""
    found = [m for m in model.modules() if isinstance(m, VisionTransformer)]
    if len(found) != 1:
        raise ValueError(f"this add-on needs a base with exactly one shared encoder; {type(model).__name__} "
                         f"holds {len(found)} (a per-task model such as 'individual' cannot be intervened on)")
    return found[0]


class FunctionalSharedModel(MergedModel):
    """A FunctionalMerge seen as a MergedModel (one encoder for every task) while its coefficients train."""

    def __init__(self, merge: FunctionalMerge):
        super().__init__()
        self.merge = merge

    def forward(self, images: Tensor, task: str | None = None) -> Tensor:
        return self.merge(images)
