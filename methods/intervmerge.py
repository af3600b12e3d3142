"""IntervMerge (Osial, Marczak, Zielinski, SDM 2025): task-specific low-rank interventions inside the encoder.

In every transformer block b, the attention branch's output a = attn(ln_1(x)) is edited at the
CLS token only, before the residual add: a[CLS] <- Phi_{t,b}(a[CLS]), then x = x + a. Phi is
the official code's default NoReFT, Phi(h) = h + W2^T((W1 h + b1) - (W2 h + b2)) (rank r, no
orthogonality, PyTorch default init, so not the identity at init), or its mini forms.

The edit is inserted with a forward hook on each block's ``attn`` (``nn.MultiheadAttention``),
whose first output is exactly what ``ResidualAttentionBlock.attention`` returns to the residual
add (open_clip: ``x = q_x + ls_1(attention(ln_1(q_x)))``; ``ls_1`` is the identity for CLIP).
The hooks only act inside the returned model's forward; the base model keeps its weights and,
called on its own, its behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from mergebench.methods.adaptive import (
    TWO_BATCH_BUDGET, TWO_BATCH_SMOKE, ExpertEmbeddings, FunctionalSharedModel, functional_merge_from_state, l1,
    single_encoder,
)
from mergebench.api.models import AdaMergedModel, MergedModel, SharedModel, freeze
from mergebench.api.registry import Paper, Variant, register_variants

INTERVMERGE = Paper("Parameter-Efficient Interventions for Enhanced Model Merging", 2025, "2412.17023", "SDM",
                    "https://github.com/MarcinOsial/IntervMerge")


# ------------------------------------------------------------------ intervention forms
class NoReFT(nn.Module):
    """Phi(h) = h + W2^T((W1 h + b1) - (W2 h + b2)); W1 = learned_source, W2 = proj_layer (official names)."""

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.proj_layer = nn.Linear(dim, rank, bias=True)
        self.learned_source = nn.Linear(dim, rank, bias=True)

    def forward(self, h: Tensor) -> Tensor:
        return h + torch.matmul(self.learned_source(h) - self.proj_layer(h), self.proj_layer.weight)


class MiniNoReFT(nn.Module):
    """NoReFT on the slice h[start:start+width] only (official ``miniInterv``: the first 64 dims in every block)."""

    def __init__(self, dim: int, rank: int, width: int, start: int = 0):
        super().__init__()
        _check_slice(dim, width, start)
        self.start, self.width = start, width
        self.phi = NoReFT(width, rank)

    def forward(self, h: Tensor) -> Tensor:
        s, e = self.start, self.start + self.width
        return torch.cat([h[..., :s], self.phi(h[..., s:e]), h[..., e:]], dim=-1)


class EfficientMini(nn.Module):
    """h + pad(R b) on the slice [start, start+width): an input-independent shift (official
    ``miniInterv_best_efficient``). R (width x r) has orthonormal columns, b (r) starts U[0, 1)."""

    def __init__(self, dim: int, rank: int, width: int, start: int):
        super().__init__()
        _check_slice(dim, width, start)
        self.dim, self.start, self.width = dim, start, width
        self.rotate = nn.Parameter(nn.init.orthogonal_(torch.empty(width, rank)))
        self.learned_source = nn.Parameter(torch.rand(rank))

    def shift(self) -> Tensor:
        r = _orthonormal_columns(self.rotate)
        return torch.matmul(r, self.learned_source.unsqueeze(-1)).squeeze(-1)

    def forward(self, h: Tensor) -> Tensor:
        s, e = self.start, self.start + self.width
        return torch.cat([h[..., :s], h[..., s:e] + self.shift(), h[..., e:]], dim=-1)


def _orthonormal_columns(a: Tensor) -> Tensor:
    """Gram-Schmidt on the columns of ``a`` (plain ops, so that fvcore can trace and count it)."""
    cols: list[Tensor] = []
    for i in range(a.shape[1]):
        v = a[:, i]
        for u in cols:
            v = v - (u * v).sum() * u
        cols.append(v / torch.linalg.vector_norm(v))
    return torch.stack(cols, dim=1)


def _check_slice(dim: int, width: int, start: int):
    if width < 1 or start < 0 or start + width > dim:
        raise ValueError(f"intervention slice [{start}, {start + width}) does not fit the width {dim} of the "
                         f"encoder; pass a smaller slice_width")


def efficient_slice_start(block: int, width: int, dim: int) -> int:
    """Block b owns [b*width, (b+1)*width) (official: 12 x 64 = 768 tiles ViT-B/32); wraps when the blocks
    need more than ``dim`` dims (mini8: 6 blocks x 64 > 128, so blocks alternate [0:64], [64:128])."""
    start = (block * width) % dim
    return min(start, dim - width)


INTERVENTIONS: dict[str, Callable[[int, int, int, int], nn.Module]] = {
    # (block, dim, rank, slice_width) -> module
    "full": lambda b, d, r, w: NoReFT(d, r),
    "mini": lambda b, d, r, w: MiniNoReFT(d, r, w, 0),
    "efficient_mini": lambda b, d, r, w: EfficientMini(d, r, w, efficient_slice_start(b, w, d)),
}


def intervention_param_count(kind: str, tasks: int, blocks: int, dim: int, rank: int = 1, slice_width: int = 64) -> int:
    """The closed form: full T*B*2r(D+1); mini T*B*2r(w+1); efficient mini T*B*r(w+1)."""
    per = {"full": 2 * rank * (dim + 1), "mini": 2 * rank * (slice_width + 1),
           "efficient_mini": rank * (slice_width + 1)}[kind]
    return tasks * blocks * per


# ------------------------------------------------------------------ the model
class InterventionModel(MergedModel):
    """A base merged model whose encoder's attention outputs (CLS) are edited by the task's interventions."""

    def __init__(self, base: MergedModel, tasks: Sequence[str], kind: str = "full", rank: int = 1,
                 slice_width: int = 64):
        super().__init__()
        if kind not in INTERVENTIONS:
            raise ValueError(f"kind must be one of {list(INTERVENTIONS)}, got {kind!r}")
        encoder = single_encoder(base)
        dim, blocks = encoder.transformer.width, len(encoder.transformer.resblocks)
        make = INTERVENTIONS[kind]
        self.kind = kind
        self.interventions = nn.ModuleDict(
            {t: nn.ModuleList([make(b, dim, rank, slice_width) for b in range(blocks)]) for t in tasks})
        self._route: list[tuple[str, int]] | None = None
        self._handles: list = []
        self.base = base
        self.attach(base)

    def attach(self, base: MergedModel):
        """(Re)hook the interventions onto ``base``'s encoder and make it this model's base."""
        for h in self._handles:
            h.remove()
        encoder = single_encoder(base)
        self.base = freeze(base)
        self._handles = [blk.attn.register_forward_hook(partial(self._hook, b))
                         for b, blk in enumerate(encoder.transformer.resblocks)]

    def _hook(self, block: int, module: nn.MultiheadAttention, args, output):
        if self._route is None:  # the base called on its own: untouched
            return None
        out = output[0] if isinstance(output, tuple) else output
        token_dim = 1 if getattr(module, "batch_first", False) else 0
        cls = out.select(token_dim, 0)
        if len(self._route) == 1:
            new_cls = self.interventions[self._route[0][0]][block](cls)
        else:  # several tasks' batches in one pass (training): each segment gets its task's edit
            parts = cls.split([n for _, n in self._route], dim=0)  # cls is (N, D) either way
            new_cls = torch.cat([self.interventions[t][block](p) for (t, _), p in zip(self._route, parts)], dim=0)
        rest = out.narrow(token_dim, 1, out.shape[token_dim] - 1)
        new = torch.cat([new_cls.unsqueeze(token_dim), rest], dim=token_dim)
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

    def forward(self, images: Tensor, task: str) -> Tensor:
        self._route = [(task, images.shape[0])]
        try:
            return self.base(images, task)
        finally:
            self._route = None

    def forward_tasks(self, images: Tensor, route: list[tuple[str, int]]) -> Tensor:
        """One pass over consecutive segments of different tasks (only for a task-independent base)."""
        self._route = route
        try:
            return self.base(images, route[0][0])
        finally:
            self._route = None


# ------------------------------------------------------------------ training
@dataclass(frozen=True, kw_only=True)
class InterventionTraining:
    """What one IntervMerge variant trains, and how: the registered methods' hyperparameters (their defaults are
    in the methods' signatures, nowhere else)."""

    kind: str                  # a key of INTERVENTIONS: "full", "mini", "efficient_mini"
    rank: int
    steps: int
    lr: float
    batch_size: int
    batches_per_task: int
    joint: bool                # an AdaMerging base's coefficients train too
    desc: str                  # the progress bar's name
    log_key: str               # the logs' prefix
    slice_width: int = 0       # the mini forms' slice (the full form acts on the whole width)


