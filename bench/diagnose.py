"""The mechanisms a suite's experts exhibit: what merging methods exploit, measured on the suite itself.

A merging method works on the real benchmark because CLIP's task vectors have a structure: a few large entries
carry each task (TIES, DARE, Consensus, TALL), each task matrix is nearly low-rank (TSV-M, Iso), each task's layer
inputs occupy their own directions (RegMean, LOT, CAT), and an unlabeled test-time signal, prediction entropy,
points where labels would (AdaMerging and its descendants). A suite on which these do not hold ranks methods
unlike the real benchmark whatever its accuracies. ``diagnose`` measures each one on the suite's experts and heads
and reports it beside the published real-CLIP figure where there is one (``PUBLISHED``).

Every row is computed here, from the suite's checkpoints and data: accuracies on ``split`` (at most ``images``
per task), layer inputs from ``exemplars`` training images per task run through that task's expert.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mergebench.evaluate import auroc, mid_ranks, prediction_entropy
from mergebench.activations import as_matrix, gram, iter_sites, lot_linear, regmean_linear
from mergebench.functional import FunctionalMerge
from mergebench.progress import progress
from mergebench.suites.base import Suite
from mergebench.weights import Weights

TRIM_LEVELS = (5, 10, 20, 50)        # % of each task vector's entries kept, by magnitude over the whole model
RANK_LEVELS = (3, 10, 30)            # % of each task matrix's singular components kept
LAMBDAS = (0.1, 0.3, 0.5, 0.7)       # a single task vector at lambda, on its own task
TA_SCALING = 0.3                     # Task Arithmetic's default (Ilharco et al.), the reference merge

# Published real-CLIP figures beside each row (ViT-B/32 unless said); "not published" where none is.
PUBLISHED = {
    "trim": "TIES-Merging (Yadav et al., NeurIPS 2023, arXiv 2306.01708), its redundancy analysis: keeping the "
            "top-20% magnitude values of each task vector performs about as well as the whole fine-tuned model",
    "low_rank": "Task Singular Vectors (Gargiulo et al., CVPR 2025, arXiv 2412.00081), abstract: task matrices "
                "compressed to about 10% of their size by truncated SVD retain about 99% of the accuracy",
    "subspace": "not published as a figure; the premise of RegMean (Jin et al., ICLR 2023) and LOT Merging "
                "(Sun et al., NeurIPS 2025), both above Task Arithmetic on the real benchmark",
    "cosine": "Task Arithmetic (Ilharco et al., ICLR 2023): task vectors of different tasks are close to "
              "orthogonal (cosine near 0)",
    "lambda": "not published",
    "calibration": "not published for the zero-shot CLIP model on these eight tasks",
    "entropy_loss": "AdaMerging (Yang et al., ICLR 2024), Fig. 2: entropy and cross-entropy loss are positively "
                    "correlated on all eight tasks",
    "entropy_headroom": "AdaMerging (Yang et al., ICLR 2024), Table 2: layer-wise AdaMerging 80.1 vs Task "
                        "Arithmetic 69.1 on ViT-B/32 (+11.0), with no labels",
}


@dataclass(frozen=True)
class DiagnoseSettings:
    split: str = "test"            # where accuracies are measured
    images: int = 1000             # at most this many images per task for each accuracy
    exemplars: int = 64            # training images per task whose layer inputs are collected
    energy: float = 0.90           # a task's input subspace: the eigen-directions holding this share of its energy
    coefficient_steps: int = 150   # Adam steps of the layer-wise coefficient loops
    coefficient_lr: float = 0.01
    coefficient_batch: int = 16    # images per task per step
    seed: int = 0


# ------------------------------------------------------------------ evaluation helpers
@torch.no_grad()
def task_logits(encoder, suite: Suite, task: str, split: str, limit: int) -> tuple[Tensor, Tensor]:
    """Logits of ``task``'s head on the first ``limit`` images of its ``split``, and their labels."""
    data = suite.split(split, task)
    head, outs = suite.head(task), []
    for i in range(0, min(limit, len(data)), 500):
        x = suite.normalize(data.images[i:min(i + 500, limit)])
        outs.append(head(encoder(x).float()))
    return torch.cat(outs), data.labels[:limit]


