"""Learned test-time masks (issue 8): AdaRank (TA, CART) and Concrete subspace learning (TA, AdaMerging).

Micro suite, a few optimisation steps each.
"""

from __future__ import annotations

import pytest
import torch

import mergebench
from mergebench.api.context import DataNotDeclaredError, MergeContext
from mergebench.engine.runspec import RunSpec
from mergebench.methods.adarank import RankMaskedMerge, is_low_rank_key
from mergebench.methods.concrete import ConcreteMask, rescaled
from mergebench.engine.functional import FunctionalMerge
from mergebench.methods.adaptive import entropy, functional_merge, minimize_entropy, unlabeled_streams
from mergebench.api.pipeline import MethodCall
from mergebench.engine.run import run_one
from mergebench.engine.execution import execute, seed_everything

METHODS = ["adarank", "adarank_cart", "concrete_task_arithmetic", "concrete_adamerging"]
FAST = {"adarank": "steps=3", "adarank_cart": "steps=3", "concrete_task_arithmetic": "steps=3",
        "concrete_adamerging": "steps=2, adamerging_steps=2"}


def _ctx(suite, method="adamerging_taskwise", seed=0, **settings):
    """The context of a run of ``method`` (so the data it declared) on ``suite``, on the CPU."""
    seed_everything(seed)
    return MergeContext(suite, RunSpec.build(method, suite, seed=seed, device="cpu", **settings), show_progress=False)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.encoder.state_dict().items()}


def _assert_close(a: dict, b: dict, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol), (k, (a[k] - b[k]).abs().max().item())


def _task_arithmetic(ctx, scaling):
    return _weights(execute(MethodCall.parse(f"task_arithmetic(scaling={scaling})").resolve(), ctx))


# ------------------------------------------------------------------ registry
def test_registered_with_official_defaults():
    for name in METHODS:
        spec = mergebench.get_method(name)
        assert spec.needs == "unlabeled" and not spec.adds_params
        assert spec.family == "test-time adaptation"
        assert spec.paper.arxiv and spec.paper.code.startswith("https://github.com/")
        assert "official" in spec.defaults_source and "Deviations" in spec.doc
        assert spec.hyperparameters["lr"].default == 1e-3
        assert spec.hyperparameters["batch_size"].default == 16
    hp = lambda name, key: mergebench.get_method(name).hyperparameters[key].default  # noqa: E731
    assert (hp("adarank", "prior"), hp("adarank", "initial_rank_ratio"), hp("adarank", "temperature")) == (0.3, 1.0, 10)
    assert (hp("adarank_cart", "prior"), hp("adarank_cart", "initial_rank_ratio")) == (2.3, 0.16)
    for name in ("concrete_task_arithmetic", "concrete_adamerging"):
        assert (hp(name, "temperature"), hp(name, "scaling"), hp(name, "init_logits")) == (0.5, 0.3, 0.0)
        assert hp(name, "eval_mask") == "continuous"
    assert (hp("concrete_adamerging", "base_lr"), hp("concrete_adamerging", "adamerging_lr")) == (1.0, 1e-3)
    assert hp("concrete_adamerging", "granularity") == "layer"


# ------------------------------------------------------------------ AdaRank
def test_adarank_full_rank_svd_is_exact_and_equals_task_arithmetic(micro):
    ctx = _ctx(micro)
    model = mergebench.get_method("adarank").fn(ctx, steps=0)  # all components kept, lambda = prior 0.3
    _assert_close(_weights(model), _task_arithmetic(ctx, 0.3))
    merge = RankMaskedMerge(ctx.encoder(), ctx.pretrained_weights, [ctx.task_vector(t) for t in ctx.tasks],
                            0.3, 1.0, 10.0)
    assert merge.mask_keys == [k for k, v in ctx.pretrained_weights.items() if is_low_rank_key(k, v)]
    assert all(".attn." in k or ".mlp." in k for k in merge.mask_keys)
    coeffs = torch.tensor([0.7, -1.3, 2.0])  # any coefficients: sum_t c_t U_t S_t V_t^T = sum_t c_t tau_t
    for k in merge.mask_keys:
        direct = sum(c * ctx.task_vector(t)[k] for c, t in zip(coeffs, ctx.tasks))
        assert torch.allclose(merge.combined_task_vector(k, coeffs), direct, atol=1e-5), k