def train_interventions(ctx, base: MergedModel, config: InterventionTraining) -> InterventionModel:
    """Interventions of ``config.kind`` on ``base``, trained to the experts' embeddings (see the methods below)."""
    kind, rank, slice_width, name = config.kind, config.rank, config.slice_width, config.log_key
    batch_size, batches_per_task, joint = config.batch_size, config.batches_per_task, config.joint
    experts = ExpertEmbeddings(ctx)
    # (images, expert embedding) per batch; the frozen expert's embeddings are computed once per image
    streams = {t: ctx.unlabeled(t, batch_size, through=(None, partial(experts, task=t))) for t in ctx.tasks}
    base = freeze(base)
    state = getattr(base, "merge_state", None)
    fm = None
    if joint and state is not None:
        fm = functional_merge_from_state(ctx, state)
        student = InterventionModel(FunctionalSharedModel(fm), ctx.tasks, kind, rank, slice_width).to(ctx.device)
        fm.lambdas.requires_grad_(True)  # attach() froze the whole base, coefficients included
    else:
        student = InterventionModel(base, ctx.tasks, kind, rank, slice_width).to(ctx.device)
    groups = [{"params": list(student.interventions.parameters())}]
    if fm is not None:
        groups.append({"params": [fm.lambdas]})
    opt = torch.optim.Adam(groups, lr=config.lr, betas=(0.9, 0.999), weight_decay=0.0)
    shared = isinstance(student.base, (SharedModel, FunctionalSharedModel))
    for _ in ctx.progress(range(config.steps), desc=config.desc):
        drawn = {t: [next(streams[t]) for _ in range(batches_per_task)] for t in ctx.tasks}
        batches = {t: [x for x, _ in pairs] for t, pairs in drawn.items()}
        targets = {t: [y for _, y in pairs] for t, pairs in drawn.items()}
        losses = []
        for i in range(batches_per_task):
            xs = [batches[t][i] for t in ctx.tasks]
            if shared:
                route = [(t, len(x)) for t, x in zip(ctx.tasks, xs)]
                feats = student.forward_tasks(torch.cat(xs), route).split([n for _, n in route])
            else:
                feats = [student(x, t) for t, x in zip(ctx.tasks, xs)]
            per_task = [l1(f, targets[t][i]) for t, f in zip(ctx.tasks, feats)]
            opt.zero_grad()
            sum(per_task).backward()
            opt.step()
            losses += [v.item() for v in per_task]
        ctx.log(f"{name}/loss", sum(losses) / len(losses))
    if fm is not None:
        final = AdaMergedModel(freeze(ctx.encoder(fm.final_weights())), fm.state(state.ties_k))
        lam = fm.coefficients().detach()
        for j, t in enumerate(ctx.tasks):
            ctx.log(f"{name}/lambda_mean/{t}", lam[:, j].mean().item())
        student.attach(final)
    for p in student.interventions.parameters():
        p.requires_grad_(False)
    return student.eval()