def accuracy(encoder, suite: Suite, task: str, s: DiagnoseSettings) -> float:
    logits, labels = task_logits(encoder, suite, task, s.split, s.images)
    return 100.0 * (logits.argmax(-1) == labels).double().mean().item()


def _load(encoder, weights: dict) -> torch.nn.Module:
    """``encoder`` holding ``weights`` (in place: one skeleton serves every measurement), in eval mode."""
    reference = encoder.state_dict()
    encoder.load_state_dict({k: v.to(reference[k].dtype) for k, v in weights.items()}, strict=True)
    return encoder.eval()


def _retention(acc: float, pre: float, exp: float) -> float:
    """Share of the expert's gain over the pretrained model that ``acc`` keeps (1 = all)."""
    return (acc - pre) / (exp - pre) if exp != pre else float("nan")


def _summary(per_task: dict[str, float]) -> dict:
    values = [v for v in per_task.values() if not math.isnan(v)]
    return {"mean": sum(values) / len(values) if values else float("nan"),
            "min": min(values) if values else float("nan"), "tasks": per_task}


# ------------------------------------------------------------------ task-vector structure
def trimmed(tau: Weights, percent: float) -> Weights:
    """tau with only its top-``percent``% entries by magnitude kept, over the whole model (TIES' trim)."""
    flat = tau.flatten().abs()
    k = max(1, int(round(flat.numel() * percent / 100)))
    threshold = torch.topk(flat, k, sorted=False).values.min()
    return tau.map(lambda _, t: torch.where(t.abs() >= threshold, t, torch.zeros_like(t)))


def low_rank(tau: Weights, percent: float) -> Weights:
    """tau with every 2-D matrix truncated to its top ``percent``% singular components (other tensors whole)."""
    def truncate(_, t):
        if t.dim() != 2:
            return t
        u, s, vh = torch.linalg.svd(t.double(), full_matrices=False)
        r = max(1, math.ceil(len(s) * percent / 100))
        return ((u[:, :r] * s[:r]) @ vh[:r]).to(t.dtype)
    return tau.map(truncate)


def tensor_group(key: str) -> str:
    if key.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight")):
        return "layernorm gains"
    if key.endswith("bias"):
        return "biases"
    if ".resblocks." in key:
        return "block matrices"
    return "embeddings and projection"


def _cos(a: Tensor, b: Tensor) -> float:
    return F.cosine_similarity(a.double().reshape(1, -1), b.double().reshape(1, -1)).item()


def cosines(theta0: Weights, taus: dict[str, Weights]) -> dict:
    """Pairwise cosines of the flattened task vectors, per tensor group, their norms relative to theta_0, and
    each tensor group's cosine with -theta_0 (the direction weight decay shrinks along)."""
    tasks = list(taus)
    flat = {t: taus[t].flatten().double() for t in tasks}
    pairs = {f"{a}-{b}": _cos(flat[a], flat[b]) for i, a in enumerate(tasks) for b in tasks[i + 1:]}
    groups = sorted({tensor_group(k) for k in theta0})
    by_group, along = {}, {}
    for g in groups:
        keys = [k for k in theta0 if tensor_group(k) == g]
        vec = {t: torch.cat([taus[t][k].reshape(-1) for k in keys]).double() for t in tasks}
        base = torch.cat([theta0[k].reshape(-1) for k in keys]).double()
        cs = [_cos(vec[a], vec[b]) for i, a in enumerate(tasks) for b in tasks[i + 1:]]
        by_group[g] = sum(cs) / len(cs) if cs else float("nan")
        along[g] = sum(_cos(vec[t], -base) for t in tasks) / len(tasks)
    norm0 = theta0.flatten().double().norm().item()
    values = list(pairs.values())
    return {"mean": sum(values) / len(values) if values else float("nan"),
            "min": min(values, default=float("nan")), "max": max(values, default=float("nan")),
            "pairs": pairs, "mean_by_group": by_group, "cosine_with_minus_theta0_by_group": along,
            "norm_ratio": {t: flat[t].norm().item() / norm0 for t in tasks},
            "cosine_with_minus_theta0": {t: _cos(flat[t], -theta0.flatten()) for t in tasks}}


