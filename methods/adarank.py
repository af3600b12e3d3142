"""AdaRank (Lee et al., 2025): adaptive rank pruning of task vectors, learned at test time.

Every linear weight of the attention and MLP blocks has its task-vector delta decomposed,
tau_t[l] = U diag(s) V^T, and each singular component gets a binary keep mask per task and
layer. The masks (relaxed: sigmoid(logit / temperature), binarised in the forward pass with a
straight-through estimator) and layer-wise merge coefficients are trained together by Adam to
minimise the summed prediction entropy of every task's head on unlabeled test batches:

    theta[l] = origin[l] + sum_t lambda[l, t] U_t diag(s_t * mask_t) V_t^T

Other tensors (biases, LayerNorms, embeddings, projection) merge with lambda alone. On Task
Arithmetic the origin is theta_0; on CART it is the average of the experts and the task vectors
are theta_t - average, starting from their top 16% components.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from mergebench.engine.functional import FunctionalMerge
from mergebench.methods.adaptive import BF16_DEVIATION, minimize_entropy, unlabeled_streams
from mergebench.api.linalg import svd
from mergebench.api.registry import Paper, Variant, register_variants
from mergebench.api.shape_batches import same_shape_batches
from mergebench.api.weights import Weights

ADARANK = Paper("AdaRank: Adaptive Rank Pruning for Enhanced Model Merging", 2025, "2503.22178", "arXiv",
                "https://github.com/david3684/AdaRank")


def is_low_rank_key(key: str, tensor: Tensor) -> bool:
    """The official selection: matrices of the attention and MLP blocks, not LayerNorms or biases."""
    return ("attn" in key or "mlp" in key) and not ("ln" in key or "bias" in key) and tensor.dim() == 2


class RankMaskedMerge(FunctionalMerge):
    """A FunctionalMerge whose task vectors on the low-rank keys are rebuilt each step from their masked SVD."""

    def __init__(self, encoder: nn.Module, origin: Weights, task_vectors: list[Weights], prior: float,
                 initial_rank_ratio: float, temperature: float):
        if not 0 <= initial_rank_ratio <= 1:
            raise ValueError(f"initial_rank_ratio must be in [0, 1], got {initial_rank_ratio}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        super().__init__(encoder, origin, task_vectors, "layer", prior, clamp=None)  # official clamp_weights: false
        if initial_rank_ratio == 0:  # the official convention
            initial_rank_ratio = 1 / self.num_tasks
        self.temperature = temperature
        self.svd: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        self.mask_keys = [k for k in self.keys if is_low_rank_key(k, self.theta0[k])]
        if not self.mask_keys:
            raise ValueError("no attention/MLP weight matrices to decompose: AdaRank needs a transformer encoder")
        for keys, taus in same_shape_batches((k, self.tau.pop(k)) for k in self.mask_keys):  # [layers, T, m, n]
            for k, *factors in zip(keys, *svd(taus)):  # batched: layers, tasks
                self.svd[k] = tuple(factors)
        logits = []
        for k in self.mask_keys:
            s = self.svd[k][1]
            rank = s.shape[-1]
            init = torch.full((self.num_tasks, rank), 0.1, device=s.device)  # sigmoid(0.1 / temperature) > 0.5: kept
            init[:, int(rank * initial_rank_ratio):] = -0.1                  # pruned at the start
            logits.append(nn.Parameter(init))
        self.mask_logits = nn.ParameterList(logits)
        self._logit_index = {k: i for i, k in enumerate(self.mask_keys)}

    def keep_probabilities(self, key: str) -> Tensor:
        return (self.mask_logits[self._logit_index[key]] / self.temperature).sigmoid()

    def hard_mask(self, key: str) -> Tensor:
        """(T, rank) booleans: the singular components each task keeps."""
        return self.keep_probabilities(key) > 0.5

    def combined_task_vector(self, key: str, coefficients: Tensor) -> Tensor:
        if key not in self.svd:
            return super().combined_task_vector(key, coefficients)
        U, s, Vh = self.svd[key]
        p = self.keep_probabilities(key)
        # straight-through: the forward uses the binary mask, the gradient flows as if through p * s
        s_masked = p * s + (((p > 0.5).to(s.dtype) - p) * s).detach()
        T, out_dim, rank = U.shape
        left = U * (coefficients.to(s.dtype)[:, None] * s_masked)[:, None, :]   # lambda_t U_t diag(s_t m_t)
        return left.transpose(0, 1).reshape(out_dim, T * rank) @ Vh.reshape(T * rank, -1)

    @torch.no_grad()
    def selected_ranks(self) -> dict[str, Tensor]:
        """{key: (T,) kept singular components per task}."""
        return {k: self.hard_mask(k).sum(-1) for k in self.mask_keys}


def _block(key: str) -> str:
    found = re.search(r"resblocks\.(\d+)\.", key)
    return f"block{found.group(1)}" if found else key


DEFAULTS_SOURCE = (
    "official code (david3684/AdaRank, vision/configs/adarank_B_T8/adarank_{TA,CART}.yaml, hydra_default.yaml, "
    "vision/src/models/merge_vit/adaptive.py, vision/runner.py): Adam lr 1e-3, betas (0.9, 0.999), batch 16 "
    "(one batch per task per step, entropy summed over tasks), mask temperature 10, mask logits 0.1 (kept) / "
    "-0.1 (pruned) with a straight-through estimator, layer-wise coefficients trained jointly and not clamped; "
    "TA: prior 0.3, initial rank ratio 1.0; CART: prior 2.3, initial rank ratio 0.16, origin = the experts' "
    "average, 10000 steps (the official schedule)")

HELP = {
    "steps": "Adam steps on the masks and coefficients (official 10000)",
    "lr": "Adam learning rate (official 1e-3)",
    "prior": "initial layer-wise merge coefficient of every task (official: 0.3 on TA, 2.3 on CART)",
    "initial_rank_ratio": "fraction of each task vector's top singular components kept at the start "
                          "(official: 1.0 on TA, 0.16 on CART; 0 means 1/T)",
    "temperature": "mask temperature: keep probability sigmoid(logit / temperature) (official 10)",
    "batch_size": "unlabeled test images per task per step (official 16)",
}

NOTES = """

    Budget: the official 10000 steps of 16 unlabeled test images per task (``--budget smoke``: 2).
    With lr 1e-3 and logits starting at +-0.1, Adam can move a logit by up to about 10 over the
    schedule. Deviations from the official code: the official runner evaluates on the labeled test
    set every 500 steps and reports the best checkpoint; mergebench uses no labels and returns the
    final masks (binarised, as in the forward pass). Coefficients cover the encoder's own floating-point tensors. The data is the test
    split through ``ctx.unlabeled`` (shuffled, seeded by the run's seed). The kept ranks per task and
    transformer block are logged (``kept_ranks``, ``kept_fraction``). The result is one plain encoder
    (0 added parameters).
""" + BF16_DEVIATION


@register_variants({
    "adarank": Variant(
        "AdaRank (TA)", fixed={"origin": "pretrained"},
        doc="""AdaRank on Task Arithmetic: per task and attention/MLP matrix, a learned binary mask over the singular
    components of tau_t, trained with layer-wise coefficients by test-time entropy minimisation;
    theta = theta_0 + sum_t lambda_t U_t diag(s_t * mask_t) V_t^T."""),
    "adarank_cart": Variant(
        "AdaRank (CART)", fixed={"origin": "average"}, defaults={"prior": 2.3, "initial_rank_ratio": 0.16},
        doc="""AdaRank on CART: origin = average of the experts, tau_t = theta_t - average, masks starting from the top
    16% singular components of each; theta = average + sum_t lambda_t U_t diag(s_t * mask_t) V_t^T."""),
}, notes=NOTES, paper=ADARANK, needs="unlabeled", family="test-time adaptation", defaults_source=DEFAULTS_SOURCE,
   hyperparameter_help=HELP, paper_budget={"steps": 10000, "batch_size": 16}, smoke={"steps": 2},
   ranges={"steps": "[1, inf)", "lr": "(0, inf)", "initial_rank_ratio": "(0, 1]", "temperature": "(0, inf)",
           "batch_size": "[1, inf)"})
def adarank(ctx, origin: str, steps: int = 10000, lr: float = 1e-3, prior: float = 0.3,
            initial_rank_ratio: float = 1.0, temperature: float = 10.0, batch_size: int = 16) -> nn.Module:
    """AdaRank around ``origin``: the pretrained weights (Task Arithmetic) or the experts' average (CART)."""
    key = "adarank" if origin == "pretrained" else "adarank_cart"
    streams = unlabeled_streams(ctx, batch_size)  # first: a context without data fails before any work
    if origin == "average":  # CART: centre on the experts' average
        experts = [ctx.expert_weights(t) for t in ctx.tasks]
        theta = sum(experts) / len(experts)
        task_vectors = [e - theta for e in experts]
    else:
        theta, task_vectors = ctx.pretrained_weights, [ctx.task_vector(t) for t in ctx.tasks]
    merge = RankMaskedMerge(ctx.encoder(), theta, task_vectors, prior, initial_rank_ratio, temperature)
    del task_vectors
    params = [merge.lambdas, *merge.mask_logits]
    minimize_entropy(ctx, merge, params, steps=steps, lr=lr, streams=streams, desc=key.replace("_", " "), log_key=key)
    ranks = merge.selected_ranks()
    for i, t in enumerate(ctx.tasks):
        kept = sum(r[i].item() for r in ranks.values())
        full = sum(merge.svd[k][1].shape[-1] for k in ranks)
        ctx.log(f"{key}/kept_fraction/{t}", kept / full)
        per_block: dict[str, int] = {}
        for k, r in ranks.items():
            per_block[_block(k)] = per_block.get(_block(k), 0) + int(r[i].item())
        for block, n in per_block.items():
            ctx.log(f"{key}/kept_ranks/{t}/{block}", n)
        ctx.log(f"{key}/lambda_mean/{t}", merge.lambdas[:, i].mean().item())
    return ctx.shared_model(merge.final_weights())
