"""Test-time adaptation: the machinery shared by the methods that train on unlabeled test batches (AdaMerging and
its ++ form, Concrete, AdaRank, Representation Surgery, IntervMerge).

* :class:`FunctionalMerge`: the merged encoder as a function of trainable merge coefficients,
  ``merged[j] = theta_0[j] + sum_t clamp(lambda[j, t], 0, 1) * tau_t[j]``, run with
  ``torch.func.functional_call`` on one encoder skeleton (no model copy per step). Task-wise
  coefficients are one lambda per task; layer-wise ones are one lambda per parameter tensor
  per task, as in the official AdaMerging code (weight and bias are separate "layers").
* :class:`MergeState` / :class:`AdaMergedModel`: what an AdaMerging base hands to an add-on
  that trains the coefficients further (IntervMerge's joint training).
  Options used by later methods: unclamped coefficients, a mask shared by the tasks on the
  task-vector sum (Concrete subspace learning), and an overridable ``combined_task_vector``
  (AdaRank builds each tau_t from its masked SVD).
* Data helpers: per-task unlabeled streams (always through ``ctx.unlabeled``), expert
  embeddings as distillation targets, and the entropy objective with its Adam loop
  (:func:`minimize_entropy`, configured by keyword: ``minimize_entropy(ctx, merge, params, steps=..., lr=...,
  streams=..., desc=..., log_key=...)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn
from torch.func import functional_call

from mergebench.models import MergedModel, SharedModel, freeze
from mergebench.weights import Weights

Granularity = Literal["task", "layer"]


class FunctionalMerge(nn.Module):
    """theta(lambda) = theta_0 + sum_t clamp(lambda_t, 0, 1) * tau_t, differentiable in lambda.

    ``encoder`` is only a skeleton: its own tensors are never read for the merged keys (they
    are replaced in ``functional_call``). The coefficient on theta_0 is fixed at 1 and the
    task coefficients are not normalised, as in the official code.
    """

    def __init__(self, encoder: nn.Module, pretrained: Weights, task_vectors: Sequence[Weights],
                 granularity: Granularity = "layer", init: float | Tensor = 0.3,
                 clamp: tuple[float, float] | None = (0.0, 1.0)):
        super().__init__()
        if granularity not in ("task", "layer"):
            raise ValueError(f"granularity must be 'task' or 'layer', got {granularity!r}")
        self.encoder = freeze(encoder)
        self.granularity = granularity
        self.clamp = clamp  # None: unclamped coefficients (Concrete AdaMerging, AdaRank)
        self.keys = list(pretrained)
        self.num_tasks = len(task_vectors)
        # plain attributes, not buffers: the training scaffold is not part of any returned model
        self.theta0 = {k: pretrained[k].detach() for k in self.keys}
        self.tau = {k: torch.stack([tv[k].detach() for tv in task_vectors]) for k in self.keys}
        rows = len(self.keys) if granularity == "layer" else 1
        if isinstance(init, Tensor):
            init = init.detach().to(torch.float32).reshape(-1, self.num_tasks)
            if init.shape[0] == 1 and rows > 1:
                init = init.expand(rows, -1)
            if tuple(init.shape) != (rows, self.num_tasks):
                raise ValueError(f"initial coefficients have shape {tuple(init.shape)}, expected {(rows, self.num_tasks)}")
            raw = init.clone()
        else:
            raw = torch.full((rows, self.num_tasks), float(init))
        self.lambdas = nn.Parameter(raw.to(next(iter(self.theta0.values())).device))

    def coefficients(self) -> Tensor:
        """The coefficients, (n_tensors or 1, T), clamped to ``clamp`` (hard clamp: zero gradient outside)."""
        return self.lambdas if self.clamp is None else self.lambdas.clamp(*self.clamp)

    def combined_task_vector(self, key: str, coefficients: Tensor) -> Tensor:
        """sum_t c_t tau_t[key]; subclasses that build tau_t[key] another way (AdaRank's masked SVD) override it."""
        return torch.tensordot(coefficients.to(self.tau[key].dtype), self.tau[key], dims=1)

    def merged_weights(self, mask: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """theta_0 + sum_t c_t tau_t, or with ``mask`` (one tensor per key, shared by the tasks, as Concrete
        subspace learning): theta_0 + mask * sum_t c_t tau_t."""
        lam = self.coefficients()
        out = {}
        for j, k in enumerate(self.keys):
            delta = self.combined_task_vector(k, lam[j] if self.granularity == "layer" else lam[0])
            out[k] = self.theta0[k] + (delta if mask is None else mask[k] * delta)
        return out

    def forward(self, images: Tensor, weights: dict[str, Tensor] | None = None) -> Tensor:
        """Embeddings of the merged encoder (pass ``weights`` to reuse one merge for several batches)."""
        return functional_call(self.encoder, weights if weights is not None else self.merged_weights(), (images,))

    @torch.no_grad()
    def final_weights(self, mask: dict[str, Tensor] | None = None) -> Weights:
        return Weights({k: v.detach().clone() for k, v in self.merged_weights(mask).items()})

    def state(self, ties_k: float | None) -> "MergeState":
        return MergeState(self.granularity, self.coefficients().detach().clone(), ties_k)


@dataclass
class MergeState:
    """How a merged encoder was built from theta_0 and the task vectors (AdaMerging's result)."""

    granularity: Granularity
    coefficients: Tensor            # clamped, (n_tensors or 1, T), task order of the suite
    ties_k: float | None = None     # task vectors TIES-processed with this k (AdaMerging++), or raw
    extra: dict = field(default_factory=dict)


class AdaMergedModel(SharedModel):
    """A SharedModel that remembers its merge coefficients (a plain attribute, so it is not stored/counted)."""

    def __init__(self, encoder: nn.Module, merge_state: MergeState):
        super().__init__(encoder)
        self.merge_state = merge_state


def task_vectors_for(ctx, ties_k: float | None = None) -> list[Weights]:
    """The task vectors in task order: raw, or TIES trimmed + sign-elected (AdaMerging++), unmerged."""
    tvs = [ctx.task_vector(t) for t in ctx.tasks]
    if ties_k is None:
        return tvs
    from mergebench.methods.ties import ties_task_vectors

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
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()


def entropy_objective(ctx, merge: FunctionalMerge, weights: dict[str, Tensor], streams: dict[str, Iterator[Tensor]],
                      heads: dict[str, nn.Module], batches_per_task: int = 1) -> Tensor:
    """The test-time objective of AdaMerging and its descendants: the sum over tasks (``batches_per_task``
    batches each, drawn in task order) of each batch's mean prediction entropy under the merged encoder
    ``weights``. All batches go through the encoder in one pass (it is per-image, so this equals one pass
    per batch)."""
    tasks = [t for t in ctx.tasks for _ in range(batches_per_task)]
    batches = [next(streams[t]) for t in tasks]
    features = merge(torch.cat(batches), weights).split([len(b) for b in batches])
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
