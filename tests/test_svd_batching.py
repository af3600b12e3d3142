"""The SVD-based merges with same-shaped matrices batched into one call (``mergebench.api.shape_batches``): the same
merged weights (max |difference| <= 1e-4) as a per-matrix loop, on the micro suite and on mini8-shaped experts.

The references below are frozen copies of the per-matrix forms (one ``torch.linalg.svd`` per layer, or per layer
and task) that the batched ones replaced.
"""

from __future__ import annotations

import pytest
import torch

import mergebench
from mergebench.api.context import MergeContext
from mergebench.methods.adarank import RankMaskedMerge, is_low_rank_key
from mergebench.methods.continual import is_linear_weight
from mergebench.api.models import build_encoder, encoder_weights
from mergebench.engine.runspec import RunSpec
from mergebench.engine.sequential import SequentialContext
from mergebench.api.shape_batches import same_shape_batches
from mergebench.suites.base import Suite, TaskData
from mergebench.api.weights import Weights

TOL = 1e-4


@pytest.fixture(scope="module")
def mini8_shaped():
    """mini8's encoder (width 128, 6 blocks) with random weights and 8 experts theta_0 + noise; no real data."""
    from mergebench.suites.mini8 import CONFIGS

    encoder = dict(CONFIGS["mini8"].encoder)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    pretrained = encoder_weights(build_encoder(encoder))
    tasks = [f"task{i}" for i in range(8)]
    experts = {t: pretrained.map(lambda k, v: v + 1e-2 * v.std().nan_to_num(1.0) * torch.randn(v.shape, generator=g))
               for t in tasks}
    size = encoder["image_size"]
    split = {t: TaskData(torch.zeros(2, 3, size, size, dtype=torch.uint8), torch.zeros(2, dtype=torch.long))
             for t in tasks}
    heads = {t: torch.randn(4, encoder["output_dim"], generator=g) for t in tasks}
    return Suite("mini8-shaped", tasks, encoder, pretrained, heads, {"train": split, "val": split, "test": split},
                 lambda t: experts[t], info={"cache_key": "mini8-shaped-svd-test"})


@pytest.fixture(params=["micro", "mini8_shaped"])
def suite(request):
    return request.getfixturevalue(request.param)


def _max_difference(got: Weights, expected: Weights) -> float:
    assert set(got) >= set(expected)
    return max((got[k].float() - v.float()).abs().max().item() for k, v in expected.items())


def _merged_weights(model) -> Weights:
    return Weights(dict(model.encoder.state_dict()))


def _ctx(suite):
    return MergeContext(suite, RunSpec.build("task_arithmetic", suite, device="cpu"), show_progress=False)


# ------------------------------------------------------------------ frozen per-matrix references
def _ref_polar(a):
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def _ref_tsv_matrix(t):
    t = t.float()
    num, m, n = t.shape
    k = int(min(m, n) * (1.0 / num))
    if k < 1:
        return t.mean(0)
    us, ss, vhs = zip(*(torch.linalg.svd(t[i], full_matrices=False) for i in range(num)))
    u_cat = torch.cat([u[:, :k] for u in us], 1)
    s_cat = torch.cat([s[:k] for s in ss])
    vh_cat = torch.cat([vh[:k] for vh in vhs], 0)
    return (_ref_polar(u_cat) * s_cat) @ _ref_polar(vh_cat)


def _ref_iso_c_matrix(t):
    u, s, vh = torch.linalg.svd(t.float().sum(0), full_matrices=False)
    return s.mean() * (u @ vh)


def _ref_iso_cts_matrix(t, common_fraction=0.8):
    t = t.float()
    num = t.shape[0]
    u, s, vh = torch.linalg.svd(t.sum(0), full_matrices=False)
    r = s.shape[0]
    k_c = int(r * common_fraction)
    per_task = round((r - k_c) / num)
    k_c = r - per_task * num
    us, ss, vhs = [], [], []
    uc = u[:, :k_c]
    for i in range(num if per_task > 0 else 0):
        ut, st, vht = torch.linalg.svd(t[i] - uc @ (uc.t() @ t[i]), full_matrices=False)
        us.append(ut[:, :per_task]), ss.append(st[:per_task]), vhs.append(vht[:per_task])
    u_all = torch.cat(us + [uc], 1)
    s_all = torch.cat(ss + [s[:k_c]])
    vh_all = torch.cat(vhs + [vh[:k_c]], 0)
    return s_all.mean() * (_ref_polar(u_all) @ _ref_polar(vh_all))


def _ref_layerwise(ctx, layer_fn, scaling):
    theta0 = ctx.pretrained_weights
    out = Weights()
    for key, stacked in ctx.task_vector_stacks():
        delta = layer_fn(stacked).to(stacked.dtype) if stacked.dim() == 3 else stacked.mean(0)
        out[key] = theta0[key] + scaling * delta
    return out


def _ref_opcm_project(previous, task, alpha):
    u, s, vh = torch.linalg.svd(previous.double(), full_matrices=True)
    v = vh.T
    split_rank = int((s.cumsum(0) / s.sum() > alpha).float().argmax())
    projected = u.T @ task.double() @ v
    projected.diagonal().fill_(0)
    projected[:split_rank, :split_rank] = 0
    return (u @ projected @ v.T).to(task.dtype)