# ------------------------------------------------------------------ layer inputs
def _subspace(g: Tensor, energy: float) -> Tensor:
    """Orthonormal eigen-directions of a PSD Gram holding ``energy`` of its trace, as columns."""
    evals, evecs = torch.linalg.eigh(g)
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    share = evals.cumsum(0) / evals.sum().clamp_min(1e-300)
    r = int((share < energy).sum().item()) + 1
    return evecs[:, :r]


def _dimensions(g: Tensor, energy: float) -> int:
    """How many eigen-directions of a PSD Gram hold ``energy`` of its trace."""
    return _subspace(g, energy).shape[1]


def _own_share(merged: Tensor, own: Tensor, g: Tensor) -> float:
    """<merged X, own X> / ||own X||^2 on inputs with Gram g: how much of the task's own layer-output change the
    merged update keeps on its inputs (1 = whole)."""
    num = torch.trace(merged @ g @ own.t())
    den = torch.trace(own @ g @ own.t())
    return (num / den).item() if den > 0 else float("nan")


def input_subspaces(suite: Suite, experts: dict[str, Weights], s: DiagnoseSettings) -> dict:
    """Per linear site of the blocks, with each task's Gram normalised to unit trace (every task weighs the same):
    ``overlap``, the share of a task's input energy inside the eigen-subspace holding ``energy`` of the other tasks'
    summed Gram; ``union_over_one``, the dimensions holding ``energy`` of all tasks' summed Gram over those of one
    task's (1 = every task uses the same directions, T = disjoint ones); and the share of each task's own layer
    update that LOT's and RegMean's closed forms (at their default rtol / alpha), the mean task matrix and Task
    Arithmetic's sum keep on that task's inputs."""
    tasks = suite.tasks
    gen = torch.Generator().manual_seed(s.seed)
    walkers = []
    for t in tasks:
        data = suite.split("train", t)
        idx = torch.randperm(len(data), generator=gen)[:s.exemplars]
        walkers.append(iter_sites(_load(suite.build_encoder(), {**suite.pretrained, **experts[t]}),
                                  suite.normalize(data.images[idx])))
    theta0 = suite.pretrained
    rows = {}
    for sites in zip(*walkers):
        site = sites[0]
        if site.kind != "linear" or site.group != "block":
            continue
        grams = [gram(x.inputs) for x in sites]
        unit = [g / torch.trace(g).clamp_min(1e-300) for g in grams]
        total = sum(unit)
        w0 = as_matrix(site.weight, theta0[site.weight].double())
        taus = [as_matrix(site.weight, experts[t][site.weight].double()) - w0 for t in tasks]
        overlap = []
        for k in range(len(tasks)):
            q = _subspace(total - unit[k], s.energy)
            overlap.append(torch.trace(q.t() @ unit[k] @ q).item())
        merged = {"lot": lot_linear(taus, grams), "regmean": regmean_linear(taus, grams),
                  "mean": sum(taus) / len(taus), "sum": sum(taus)}
        rows[site.name] = {
            "overlap": sum(overlap) / len(overlap),
            "union_over_one": _dimensions(total, s.energy) / (sum(_dimensions(g, s.energy) for g in unit) / len(unit)),
            **{f"own_share_{m}": sum(_own_share(u, taus[k], grams[k]) for k in range(len(tasks))) / len(tasks)
               for m, u in merged.items()},
        }
    kinds = sorted({name.split(".", 3)[-1] for name in rows})  # attn.in_proj, attn.out_proj, mlp.c_fc, mlp.c_proj
    def mean_of(field, names):
        return sum(rows[n][field] for n in names) / len(names)
    fields = ["overlap", "union_over_one", "own_share_lot", "own_share_regmean", "own_share_mean", "own_share_sum"]
    by_kind = {k: {f: mean_of(f, [n for n in rows if n.endswith(k)]) for f in fields} for k in kinds}
    return {**{f: mean_of(f, list(rows)) for f in fields}, "by_kind": by_kind, "sites": rows}


