"""AdaMerging (Yang et al., ICLR 2024): merge coefficients learned by entropy minimisation at test time.

theta(lambda) = theta_0 + sum_t clamp(lambda_t, 0, 1) * tau_t with one lambda per task
(task-wise) or one per parameter tensor per task (layer-wise), trained with Adam to minimise
the Shannon entropy of every task's head on unlabeled test batches. The ++ variants run the
same loop on TIES-processed task vectors (trimmed to the top-k % globally, sign-elected,
disjoint; each task keeps its own vector and lambda).
"""

from __future__ import annotations

from mergebench.methods.adaptive import (
    BF16_DEVIATION, TWO_BATCH_BUDGET, TWO_BATCH_SMOKE, functional_merge, minimize_entropy, unlabeled_streams,
)
from mergebench.api.models import AdaMergedModel, freeze
from mergebench.api.registry import Paper, Variant, register_variants

ADAMERGING = Paper("AdaMerging: Adaptive Model Merging for Multi-Task Learning", 2024, "2310.02575", "ICLR",
                   "https://github.com/EnnengYang/AdaMerging")

DEFAULTS_SOURCE = (
    "official code (EnnengYang/AdaMerging, src/main_{task,layer}_wise_adamerging*.py): Adam lr 1e-3, "
    "betas (0.9, 0.999), no weight decay, lambda prior 0.3, clamp [0, 1], batch 16, two batches per task per "
    "step, entropy summed over the 16 batch means, 500 steps (epochs = 500 in main_{task,layer}_wise_adamerging.py; "
    "the paper's schedule); ++: TIES k=20 (dis-sum tvs)")

HELP = {
    "steps": "Adam steps on the coefficients (official 500)",
    "lr": "Adam learning rate (official 1e-3)",
    "init": "initial lambda of every task (official prior 0.3)",
    "batch_size": "unlabeled test images per batch (official 16)",
    "batches_per_task": "batches of each task per step (official 2: the loop breaks after i=1)",
    "k": "TIES trimming: percent of each task vector kept by magnitude over the whole model (official 20)",
}


NOTES = """

    Budget: the official 500 Adam steps of 2 x 16 unlabeled test images per task (``--budget smoke``:
    2 steps). Deviations from the official code: the coefficients are over the encoder's own tensors
    only (152 for ViT-B/32; the official code's 158 rows include 6 text-side leftovers that get no
    gradient and stay at 0.3). The data is the test split through ``ctx.unlabeled`` (shuffled,
    seeded by the run's seed), as the paper.
    The trained coefficients ride along on the returned model (``merge_state``, not stored as
    tensors: the merged model is one plain encoder, 0 added parameters), so that an add-on such
    as ``intervmerge(joint=True)`` can keep training them.
""" + BF16_DEVIATION


@register_variants({
    "adamerging_taskwise": Variant(
        "AdaMerging (task-wise)", fixed={"granularity": "task", "k": None},
        doc="""Task-wise AdaMerging: one coefficient per task, theta = theta_0 + sum_t clamp(l_t, 0, 1) tau_t, trained to
    minimise the summed prediction entropy of every task's head on unlabeled test batches."""),
    "adamerging_layerwise": Variant(
        "AdaMerging (layer-wise)", fixed={"granularity": "layer", "k": None},
        doc="""Layer-wise AdaMerging: one coefficient per parameter tensor per task (weight and bias separately, as
    the official code), theta[j] = theta_0[j] + sum_t clamp(l[j,t], 0, 1) tau_t[j], trained by entropy
    minimisation on unlabeled test batches."""),
    "adamerging_taskwise_pp": Variant(
        "AdaMerging++ (task-wise)", fixed={"granularity": "task"},
        doc="""Task-wise AdaMerging++: task-wise AdaMerging on TIES-processed task vectors (top-k % trimmed over the
    whole model, sign elected, entries disagreeing with the elected sign dropped; one lambda per task)."""),
    "adamerging_layerwise_pp": Variant(
        "AdaMerging++ (layer-wise)", fixed={"granularity": "layer"},
        doc="""Layer-wise AdaMerging++: layer-wise AdaMerging on TIES-processed task vectors (top-k % trimmed over the
    whole model, sign elected, disjoint; one lambda per parameter tensor per task)."""),
}, notes=NOTES, paper=ADAMERGING, needs="unlabeled", family="test-time adaptation", defaults_source=DEFAULTS_SOURCE,
   hyperparameter_help=HELP, paper_budget=TWO_BATCH_BUDGET, smoke=TWO_BATCH_SMOKE,
   ranges={"steps": "[1, inf)", "lr": "(0, inf)", "init": "[0, inf)", "batch_size": "[1, inf)",
           "batches_per_task": "[1, inf)", "k": "(0, 100]"})
def adamerging(ctx, granularity: str, steps: int = 500, lr: float = 1e-3, init: float = 0.3, batch_size: int = 16,
               batches_per_task: int = 2, k: float = 20.0) -> AdaMergedModel:
    """AdaMerging at ``granularity``, on TIES-processed task vectors with top-``k`` trimming (++) or raw (k None).
    The official loop (:func:`minimize_entropy`): the loss is the sum of each batch's mean entropy."""
    streams = unlabeled_streams(ctx, batch_size)  # first: a context without data fails before any work
    fm = functional_merge(ctx, granularity, init, k)
    name = f"AdaMerging{'++' if k is not None else ''} ({granularity}-wise)"
    key = f"adamerging_{granularity}wise{'_pp' if k is not None else ''}"
    minimize_entropy(ctx, fm, [fm.lambdas], steps=steps, lr=lr, streams=streams, batches_per_task=batches_per_task,
                     desc=name, log_key=key)
    lam = fm.coefficients().detach()
    for i, t in enumerate(ctx.tasks):
        ctx.log(f"{key}/lambda_mean/{t}", lam[:, i].mean().item())
    return AdaMergedModel(freeze(ctx.encoder(fm.final_weights())), fm.state(k))