def _ref_opcm(suite, alpha=0.5):
    theta0 = Weights({k: v for k, v in suite.pretrained.items() if v.is_floating_point()})
    merged_tv, norms, previous_lambda = None, [], 1.0
    for task in suite.tasks:
        task_tv = Weights({k: suite.expert_weights(task)[k] for k in theta0}) - theta0
        norms.append(task_tv.flatten().norm().item())
        if merged_tv is None:
            merged_tv = task_tv
            continue
        cleaned = {}
        for k, t in task_tv.items():
            p = merged_tv[k]
            if not is_linear_weight(k):
                cleaned[k] = t
            elif k.endswith("attn.in_proj_weight"):
                cleaned[k] = torch.cat([_ref_opcm_project(a, b, alpha) for a, b in zip(p.chunk(3), t.chunk(3))])
            else:
                cleaned[k] = _ref_opcm_project(p, t, alpha)
        unscaled = Weights({k: previous_lambda * merged_tv[k] + cleaned[k] for k in merged_tv})
        previous_lambda = unscaled.flatten().norm().item() / (sum(norms) / len(norms))
        merged_tv = unscaled / previous_lambda
    return theta0 + merged_tv


# ------------------------------------------------------------------ the batched methods against them
@pytest.mark.parametrize("name, layer_fn, scaling", [("tsv_merging", _ref_tsv_matrix, 1.0),
                                                     ("iso_c", _ref_iso_c_matrix, 1.5),
                                                     ("iso_cts", _ref_iso_cts_matrix, 1.5)])
def test_batched_data_free_svd_merge_equals_per_matrix_loop(suite, name, layer_fn, scaling):
    got = _merged_weights(mergebench.get_method(name).fn(_ctx(suite)))
    expected = _ref_layerwise(_ctx(suite), layer_fn, scaling)
    assert _max_difference(got, expected) <= TOL
    assert any(v.dim() == 2 for v in expected.values())


def test_batched_opcm_equals_per_matrix_loop(suite):
    order = list(suite.tasks)
    ctx = SequentialContext(suite, RunSpec.build("opcm", suite, device="cpu", orders=[order]), order, show_progress=False)
    *_, last = mergebench.get_method("opcm").fn(ctx)
    assert _max_difference(_merged_weights(last), _ref_opcm(suite)) <= TOL


@pytest.mark.parametrize("origin, prior, ratio", [("pretrained", 0.3, 1.0), ("average", 2.3, 0.16)])
def test_batched_adarank_svd_equals_per_matrix_loop(suite, origin, prior, ratio):
    """AdaRank (TA) and AdaRank (CART) at their starting masks: the merged matrices rebuilt from the batched SVDs
    equal those from one SVD per layer and task."""
    ctx = _ctx(suite)
    experts = [ctx.expert_weights(t) for t in ctx.tasks]
    theta = sum(experts) / len(experts) if origin == "average" else ctx.pretrained_weights
    taus = [e - theta for e in experts]
    merge = RankMaskedMerge(ctx.encoder(), theta, taus, prior, ratio, 10.0)
    got = merge.final_weights()
    keys = [k for k, v in theta.items() if is_low_rank_key(k, v)]
    assert keys == merge.mask_keys
    for k in keys:
        expected = theta[k].clone()
        for tau in taus:
            u, s, vh = torch.linalg.svd(tau[k], full_matrices=False)
            kept = int(s.shape[0] * ratio)
            expected += prior * (u[:, :kept] * s[:kept]) @ vh[:kept]
        assert (got[k] - expected).abs().max().item() <= TOL, k


def test_same_shape_batches_groups_by_shape_within_the_budget():
    items = [("a", torch.zeros(4, 4)), ("b", torch.zeros(3)), ("c", torch.ones(4, 4)), ("d", torch.zeros(4, 4)),
             ("e", torch.zeros(4, 4, dtype=torch.float64))]
    got = {tuple(keys): stacked for keys, stacked in same_shape_batches(items, max_bytes=2 * 16 * 4)}
    assert set(got) == {("a", "c"), ("d",), ("b",), ("e",)}
    assert got[("a", "c")].shape == (2, 4, 4) and got[("a", "c")][1].eq(1).all()
    assert got[("e",)].dtype == torch.float64
    big = [("x", torch.zeros(100)), ("y", torch.zeros(100))]
    assert [k for k, _ in same_shape_batches(big, max_bytes=10)] == [["x"], ["y"]]   # each alone, never dropped


def test_gram_routes_fall_back_to_the_svd_on_degenerate_matrices():
    """A task matrix LoRA never touched (all zeros) and rank-8 LoRA updates asked for 16 triplets: the Gram
    eigendecomposition cannot determine those vectors, so the factors are the SVD's own, finite."""
    from mergebench.api.linalg import polar_and_singular_values, svd, top_singular

    zero = torch.zeros(2, 50, 128)
    rotation, s = polar_and_singular_values(zero)
    u, s_svd, vh = svd(zero)
    assert torch.equal(rotation, u @ vh) and torch.equal(s, s_svd)
    g = torch.Generator().manual_seed(0)
    lora = torch.randn(3, 128, 8, generator=g) @ torch.randn(3, 8, 512, generator=g)
    u, s, vh = top_singular(lora, 16)
    u_svd, s_svd, vh_svd = svd(lora)
    assert torch.equal(u, u_svd[..., :16]) and torch.equal(s, s_svd[..., :16]) and torch.equal(vh, vh_svd[..., :16, :])
