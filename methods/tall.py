"""TALL masks and Consensus merging: per-task masks over the multi-task vector, and consensus pruning."""

from __future__ import annotations

from typing import Literal

import copy

import torch

from mergebench.methods.ties import disjoint_merge, elect_sign, trim_top_k
from mergebench.api.models import MergedModel, freeze
from mergebench.api.registry import Paper, Variant, register_method, register_variants
from mergebench.api.weights import Weights

TALL = Paper("Localizing Task Information for Improved Model Merging and Compression", 2024, "2405.07813", "ICML",
             "https://github.com/nik-dim/tall_masks")
LAMBDA_GRID = (0.2, 0.3, 0.4, 0.5, 0.6)
ALPHA_GRID = tuple(round(0.1 * i, 1) for i in range(1, 11))  # official np.linspace(0, 1, n_eval_points // 2 + 1)[1:]


def first_best(grid, scores: dict) -> float:
    """The grid value with the highest score, the smallest on ties: the official code's ``max(d, key=d.get)``
    (TALL lambda_t) and ``find_optimal_coef`` (strict ``>``, alpha) both keep the first best of an ascending grid."""
    return max(grid, key=scores.__getitem__)


def multitask_vector(flat_tvs: torch.Tensor, base: str) -> torch.Tensor:
    """tau_MTL: the unscaled sum of the task vectors ('ta') or TIES' merged vector (k=20, disjoint sum)."""
    if base == "ta":
        return flat_tvs.sum(0)
    trimmed = trim_top_k(flat_tvs, 20)
    sign = elect_sign(trimmed)
    return disjoint_merge(trimmed, sign, "sum")


def tall_mask(flat_tv: torch.Tensor, mtl: torch.Tensor, lam: float) -> torch.Tensor:
    """m_t = |tau_t| > lam * |tau_MTL - tau_t| (elementwise): where task t dominates the other tasks' sum."""
    return flat_tv.abs() > lam * (mtl - flat_tv).abs()


# the official selection runs on the whole validation split: 10% of the training set, at most 5000 images
# (nik-dim/tall_masks src/datasets/registry.py max_val_samples); a suite's smaller split is used whole
VAL_BUDGET = {"val_images": 5000}
VAL_SMOKE = {"val_images": 16}


def _val_sets(ctx, val_images: int) -> dict:
    """{task: (images, labels)}: ``val_images`` fixed labeled images of each task's validation split."""
    return {task: ctx.exemplars(task, n=val_images, split="val", labels=True) for task in ctx.tasks}


def _val_accuracy(ctx, encoder, task: str, val: dict) -> float:
    images, labels = val[task]
    head = ctx.head(task)
    correct = 0
    with torch.no_grad():
        for x, y in zip(images.split(256), labels.split(256)):
            correct += (head(encoder(x)).argmax(-1) == y).sum().item()
    return correct / len(labels)


def _masks(ctx, base: str, lam: float | None, val: dict | None):
    """(tau_MTL flat, {task: bool mask}, {task: lambda}, template Weights); lam=None selects lambda_t on ``val``."""
    tvs = ctx.task_vectors()
    template = next(iter(tvs.values()))
    flat = torch.stack([tv.flatten() for tv in tvs.values()])
    mtl = multitask_vector(flat, base)
    masks, chosen = {}, {}
    encoder = ctx.encoder()
    theta0 = ctx.pretrained_weights
    for i, task in enumerate(ctx.tasks):
        if lam is not None:
            chosen[task] = lam
        else:
            scores = {}
            for candidate in LAMBDA_GRID:
                m = tall_mask(flat[i], mtl, candidate)
                weights = theta0 + template.unflatten(torch.where(m, mtl, torch.zeros_like(mtl)))
                encoder.load_state_dict(weights, strict=False)
                scores[candidate] = _val_accuracy(ctx, encoder, task, val)
            chosen[task] = first_best(LAMBDA_GRID, scores)
            ctx.log(f"tall_lambda/{task}", chosen[task])
        masks[task] = tall_mask(flat[i], mtl, chosen[task])
    return mtl, masks, chosen, template