# ------------------------------------------------------------------ the test-time signal
def calibration(logits: Tensor, labels: Tensor, bins: int = 15) -> dict:
    """Mean prediction entropy of correct and of wrong predictions, and expected calibration error."""
    probs = logits.softmax(-1)
    conf, pred = probs.max(-1)
    hit = pred == labels
    ent = prediction_entropy(logits)
    ece = 0.0
    edges = torch.linspace(0, 1, bins + 1)
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.double().mean().item() * abs(hit[inside].double().mean().item() - conf[inside].double().mean().item())
    return {"accuracy": 100.0 * hit.double().mean().item(), "entropy": ent.mean().item(),
            "entropy_correct": ent[hit].mean().item() if hit.any() else float("nan"),
            "entropy_wrong": ent[~hit].mean().item() if (~hit).any() else float("nan"),
            "confidence_correct": conf[hit].mean().item() if hit.any() else float("nan"),
            "confidence_wrong": conf[~hit].mean().item() if (~hit).any() else float("nan"),
            "ece": ece, "entropy_auroc": auroc(-ent, hit)}


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation (ties at their mid-rank)."""
    ra, rb = mid_ranks(a), mid_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return (ra @ rb / (ra.norm() * rb.norm()).clamp_min(1e-300)).item()


def train_coefficients(suite: Suite, taus: list[Weights], objective: str, s: DiagnoseSettings) -> Tensor:
    """Layer-wise coefficients (AdaMerging's parameterization: one per tensor per task, clamp [0, 1], init 0.3)
    trained by Adam for ``coefficient_steps`` on ``objective``: "entropy" of unlabeled ``split`` images (what
    AdaMerging minimises) or "labels": cross-entropy on labeled validation images (the headroom)."""
    merge = FunctionalMerge(suite.build_encoder(), suite.pretrained, taus, "layer", TA_SCALING)
    opt = torch.optim.Adam([merge.lambdas], lr=s.coefficient_lr)
    split = s.split if objective == "entropy" else "val"
    gen = torch.Generator().manual_seed(s.seed)
    data = {t: suite.split(split, t) for t in suite.tasks}
    heads = {t: suite.head(t) for t in suite.tasks}
    bar = progress(total=s.coefficient_steps, desc=f"coefficients on {objective}")
    for _ in range(s.coefficient_steps):
        weights = merge.merged_weights()
        loss = 0.0
        for t in suite.tasks:
            idx = torch.randint(0, min(len(data[t]), s.images), (s.coefficient_batch,), generator=gen)
            logits = heads[t](merge.embed(suite.normalize(data[t].images[idx]), weights).float())
            loss = loss + (prediction_entropy(logits).mean() if objective == "entropy"
                           else F.cross_entropy(logits, data[t].labels[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.update(1)
    bar.close()
    return merge.coefficients().detach()


def _coefficient_model(suite: Suite, taus: list[Weights], lam: Tensor):
    merge = FunctionalMerge(suite.build_encoder(), suite.pretrained, taus, "layer", lam)
    return _load(suite.build_encoder(), {k: v.detach() for k, v in merge.merged_weights().items()})


def retention(suite: Suite, theta0: Weights, taus: dict[str, Weights], pre: dict, exp: dict,
              s: DiagnoseSettings) -> dict:
    """Each expert's own-task gain kept by its task vector trimmed (``trim``), truncated to low rank
    (``low_rank``) and scaled by lambda (``lambda``), for the tasks of ``taus``."""
    encoder = suite.build_encoder()
    acc = lambda w, t: accuracy(_load(encoder, w), suite, t, s)  # noqa: E731
    def rows(levels, transform):
        return {str(p): _summary({t: _retention(acc(theta0 + transform(tau, p), t), pre[t], exp[t])
                                  for t, tau in taus.items()}) for p in levels}
    return {"trim": rows(TRIM_LEVELS, trimmed), "low_rank": rows(RANK_LEVELS, low_rank),
            "lambda": rows(LAMBDAS, lambda tau, lam: tau * lam)}


def zero_shot_calibration(suite: Suite, theta0: Weights, s: DiagnoseSettings) -> dict:
    """The pretrained model with the suite's heads: calibration per task and averaged over tasks."""
    encoder = _load(suite.build_encoder(), theta0)
    zero = {t: calibration(*task_logits(encoder, suite, t, s.split, s.images)) for t in suite.tasks}
    return {"tasks": zero, **{k: sum(z[k] for z in zero.values()) / len(zero) for k in next(iter(zero.values()))}}


# ------------------------------------------------------------------ the report
def diagnose(suite: Suite, settings: DiagnoseSettings | None = None, verbose: bool = True) -> dict:
    """Every mechanism measured on ``suite`` (see the module docstring); a JSON-able dict."""
    s = settings or DiagnoseSettings()
    torch.manual_seed(s.seed)
    log = print if verbose else (lambda *a, **k: None)
    t_start = time.perf_counter()
    tasks = suite.tasks
    theta0 = Weights({k: v.float() for k, v in suite.pretrained.items()})
    experts = {t: Weights({k: suite.expert_weights(t)[k].float() for k in theta0}) for t in tasks}
    taus = {t: experts[t] - theta0 for t in tasks}
    encoder = suite.build_encoder()
    acc = lambda w, t: accuracy(_load(encoder, w), suite, t, s)  # noqa: E731
    pre = {t: acc(theta0, t) for t in tasks}
    exp = {t: acc(experts[t], t) for t in tasks}
    report = {"suite": suite.name, "settings": s.__dict__, "pretrained": pre, "experts": exp}

    log("diagnose: trimming and low rank")
    report.update(retention(suite, theta0, taus, pre, exp, s))
    report["cosine"] = cosines(theta0, taus)

    log("diagnose: layer inputs")
    report["subspace"] = input_subspaces(suite, experts, s)

    log("diagnose: the test-time signal")
    report["calibration"] = zero_shot_calibration(suite, theta0, s)
    ta_weights = theta0 + sum(taus.values()) * TA_SCALING
    ta_model = _load(suite.build_encoder(), ta_weights)
    per_task, pooled_e, pooled_l, ta_acc = {}, [], [], {}
    for t in tasks:
        logits, labels = task_logits(ta_model, suite, t, s.split, s.images)
        e, loss = prediction_entropy(logits), F.cross_entropy(logits, labels, reduction="none")
        per_task[t] = spearman(e, loss)
        pooled_e.append(e)
        pooled_l.append(loss)
        ta_acc[t] = 100.0 * (logits.argmax(-1) == labels).double().mean().item()
    report["entropy_loss"] = {"pooled": spearman(torch.cat(pooled_e), torch.cat(pooled_l)), **_summary(per_task)}

    tau_list = [taus[t] for t in tasks]
    coefficients = {}
    for objective in ("labels", "entropy"):
        lam = train_coefficients(suite, tau_list, objective, s)
        model = _coefficient_model(suite, tau_list, lam)
        accs = {t: accuracy(model, suite, t, s) for t in tasks}
        coefficients[objective] = {"avg": sum(accs.values()) / len(tasks), "accuracy": accs,
                                   "lambda_mean": {t: lam[:, i].mean().item() for i, t in enumerate(tasks)}}
    ta_avg = sum(ta_acc.values()) / len(tasks)
    gain = coefficients["labels"]["avg"] - ta_avg
    report["entropy_headroom"] = {
        "task_arithmetic": ta_avg, **coefficients,
        "share_found_by_entropy": (coefficients["entropy"]["avg"] - ta_avg) / gain if gain > 0 else float("nan")}
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    report["published"] = PUBLISHED
    return report


def _pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.0f}%"


