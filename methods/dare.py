"""DARE (drop and rescale) as a preprocessing of the task vectors for a data-free merge (Task Arithmetic, TIES)."""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from mergebench.api.context import MergeContext
from mergebench.api.pipeline import MethodCall
from mergebench.api.registry import HyperparameterError, Paper, get_method, register_method
from mergebench.api.weights import Weights, cache_sized_parts
from mergebench.engine.execution import execute

DARE = Paper("Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch", 2024,
             "2311.03099", "ICML", "https://github.com/yule-BUAA/MergeLM")

MASK_LEVELS = 1 << 16   # the drop decision compares a uniform 16-bit integer with round(p * 2^16)


def drop_mask(numel: int, p: float, rng: np.random.Generator) -> Tensor | None:
    """Which of ``numel`` elements DARE drops (a flat bool tensor on the CPU; None when none can be), drawn from
    ``rng`` (numpy): each element independently with probability p.

    An element is dropped when a uniform 16-bit integer is below round(p * 2^16): the drop rate is p exactly for
    multiples of 2^-16 (0.5, the default, 0.25, ...) and within 2^-17 of p otherwise. Four draws of 16 bits cost
    one 64-bit step of the generator, a quarter of ``torch.rand``'s (the mask draw is most of DARE's time).
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"DARE drop rate p must be in [0, 1), got {p}")
    threshold = round(p * MASK_LEVELS)
    if not threshold:
        return None
    return torch.from_numpy(rng.integers(0, MASK_LEVELS, size=numel, dtype=np.uint16) < threshold)


def rescaled_drop_(tau: Tensor, drop: Tensor | None, p: float, rescale: bool = True) -> Tensor:
    """m ⊙ tau / (1 - p) in place, m = not ``drop`` (flat, as ``tau.view(-1)``; None: keep everything)."""
    if drop is not None:
        tau.view(-1).masked_fill_(drop.to(tau.device), 0.0)
    return tau.div_(1.0 - p) if rescale else tau


def dare_drop_(tensor: Tensor, p: float, rng: np.random.Generator, rescale: bool = True) -> Tensor:
    """m ⊙ tensor / (1 - p) in place, m ~ Bernoulli(1 - p) per element (``drop_mask``)."""
    return rescaled_drop_(tensor, drop_mask(tensor.numel(), p, rng), p, rescale)


class DareContext(MergeContext):
    """The caller's context, except that each expert is theta_0 + DARE(tau_t), computed when it is read.

    It shares the caller's state (its data accounting and logs land in the same record). The streaming accessors
    (``per_tensor``, hence ``task_vector_stacks``) drop one tensor of each expert at a time; the whole-model ones
    (``expert_weights``, ``task_vector(s)``, ``expert_encoder``) assemble the same tensors. Each tensor's mask
    comes from its own generator, seeded by the run's seed, the task and the tensor, so the masks are the same
    whichever accessor reads them, in whatever order, and nothing dropped is kept between reads.
    """

    def __init__(self, ctx: MergeContext, p: float, rescale: bool):
        self.__dict__.update(ctx.__dict__)
        self._dare_p, self._dare_rescale = p, rescale
        self._dare_keys = {k: i for i, k in enumerate(self.pretrained_weights)}

    def _mask_rng(self, task: str, key: str) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64([self.seed, self.tasks.index(task), self._dare_keys[key]]))

    def _dropped_expert(self, task: str, key: str, theta0: Tensor, expert: Tensor) -> Tensor:
        """theta_0 + DARE(theta_t - theta_0) of one tensor (a new tensor), computed in cache-sized parts."""
        drop = drop_mask(theta0.numel(), self._dare_p, self._mask_rng(task, key))
        out = torch.empty_like(theta0, memory_format=torch.contiguous_format)
        pieces = (out, theta0, expert.to(self.device)) + (() if drop is None else (drop.to(self.device),))
        for part, base, theta_t, *dropped in cache_sized_parts(*pieces):
            torch.sub(theta_t, base, out=part)
            rescaled_drop_(part, dropped[0] if dropped else None, self._dare_p, self._dare_rescale).add_(base)
        return out

    def per_tensor(self, keys: Iterable[str] | None = None,
                   tasks: Sequence[str] | None = None) -> Iterator[tuple[str, Tensor, list[Tensor]]]:
        theta0 = self.pretrained_weights
        tasks = list(self.tasks if tasks is None else tasks)
        stored = [MergeContext._expert_tensors(self, t) for t in tasks]
        for key in (theta0 if keys is None else keys):
            yield key, theta0[key], [self._dropped_expert(t, key, theta0[key], e[key]) for t, e in zip(tasks, stored)]

    def _expert_tensors(self, task: str) -> Weights:
        return Weights({key: experts[0] for key, _, experts in self.per_tensor(tasks=[task])})


@register_method(
    "dare", display_name="DARE", family="data-free", paper=DARE,
    defaults_source="p 0.5 with rescaling on all parameters, merged by Task Arithmetic (scaling 0.3): fusion_bench "
                    "config/method/dare/task_arithmetic.yaml; DARE-TIES is dare(merge='ties_merging(scaling=0.5)') "
                    "(fusion_bench dare/ties_merging.yaml: p 0.5, TIES k 20, sum, scaling 0.5)",
    hyperparameter_help={"p": "drop rate of each task-vector element",
                         "merge": "the data-free method spec that merges the DARE'd task vectors, e.g. "
                                  "'task_arithmetic' or 'ties_merging(scaling=0.5)'",
                         "rescale": "divide kept entries by 1 - p (DARE); False is plain random drop"},
    ranges={"p": "[0, 1)"})
def dare(ctx, p: float = 0.5, merge: str = "task_arithmetic", rescale: bool = True):
    """tau_t <- m_t ⊙ tau_t / (1 - p), m_t ~ Bernoulli(1 - p) elementwise; then the ``merge`` method on those.

    DARE acts on the task vectors *before* the base merge, so it cannot be an add-on of the harness (a ``base``
    hyperparameter receives the base's finished model). Instead ``merge`` names a data-free method spec; DARE
    runs that method through the harness with a context whose experts are theta_0 + DARE(tau_t), dropped tensor
    by tensor as the method reads them (a streaming merge then holds one tensor across the experts at a time).
    The masks are drawn from generators seeded by the run's seed, the task and the tensor, so a run is
    reproducible.

    Deviations: ``merge`` is a free string in the record (``dare(merge='ties_merging')`` and
    ``dare(merge='ties_merging(k=20.0)')`` are the same merge but two configurations). The drop rate is realised
    to 2^-16 (``dare_drop_``: exact at the default 0.5).
    """
    call = MethodCall.parse(merge).resolve()
    spec = get_method(call.name)
    if spec.is_addon or spec.needs != "nothing" or call.name == "dare":
        raise HyperparameterError(f"dare(merge=...) needs a data-free, non-add-on merge method; {call.name!r} is "
                                  f"{'an add-on' if spec.is_addon else 'needs=' + spec.needs}")

    return execute(call, DareContext(ctx, p, rescale))
