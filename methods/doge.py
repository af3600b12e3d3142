"""DOGE (Wei et al., ICML 2025): data-free adaptive projective gradient descent on the task vectors.

Merging is posed as: make the merged model's task vector tau_m close to each expert's on that expert's own
inputs, with the layer inputs replaced by the task vectors themselves (data-free). A modification vector
delta, shared by all tasks, is added to every task vector and optimized by Adam per linear layer; its
gradient is projected onto the orthogonal complement of a subspace shared by all tasks (so that the shared
knowledge is left alone); the merging coefficients are task- and layer-wise, lambda_t^l = lamda / ||tau_t^l||
(coefficients as adaptive learning rates). The result is Task Arithmetic on the modified, top-K-masked task
vectors: ``doge`` is the paper's DOGE TA (the data-free row of its main tables).
"""

from __future__ import annotations

import torch

from mergebench.api.activations import is_block_linear_weight
from mergebench.api.linalg import svd, top_singular
from mergebench.methods.ties import trim_top_k
from mergebench.api.registry import Paper, register_method
from mergebench.api.weights import Weights

DOGE = Paper("Modeling Multi-Task Model Merging as Adaptive Projective Gradient Descent", 2025, "2501.01230",
             "ICML", "https://github.com/WalkerWorldPeace/DOGE")

DEFAULTS_SOURCE = (
    "fusion_bench (tanganke/fusion_bench, method/doge_ta/doge_ta.py and config/method/doge_ta/doge_ta.yaml; "
    "Anke Tang is a co-author of the paper, the official repository WalkerWorldPeace/DOGE could not be read "
    "here): lamda 0.07 (lambda_t^l = 0.07 / ||tau_t^l||), subspace 6 (shared basis of min(m, n) / 6 left "
    "singular vectors per layer, each task contributing its top min(m, n) / T), K 30 (top-30 % of each task "
    "vector kept), Adam lr 1e-4, 400 steps per layer, delta initialized at 0, only the linear weights of the "
    "transformer blocks merged (the rest stays at theta_0)")

HELP = {
    "steps": "Adam steps on delta per layer (official 400)",
    "lr": "Adam learning rate on delta (official 1e-4)",
    "lamda": "lambda_t^l = lamda / ||tau_t^l||_F (official 0.07)",
    "subspace": "the shared subspace keeps min(m, n) / subspace directions per layer (official 6)",
    "k": "percent of each task vector kept by magnitude over all merged layers (official 30)",
}


def linear_units(task_vectors: list[Weights]) -> list[tuple[str, int, int]]:
    """The matrices DOGE works on: (key, chunk, n_chunks) for each block linear weight.

    open_clip fuses q, k and v into one ``in_proj_weight`` [3d, d]; the official code runs on Hugging Face
    CLIP, whose q/k/v projections are separate matrices, so the fused weight is treated as its three chunks.
    """
    units = []
    for key in task_vectors[0]:
        if is_block_linear_weight(key):
            n = 3 if key.endswith("attn.in_proj_weight") else 1
            units.extend((key, i, n) for i in range(n))
    if not units:
        raise ValueError("DOGE found no transformer-block linear weights to merge (expected open_clip "
                         "'transformer.resblocks.*' attn/mlp weights)")
    return units


def unit_tensor(weights: Weights, unit: tuple[str, int, int]) -> torch.Tensor:
    key, i, n = unit
    return weights[key].chunk(n, 0)[i]


def shared_subspace_projector(task_matrices: torch.Tensor, subspace: float) -> torch.Tensor:
    """P = U U^T over the top min(m, n) / subspace left singular directions shared by the tasks, [..., m, m].

    Each task contributes its top int(min(m, n) / T) left singular vectors; their concatenation is
    decomposed again and its leading directions span the shared subspace (official construction).
    """
    t = task_matrices.float()
    num, m, n = t.shape[-3:]
    r = min(m, n)
    per_task = r // num
    stacked = torch.zeros(*t.shape[:-3], m, r, dtype=t.dtype, device=t.device)
    if per_task > 0:
        u = top_singular(t, per_task)[0]                                 # [..., T, m, per_task]
        cols = u.transpose(-3, -2).reshape(*t.shape[:-3], m, num * per_task)
        stacked[..., : num * per_task] = cols
    basis = svd(stacked)[0][..., : int(r / subspace)]
    return basis @ basis.transpose(-1, -2)


def project_off(grad: torch.Tensor, projector: torch.Tensor) -> torch.Tensor:
    """g - P g: the part of a gradient ``[..., m, n]`` outside the shared subspace (``projector`` ``[..., m, m]``)."""
    return grad - projector @ grad


def doge_loss(task_matrices: torch.Tensor, delta: torch.Tensor, lambdas: torch.Tensor) -> torch.Tensor:
    """sum_t || rowsum( tau_t * (tau_t - sum_i lambda_i (tau_i + delta)) ) ||^2, summed over layers.

    Shapes: task_matrices ``[..., T, m, n]``, delta ``[..., m, n]``, lambdas ``[..., T]``. The row sums of
    tau_t * (tau_t - tau_m) are the official data-free stand-in for the gap (tau_t - tau_m) x on task t's inputs.
    """
    lam = lambdas[..., None, None]
    merged = (lam * task_matrices).sum(-3) + lambdas.sum(-1)[..., None, None] * delta
    gap = task_matrices * (task_matrices - merged.unsqueeze(-3))
    return gap.sum(-1).pow(2).sum()