_DEFAULTS_SOURCE = (
    "official code (MarcinOsial/IntervMerge: src/main_intervmerge.py, src/models/loreft_models.py, "
    "src/intervmerge_*.sh): NoReFT ('default' intervention), rank 1 (all scripts), all blocks, CLS token, "
    "attention output; Adam lr 1e-3 betas (0.9, 0.999) for interventions and coefficients, batch 16, two batches "
    "per task per iteration, L1 (mean) to the expert embedding, 500 iterations; coefficients trained jointly "
    "for AdaMerging bases (intervmerge_adamerging.sh, intervmerge_tw_adamerging.sh), frozen otherwise; mini slice "
    "64 (--model_hidden_size 64)")

# the mini slices' official 64 dims do not fit the micro suite's 32-wide encoder
SMOKE_MINI = {**TWO_BATCH_SMOKE, "slice_width": 16}

_HELP = {
    "base": "the merge to intervene on (any method spec with one shared encoder)",
    "rank": "intervention rank r (official scripts: 1)",
    "steps": "iterations; each makes batches_per_task Adam steps (official 500)",
    "lr": "Adam learning rate of interventions and coefficients (official 1e-3)",
    "batch_size": "unlabeled test images per task batch (official 16)",
    "batches_per_task": "batches of each task per iteration (official 2)",
    "joint": "when the base is AdaMerging, keep training its merge coefficients with the L1 loss (official)",
    "slice_width": "dims each mini intervention acts on (official 64)",
}