class TallMaskModel(MergedModel):
    """theta_0 (the backbone), tau_MTL (one float vector) and one bit-packed bool mask per task.

    ``forward(images, task)`` runs theta_0 + m_task ⊙ tau_MTL. Those weights are decompressed into a working
    copy of the encoder that is kept outside the module's state (a cache, rebuilt when the task changes; it is
    not stored model state, so it is not counted as parameters).
    """

    def __init__(self, encoder: torch.nn.Module, template: Weights, mtl: torch.Tensor, masks: dict):
        super().__init__()
        self.encoder = freeze(encoder)
        self.tasks = list(masks)
        self._layout = [(k, tuple(v.shape), v.numel()) for k, v in template.items()]  # python ints
        self.register_buffer("tau_mtl", mtl.detach().clone())
        for i, task in enumerate(self.tasks):
            self.register_buffer(f"mask_{i}", masks[task].detach().clone())
        object.__setattr__(self, "_work", None)      # not a submodule: a decompression cache
        object.__setattr__(self, "_work_task", None)

    def task_encoder(self, task: str) -> torch.nn.Module:
        device = self.tau_mtl.device
        if self._work is None or next(self._work.parameters()).device != device:
            object.__setattr__(self, "_work", freeze(copy.deepcopy(self.encoder)).to(device))
            object.__setattr__(self, "_work_task", None)
        if self._work_task != task:
            mask = getattr(self, f"mask_{self.tasks.index(task)}")
            delta = torch.where(mask, self.tau_mtl, torch.zeros_like(self.tau_mtl))
            base, work = dict(self.encoder.named_parameters()), dict(self._work.named_parameters())
            start = 0
            with torch.no_grad():
                for k, shape, n in self._layout:
                    work[k].copy_(base[k] + delta[start:start + n].view(shape))
                    start += n
            object.__setattr__(self, "_work_task", task)
        return self._work

    def forward(self, images, task):
        return self.task_encoder(task)(images)


@register_method(
    "tall_masks", display_name="TALL masks", family="data-free (masks)", paper=TALL, needs="labeled",
    adds_params=True,
    defaults_source="tau_MTL = Task Arithmetic's unscaled sum and lambda_t chosen per task on its validation "
                    "accuracy from {0.2, ..., 0.6}: nik-dim/tall_masks (config tall_mask, src/utils/"
                    "tallmask_utils.py) on the whole validation split (src/datasets/registry.py: 10% of the "
                    "training set, at most 5000 images: val_images=5000); lam=0.6 fixes it without validation data "
                    "(fusion_bench tall_mask config)",
    hyperparameter_help={"lam": "lambda_t for every task; None selects it per task on the val split",
                         "mtl": "'ta': tau_MTL = sum of task vectors; 'ties': TIES(k=20, sum)",
                         "val_images": "validation images per task used to select lambda_t (at most the split; "
                                       "official: the whole split, capped at 5000)"},
    paper_budget=VAL_BUDGET, smoke=VAL_SMOKE,
    ranges={"lam": "[0, inf)", "val_images": "[1, inf)"})
def tall_masks(ctx, lam: float | None = None, mtl: Literal["ta", "ties"] = "ta", val_images: int = 5000):
    """Per-task models theta_0 + m_t ⊙ tau_MTL with m_t = |tau_t| > lambda_t |tau_MTL - tau_t| (all parameters).

    The merged model stores theta_0, tau_MTL and T bool masks (counted as bits) and routes by task in
    ``forward(images, task)``: a compression of the experts, not a single merged model. lambda_t is chosen per
    task on that task's validation accuracy (labeled val split) unless ``lam`` fixes it; on tied accuracy the
    smallest lambda_t is taken, as the official selection does.
    """
    flat_mtl, masks, _, template = _masks(ctx, mtl, lam, None if lam is not None else _val_sets(ctx, val_images))
    return TallMaskModel(ctx.encoder(), template, flat_mtl, masks)