def test_adarank_cart_starts_from_truncated_task_vectors_around_the_average(micro):
    ctx = _ctx(micro)
    model = mergebench.get_method("adarank_cart").fn(ctx, steps=0)
    experts = [ctx.expert_weights(t) for t in ctx.tasks]
    average = sum(experts) / len(experts)
    expected = {}
    for k, v in average.items():
        if is_low_rank_key(k, v):
            delta = 0
            for e in experts:
                U, s, Vh = torch.linalg.svd(e[k] - v, full_matrices=False)
                keep = int(len(s) * 0.16)
                delta = delta + U[:, :keep] @ torch.diag(s[:keep]) @ Vh[:keep]
            expected[k] = v + 2.3 * delta
        else:  # the centred task vectors sum to zero, whatever the (equal) coefficient
            expected[k] = v
    _assert_close({k: w for k, w in _weights(model).items() if k in expected}, expected, atol=1e-4)
    ranks = [r for k, r in ctx.logs.items() if k.startswith("adarank_cart/kept_fraction/")]
    assert len(ranks) == len(ctx.tasks) and all(r[0] < 0.2 for r in ranks)


def test_adarank_training_prunes_binary_masks_with_straight_through_gradients(micro):
    ctx = _ctx(micro)
    merge = RankMaskedMerge(ctx.encoder(), ctx.pretrained_weights, [ctx.task_vector(t) for t in ctx.tasks],
                            0.3, 1.0, 10.0)
    x = next(ctx.unlabeled(ctx.tasks[0], 8))
    entropy(ctx.head(ctx.tasks[0])(merge(x))).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in merge.mask_logits)  # through the hard mask
    assert merge.lambdas.grad.abs().sum() > 0  # coefficients train jointly

    ctx = _ctx(micro)
    model = mergebench.get_method("adarank").fn(ctx, steps=8, lr=0.05)
    kept = {t: ctx.logs[f"adarank/kept_fraction/{t}"][0] for t in ctx.tasks}
    assert any(v < 1 for v in kept.values()), kept  # some components pruned
    assert len(ctx.logs["adarank/loss"]) == 8
    blocks = {k.rsplit("/", 1)[1] for k in ctx.logs if k.startswith(f"adarank/kept_ranks/{ctx.tasks[0]}/")}
    assert blocks == {f"block{i}" for i in range(micro.encoder_config["layers"])}
    # the returned encoder is the binarised merge: origin + sum_t lambda_t U_t diag(s_t * hard_t) V_t^T
    seed_everything(0)
    ctx2 = _ctx(micro)
    merge = RankMaskedMerge(ctx2.encoder(), ctx2.pretrained_weights, [ctx2.task_vector(t) for t in ctx2.tasks],
                            0.3, 1.0, 10.0)
    minimize_entropy(ctx2, merge, [merge.lambdas, *merge.mask_logits], steps=8, lr=0.05,
                     streams=unlabeled_streams(ctx2, 16), desc="x", log_key="x")
    w = _weights(model)
    for k in merge.mask_keys:
        U, s, Vh = merge.svd[k]
        hard = merge.hard_mask(k)
        assert hard.dtype == torch.bool
        manual = ctx2.pretrained_weights[k] + sum(
            merge.lambdas[merge.keys.index(k), i] * (U[i] * (s[i] * hard[i])) @ Vh[i] for i in range(len(ctx.tasks)))
        assert torch.allclose(w[k], manual.detach(), atol=1e-5), k


# ------------------------------------------------------------------ Concrete
def test_concrete_mask_sampling():
    torch.manual_seed(0)
    mask = ConcreteMask({"a": torch.zeros(50, 40), "b": torch.zeros(7)}, 0.0, 0.5)
    soft = mask.sample("continuous")
    assert all(((m > 0) & (m < 1)).all() and not torch.all(m == m.flatten()[0]) for m in soft.values())
    sum(m.sum() for m in rescaled(soft).values()).backward()
    hard = mask.sample("discrete")
    assert all(torch.all((m == 0) | (m == 1)) for m in hard.values())
    assert all(torch.allclose(m.mean(), torch.tensor(1.0)) for m in rescaled(soft).values())
    assert torch.equal(rescaled({"z": torch.zeros(3)})["z"], torch.zeros(3))  # not NaN
    with pytest.raises(ValueError, match="continuous"):
        mask.sample("binary")
    with pytest.raises(ValueError, match="temperature"):
        ConcreteMask({"a": torch.zeros(2)}, 0.0, 0.0)