NOTES = """

    Budget: the official 500 iterations of 2 x 16 unlabeled test images per task (``--budget smoke``: 2
    iterations; for the mini variants also a 16-dim slice, which fits the micro suite's 32-wide encoder).
    The expert embeddings of each unlabeled image are computed once (the expert is frozen) and looked up for
    every batch that draws the image. Deviations from the official code: one Adam step per round on the sum
    of the 8 tasks' L1 losses (each task's batch of the round), instead of one step per task batch: for the
    interventions this is the same update (each task's interventions only receive their task's
    gradient and step once per task batch), but jointly trained coefficients take 2 steps per iteration instead
    of 16. The distillation target is always the true fine-tuned expert (the official ``--pruned`` runs distil to
    theta_0 + TIES-tau_t). With ``joint`` and an AdaMerging base, the coefficients start from the base's trained
    ones (official: loaded from a table of AdaMerging coefficients) and the returned encoder holds the jointly
    trained merge; otherwise the base is frozen.
    """


@register_variants({
    "intervmerge": Variant(
        "IntervMerge", fixed={"kind": "full", "slice_width": 0, "desc": "IntervMerge"},   # the whole width
        doc="""IntervMerge: per task and per transformer block a rank-r NoReFT intervention
    Phi(h) = h + W2^T((W1 h + b1) - (W2 h + b2)) on the CLS token of the attention output, before the residual
    add, trained to minimise the L1 distance between the final embedding and the task's expert embedding on
    unlabeled test batches. Stores T * B * 2r(D + 1) parameters (147,648 for ViT-B/32, 8 tasks, r=1)."""),
    "intervmerge_mini": Variant(
        "IntervMerge (mini)", fixed={"kind": "mini", "desc": "IntervMerge mini"}, register={"smoke": SMOKE_MINI},
        doc="""IntervMerge mini-interventions: the same NoReFT acting only on the first ``slice_width`` dims of the CLS
    attention output in every block (the rest unchanged), T * B * 2r(w + 1) parameters (12,480 for ViT-B/32 with
    w=64). On mini8 (width 128) the official 64-dim slice is half of the width, not 1/12 as on ViT-B/32."""),
    "intervmerge_efficient_mini": Variant(
        "IntervMerge (efficient mini)", fixed={"kind": "efficient_mini", "desc": "IntervMerge efficient mini"},
        register={"smoke": SMOKE_MINI},
        doc="""IntervMerge efficient mini-interventions (official ``miniInterv_best_efficient``): an input-independent
    shift h + pad(R b) of the CLS attention output, R (w x r) with orthonormal columns (orthogonal init), b
    (r) initialised U[0, 1); block b owns the slice [b*w, (b+1)*w). T * B * r(w + 1) parameters (6,240 for
    ViT-B/32). Deviations: R is orthonormalised by Gram-Schmidt in the forward (same set of matrices as
    torch's orthogonal parametrisation, different optimisation path; traceable by fvcore), and the slices wrap
    around when blocks x w exceeds the width (mini8: 6 x 64 > 128)."""),
}, notes=NOTES, paper=INTERVMERGE, needs="unlabeled", adds_params=True, family="test-time adaptation",
   defaults_source=_DEFAULTS_SOURCE, hyperparameter_help=_HELP, paper_budget=TWO_BATCH_BUDGET, smoke=TWO_BATCH_SMOKE,
   ranges={"rank": "[1, inf)", "steps": "[1, inf)", "lr": "(0, inf)", "batch_size": "[1, inf)",
           "batches_per_task": "[1, inf)", "slice_width": "[1, inf)"})
def intervmerge(ctx, kind: str, desc: str, base="task_arithmetic", rank: int = 1, slice_width: int = 64,
                steps: int = 500, lr: float = 1e-3, batch_size: int = 16, batches_per_task: int = 2, joint: bool = True):
    """IntervMerge with interventions of ``kind`` (``desc``: its progress bar) on the merge ``base``."""
    return train_interventions(ctx, base, InterventionTraining(
        kind=kind, rank=rank, slice_width=slice_width, steps=steps, lr=lr, batch_size=batch_size,
        batches_per_task=batches_per_task, joint=joint, desc=desc,
        log_key="intervmerge" if kind == "full" else f"intervmerge_{kind}"))