def optimize_delta(task_matrices: torch.Tensor, lambdas: torch.Tensor, projector: torch.Tensor, steps: int,
                   lr: float) -> tuple[torch.Tensor, list[float]]:
    """Adam on delta (from 0) with the gradient projected off the shared subspace: g <- g - P g.

    Layers of one shape can be stacked on the leading dims: the loss is separable and Adam elementwise,
    so this equals optimizing them one at a time (as the official loop does). Returns delta and the losses.
    """
    tm = task_matrices.float()
    delta = torch.nn.Parameter(torch.zeros(tm.shape[:-3] + tm.shape[-2:], dtype=tm.dtype, device=tm.device))
    opt = torch.optim.Adam([delta], lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = doge_loss(tm, delta, lambdas)
        loss.backward()
        delta.grad = project_off(delta.grad, projector)
        opt.step()
        losses.append(loss.item())
    return delta.detach(), losses


@register_method(
    "doge", display_name="DOGE TA", family="data-free", paper=DOGE, defaults_source=DEFAULTS_SOURCE,
    hyperparameter_help=HELP, paper_budget={"steps": 400}, smoke={"steps": 2},
    ranges={"steps": "[0, inf)", "lr": "(0, inf)", "lamda": "(0, inf)", "subspace": "[1, inf)", "k": "(0, 100]"})
def doge(ctx, steps: int = 400, lr: float = 1e-4, lamda: float = 0.07, subspace: float = 6.0, k: float = 30.0):
    """DOGE TA: theta = theta_0 + sum_t lambda_t^l (tau_t + delta) * M_t on the blocks' linear weights.

    1. Per linear layer l: lambda_t^l = lamda / ||tau_t^l||_F (task-aware, training-free coefficients).
    2. Shared subspace per layer: each task's top min(m, n)/T left singular vectors, concatenated and
       decomposed again; the projector P spans its top min(m, n)/subspace directions.
    3. delta^l (init 0) minimizes sum_t ||rowsum(tau_t * (tau_t - sum_i lambda_i (tau_i + delta)))||^2 by Adam
       (lr 1e-4, 400 steps), each gradient projected as g - P g (shared directions left untouched).
    4. M_t keeps the top-K % of |tau_t| over all merged layers; merged = sum_t lambda_t (tau_t + delta) * M_t.
    Every other tensor (biases, LayerNorms, embeddings, proj) stays at theta_0, as in the official code.

    Deviations: open_clip's fused q/k/v ``in_proj_weight`` is split into its three matrices (the official
    code runs on Hugging Face CLIP, where they are separate), so norms, subspaces and losses are per matrix
    as there. Layers of one shape are optimized as one batch (equal to the official layer-by-layer loop: the
    loss is separable and Adam elementwise). The top-K mask is ties.trim_top_k (the official TIES threshold, which
    keeps ``int(n * K / 100) + 1`` entries). With ``steps=0`` and ``k=100`` this is Task
    Arithmetic with the adaptive coefficients.
    """
    if steps < 0 or lr <= 0 or lamda <= 0 or subspace < 1 or not 0 < k <= 100:
        raise ValueError(f"doge needs steps >= 0, lr > 0, lamda > 0, subspace >= 1 and 0 < k <= 100; got "
                         f"steps={steps}, lr={lr}, lamda={lamda}, subspace={subspace}, k={k}")
    tvs = list(ctx.task_vectors().values())
    units = linear_units(tvs)
    deltas: dict[tuple, torch.Tensor] = {}
    lambdas: dict[tuple, torch.Tensor] = {}
    groups: dict[tuple, list] = {}
    for unit in units:
        groups.setdefault(tuple(unit_tensor(tvs[0], unit).shape), []).append(unit)
    for shape, members in ctx.progress(list(groups.items()), desc="DOGE delta (per layer shape)"):
        stacked = torch.stack([torch.stack([unit_tensor(tv, u) for tv in tvs]) for u in members]).float()
        lam = lamda / stacked.flatten(-2).norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)   # [U, T]
        delta, losses = optimize_delta(stacked, lam, shared_subspace_projector(stacked, subspace), steps, lr)
        if losses:
            ctx.log(f"doge_loss_first/{'x'.join(map(str, shape))}", losses[0])
            ctx.log(f"doge_loss_last/{'x'.join(map(str, shape))}", losses[-1])
        for u, d, l in zip(members, delta, lam):
            deltas[u], lambdas[u] = d, l
    keys = list(dict.fromkeys(u[0] for u in units))
    flat = torch.stack([torch.cat([tv[key].reshape(-1) for key in keys]) for tv in tvs]).float()
    masks = trim_top_k(flat, k) != 0                                                      # [T, N]
    merged = Weights({key: torch.zeros_like(v) for key, v in tvs[0].items()})
    offset = 0
    for key in keys:
        ref = tvs[0][key]
        key_masks = masks[:, offset: offset + ref.numel()].reshape(len(tvs), *ref.shape)
        offset += ref.numel()
        parts = []
        for i, unit in enumerate(u for u in units if u[0] == key):
            n = unit[2]
            chunk_masks = key_masks.chunk(n, 1)[i]
            adjusted = torch.stack([unit_tensor(tv, unit) for tv in tvs]).float() + deltas[unit]
            parts.append((lambdas[unit][:, None, None] * adjusted * chunk_masks).sum(0))
        merged[key] = torch.cat(parts, 0).to(ref.dtype)
    return ctx.shared_model(ctx.pretrained_weights + merged)