def test_masked_functional_merge_with_all_ones_is_task_arithmetic(micro):
    ctx = _ctx(micro)
    fm = functional_merge(ctx, "task", 0.3, clamp=None)
    ones = {k: torch.ones_like(v) for k, v in fm.theta0.items()}
    _assert_close(dict(fm.final_weights(ones)), _task_arithmetic(ctx, 0.3))
    half = {k: torch.full_like(v, 0.5) for k, v in fm.theta0.items()}
    _assert_close(dict(fm.final_weights(half)), _task_arithmetic(ctx, 0.15))
    # unclamped coefficients keep their gradient outside [0, 1]
    fm2 = FunctionalMerge(ctx.encoder(), ctx.pretrained_weights, [ctx.task_vector(t) for t in ctx.tasks], "task",
                          1.5, clamp=None)
    x = next(ctx.unlabeled(ctx.tasks[0], 8))
    entropy(ctx.head(ctx.tasks[0])(fm2(x))).backward()
    assert torch.all(fm2.coefficients() == 1.5) and fm2.lambdas.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["concrete_task_arithmetic", "concrete_adamerging"])
def test_concrete_with_a_certain_mask_is_the_inner_merge(micro, name):
    ctx = _ctx(micro)
    extra = {"adamerging_steps": 0} if name == "concrete_adamerging" else {}
    model = mergebench.get_method(name).fn(ctx, steps=0, init_logits=50.0, eval_mask="discrete", **extra)
    _assert_close(_weights(model), _task_arithmetic(ctx, 0.3))
    assert ctx.logs[f"{name}/mask_density"] == [1.0]


def test_concrete_training_logs_and_discrete_masks(micro):
    ctx = _ctx(micro)
    model = mergebench.get_method("concrete_adamerging").fn(ctx, steps=3, adamerging_steps=4, adamerging_lr=0.5,
                                                             eval_mask="discrete")
    assert len(ctx.logs["concrete_adamerging/loss"]) == len(ctx.logs["concrete_adamerging/inner_loss"]) == 3
    assert len(ctx.logs["concrete_adamerging/adamerging/loss"]) == 4
    assert 0.3 < ctx.logs["concrete_adamerging/mask_density"][0] < 0.7  # logits 0: about half kept
    # with a binary mask, each merged entry moved either 0 or a rescaled sum of task vectors
    w, theta0 = _weights(model), ctx.pretrained_weights
    k = next(k for k in theta0 if is_low_rank_key(k, theta0[k]))
    moved = (w[k] - theta0[k]).abs() > 0
    assert 0.2 < moved.float().mean() < 0.8
    lambdas = [ctx.logs[f"concrete_adamerging/lambda_mean/{t}"][0] for t in ctx.tasks]
    assert any(abs(v - 0.3) > 0.1 for v in lambdas)  # AdaMerging phase trained them from 0.3


def test_bad_hyperparameters_are_clear_errors(micro):
    ctx = _ctx(micro)
    with pytest.raises(ValueError, match="initial_rank_ratio"):
        mergebench.get_method("adarank").fn(ctx, steps=0, initial_rank_ratio=1.5)
    with pytest.raises(ValueError, match="temperature"):
        mergebench.get_method("adarank").fn(ctx, steps=0, temperature=0.0)
    with pytest.raises(ValueError, match="granularity"):
        mergebench.get_method("concrete_adamerging").fn(ctx, steps=0, granularity="block")
    with pytest.raises(ValueError, match="mask kind"):
        mergebench.get_method("concrete_task_arithmetic").fn(ctx, steps=0, eval_mask="binary")


# ------------------------------------------------------------------ harness integration
@pytest.mark.parametrize("name", METHODS)
def test_refuses_undeclared_data(micro, name):
    with pytest.raises(DataNotDeclaredError, match="unlabeled"):
        mergebench.get_method(name).fn(_ctx(micro, "task_arithmetic"), steps=1)


@pytest.mark.parametrize("name", METHODS)
def test_runs_end_to_end_deterministically(micro, name):
    spec = f"{name}({FAST[name]})"
    a = run_one(spec, micro, seed=3, write=False, show_progress=False)
    b = run_one(spec, micro, seed=3, write=False, show_progress=False)
    c = run_one(spec, micro, seed=4, write=False, show_progress=False)
    assert a["status"] == b["status"] == c["status"] == "ok", a.get("error")
    assert a["params"]["added"] == 0
    assert a["data_used"] and all(d["kind"] == "unlabeled" for d in a["data_used"])
    assert a["logs"] == b["logs"] and a["metrics"]["accuracy"] == b["metrics"]["accuracy"]
    assert a["logs"][f"{name}/loss"] != c["logs"][f"{name}/loss"]