def tune_alpha(ctx, delta: Weights, val: dict) -> float:
    """alpha from ALPHA_GRID maximising the average normalized validation accuracy of theta_0 + alpha * delta.

    As the official ``find_optimal_coef(val_metrics, metric="avg_normalized_top1")``; each task's accuracy is
    normalized by its expert's accuracy on the same validation images (the official code divides by the experts'
    stored test accuracies, which a method here does not see).
    """
    expert = {task: _val_accuracy(ctx, ctx.expert_encoder(task), task, val) for task in ctx.tasks}
    encoder, theta0, scores = ctx.encoder(), ctx.pretrained_weights, {}
    for alpha in ALPHA_GRID:
        encoder.load_state_dict(theta0 + alpha * delta, strict=False)
        scores[alpha] = sum(_val_accuracy(ctx, encoder, task, val) / max(expert[task], 1e-12)
                            for task in ctx.tasks) / len(ctx.tasks)
        ctx.log(f"consensus_val_norm_acc/{alpha}", scores[alpha])
    return first_best(ALPHA_GRID, scores)


CONSENSUS_HELP = {"k": "keep weights that at least k TALL masks select (k=2 drops selfish and catastrophic weights)",
                  "scaling": "alpha applied to the pruned multi-task vector; None selects it on the val split from "
                             "{0.1, ..., 1.0} (average normalized accuracy, the smallest on ties)",
                  "lam": "lambda_t of the TALL masks; None selects it per task on the val split",
                  "val_images": "validation images per task used to select lambda_t and alpha (at most the split; "
                                "official: the whole split, capped at 5000)"}


@register_variants({
    "consensus_ta": Variant(
        "Consensus Merging (TA)", fixed={"mtl": "ta"},
        doc="""theta = theta_0 + alpha * ([sum_t m_t >= k] ⊙ tau_MTL), tau_MTL = sum_t tau_t, m_t the TALL masks.

    alpha (``scaling=None``) is chosen on the labeled val split as the official code does; deviation: each task's
    val accuracy is normalized by its expert's accuracy on the same val images, not by stored test accuracies.
    """,
        register={"defaults_source": (
            "k 2 and TALL lambda_t selected per task on val from {0.2..0.6}: nik-dim/tall_masks "
            "config/method/consensus.yaml (prun_thre_k 2); alpha selected on val over {0.1..1.0} by average "
            "normalized accuracy: src/eval/eval_utils.py + src/utils/utils.py find_optimal_coef "
            "(n_eval_points 21 in config/config.yaml); both on the whole validation split (at most 5000 "
            "images: src/datasets/registry.py)")}),
    "consensus_ties": Variant(
        "Consensus Merging (TIES)", fixed={"mtl": "ties"},
        doc="""theta = theta_0 + alpha * ([sum_t m_t >= k] ⊙ tau_TIES), m_t the TALL masks built against tau_TIES.

    alpha as in ``consensus_ta`` (selected on the val split unless ``scaling`` fixes it).
    """,
        register={"defaults_source": (
            "k 2 and TALL lambda_t selected per task on val from {0.2..0.6}: nik-dim/tall_masks "
            "config/method/consensus.yaml; tau_MTL = TIES (k 20, disjoint sum); alpha selected on val over "
            "{0.1..1.0} by average normalized accuracy: src/eval/eval_utils.py + src/utils/utils.py "
            "find_optimal_coef; both on the whole validation split (at most 5000 images)")}),
}, family="data-free (masks)", paper=TALL, needs="labeled", hyperparameter_help=CONSENSUS_HELP,
   paper_budget=VAL_BUDGET, smoke=VAL_SMOKE,
   ranges={"k": "[0, inf)", "scaling": "[0, inf)", "lam": "[0, inf)", "val_images": "[1, inf)"})
def consensus(ctx, mtl: Literal["ta", "ties"], k: int = 2, scaling: float | None = None, lam: float | None = None,
              val_images: int = 5000):
    """Consensus merging on tau_MTL of kind ``mtl``: the TALL masks' votes keep the weights at least ``k`` tasks
    select; alpha is selected on the val split unless ``scaling`` fixes it."""
    val = _val_sets(ctx, val_images) if lam is None or scaling is None else None
    flat_mtl, masks, _, template = _masks(ctx, mtl, lam, val)
    votes = torch.stack(list(masks.values())).sum(0)
    kept = votes >= k
    ctx.log("consensus_kept_fraction", kept.float().mean().item())
    delta = template.unflatten(torch.where(kept, flat_mtl, torch.zeros_like(flat_mtl)))
    if scaling is None:
        scaling = tune_alpha(ctx, delta, val)
        ctx.log("consensus_alpha", scaling)
    return ctx.shared_model(ctx.pretrained_weights + scaling * delta)