def _f(x: float, digits: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown(report: dict) -> str:
    """The report as a Markdown table: each mechanism, what this suite measures, the published real-CLIP figure."""
    r, p = report, report["published"]
    trim = ", ".join(f"{k}%: {_pct(v['mean'])} (least {_pct(v['min'])})" for k, v in r["trim"].items())
    rank = ", ".join(f"{k}%: {_pct(v['mean'])} (least {_pct(v['min'])})" for k, v in r["low_rank"].items())
    lam = ", ".join(f"{k}: {_pct(v['mean'])}" for k, v in r["lambda"].items())
    sub, cal, cos, eh = r["subspace"], r["calibration"], r["cosine"], r["entropy_headroom"]
    groups = "; ".join(f"{g} {_f(v)}" for g, v in cos["mean_by_group"].items())
    along = "; ".join(f"{g} {_f(v)}" for g, v in cos["cosine_with_minus_theta0_by_group"].items())
    rows = [
        ("Sparse importance: an expert with its task vector trimmed to its top-k% magnitude entries keeps this "
         "share of its gain over the pretrained model", trim, p["trim"]),
        ("Low-rank task matrices: every task matrix truncated to its top r% singular components", rank,
         p["low_rank"]),
        ("Distinct input subspaces: share of a task's layer-input energy inside the eigen-subspace holding "
         f"{_pct(r['settings']['energy'])} of the other tasks' inputs; dimensions holding {_pct(r['settings']['energy'])} "
         "of all tasks' inputs / of one task's",
         f"{_pct(sub['overlap'])}; {_f(sub['union_over_one'])}x", p["subspace"]),
        ("Own-update share kept on each task's inputs (1 = whole, 1/T = the plain mean)",
         f"LOT {_f(sub['own_share_lot'])}, RegMean {_f(sub['own_share_regmean'])}, mean task matrix "
         f"{_f(sub['own_share_mean'])}, Task Arithmetic's sum {_f(sub['own_share_sum'])}", p["subspace"]),
        ("Task-vector cosines (flattened) and norms", f"mean {_f(cos['mean'], 3)} ({_f(cos['min'], 3)} to "
         f"{_f(cos['max'], 3)}); by group: {groups}; cosine with -theta_0: {along}; |tau|/|theta_0| "
         f"{_f(min(cos['norm_ratio'].values()), 3)} to {_f(max(cos['norm_ratio'].values()), 3)}", p["cosine"]),
        ("A single task vector at lambda, on its own task: share of the gain", lam, p["lambda"]),
        ("Zero-shot calibration: mean entropy (nats) of correct / wrong predictions; ECE",
         f"{_f(cal['entropy_correct'])} / {_f(cal['entropy_wrong'])} at {_f(cal['accuracy'], 1)}% accuracy "
         f"(wrong minus correct: {_f(cal['entropy_wrong'] - cal['entropy_correct'])}); ECE {_f(cal['ece'], 3)}",
         p["calibration"]),
        ("Spearman(entropy, loss) per test image on the Task Arithmetic model",
         f"pooled {_f(r['entropy_loss']['pooled'])}; per task {_f(r['entropy_loss']['min'])} to "
         f"{_f(max(r['entropy_loss']['tasks'].values()))}", p["entropy_loss"]),
        ("Layer-wise coefficients trained on validation labels vs on test entropy (AdaMerging's "
         "parameterization): average accuracy, and the share of the labels' gain over Task Arithmetic that entropy "
         "finds", f"labels {_f(eh['labels']['avg'], 1)}, entropy {_f(eh['entropy']['avg'], 1)}, Task Arithmetic "
         f"{_f(eh['task_arithmetic'], 1)}: {_pct(eh['share_found_by_entropy'])}", p["entropy_headroom"]),
    ]
    lines = [f"# Mechanisms of {r['suite']}", "",
             f"Measured by `mergebench diagnose --suite {r['suite']}` in {r['seconds']} s: accuracies on the "
             f"{r['settings']['split']} split (at most {r['settings']['images']} images per task), layer inputs of "
             f"{r['settings']['exemplars']} training images per task through its expert. The numbers behind each "
             "row, per task and per layer, are in `diagnostics.json`.", "",
             "| Mechanism | This suite | Real CLIP (published) |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines) + "\n"

