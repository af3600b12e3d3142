"""DARE (drop and rescale) as a preprocessing of the task vectors for a data-free merge (Task Arithmetic, TIES)."""

from __future__ import annotations

import torch

from mergebench.context import MergeContext
from mergebench.pipeline import MethodCall
from mergebench.registry import HyperparameterError, Paper, get_method, register_method
from mergebench.weights import Weights

DARE = Paper("Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch", 2024,
             "2311.03099", "ICML", "https://github.com/yule-BUAA/MergeLM")


def dare_drop(tensor: torch.Tensor, p: float, generator: torch.Generator, rescale: bool = True) -> torch.Tensor:
    """m ⊙ tensor / (1 - p) with m ~ Bernoulli(1 - p) per element (drawn on the CPU generator, reproducibly)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"DARE drop rate p must be in [0, 1), got {p}")
    keep = torch.rand(tensor.shape, generator=generator) >= p
    out = tensor * keep.to(tensor.device)
    return out / (1.0 - p) if rescale else out


class DareContext(MergeContext):
    """The caller's context, except that each expert is theta_0 + DARE(tau_t).

    It shares the caller's state (its data accounting and logs land in the same record). Everything a
    data-free method reads -- ``expert_weights``, ``per_tensor``, ``task_vector(s)``, ``expert_encoder`` --
    derives from ``_expert_tensors``, so overriding it is enough.
    """

    def __init__(self, ctx: MergeContext, p: float, rescale: bool):
        self.__dict__.update(ctx.__dict__)
        self._dare_p, self._dare_rescale, self._dare_experts = p, rescale, {}

    def _expert_tensors(self, task: str) -> Weights:
        if task not in self._dare_experts:
            tau = super()._expert_tensors(task).to(self.device) - self.pretrained_weights
            g = torch.Generator().manual_seed(self.seed * 7919 + 17 * self.tasks.index(task) + 1)
            dropped = Weights({k: dare_drop(v, self._dare_p, g, self._dare_rescale) for k, v in tau.items()})
            self._dare_experts[task] = self.pretrained_weights + dropped
        return self._dare_experts[task]


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
    runs that method through the harness with a context whose experts are theta_0 + DARE(tau_t). The masks are drawn
    from a generator seeded by the run's seed and the task, so a run is reproducible.

    Deviation: ``merge`` is a free string in the record (``dare(merge='ties_merging')`` and
    ``dare(merge='ties_merging(k=20.0)')`` are the same merge but two configurations).
    """
    call = MethodCall.parse(merge).resolve()
    spec = get_method(call.name)
    if spec.is_addon or spec.needs != "nothing" or call.name == "dare":
        raise HyperparameterError(f"dare(merge=...) needs a data-free, non-add-on merge method; {call.name!r} is "
                                  f"{'an add-on' if spec.is_addon else 'needs=' + spec.needs}")
    from mergebench.run import execute  # through the harness: the method's result is checked as any run's

    return execute(call, DareContext(ctx, p, rescale))
