"""Data-free and closed-form merging (issue 5): one property from each paper, on small tensors or the micro suite."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mergebench.api.context import MergeContext
from mergebench.engine.runspec import RunSpec
from mergebench.engine.metrics import parameter_counts, tensor_bytes
from mergebench.api.activations import as_matrix, expert_sites, from_matrix, gram, iter_sites, psd_pinv, sq_norms
from mergebench.methods import cat as cat_module
from mergebench.methods.cat import cat_linear_bases, cat_mask, cat_project
from mergebench.methods.dare import dare_drop_
from mergebench.methods.fisher import diagonal_fisher, fisher_average
from mergebench.methods.iso import iso_c_matrix, iso_cts_matrix
from mergebench.api.activations import lot_linear, regmean_linear, shrink_off_diagonal
from mergebench.methods.lot import lot_norm_scale
from mergebench.methods import tall as tall_module
from mergebench.methods.tall import TallMaskModel, tall_mask
from mergebench.methods.ties import disjoint_merge, elect_sign, trim_top_k
from mergebench.methods.tsv import tsv_matrix
from mergebench.methods.wudi import wudi_loss, wudi_matrix, wudi_optimize, wudi_terms
from mergebench.api.pipeline import MethodCall
from mergebench.api.registry import get_method
from mergebench.engine.run import run_one
from mergebench.engine.execution import execute
from mergebench.api.weights import Weights

METHODS = ["lot_merging", "regmean", "fisher_merging", "cat_merging", "dare", "tall_masks", "consensus_ta",
           "consensus_ties", "tsv_merging", "iso_c", "iso_cts", "wudi_merging"]


def _ctx(suite, method="tall_masks", seed=0):
    """The context of a run of ``method`` (so the data it declared) on ``suite``, on the CPU."""
    return MergeContext(suite, RunSpec.build(method, suite, seed=seed, device="cpu"), show_progress=False)


def _weights_of(model):
    return {k: v for k, v in model.encoder.state_dict().items()}


# ------------------------------------------------------------------ activations
def test_collected_inputs_reproduce_every_layer_output(micro):
    """Inputs from the hand-run forward pass, pushed through each layer, give what the real (fused) forward computed."""
    ctx = _ctx(micro)
    encoder = ctx.expert_encoder(micro.tasks[0])
    images = ctx.exemplars(micro.tasks[0], 6)
    captured = {}

    def hook(name):
        def fn(module, inputs, output):
            captured[name] = output[0] if isinstance(output, tuple) else output
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in encoder.named_modules()
               if isinstance(m, (torch.nn.LayerNorm, torch.nn.Conv2d, torch.nn.MultiheadAttention))
               or n.endswith(("c_fc", "c_proj"))]
    with torch.no_grad():
        expected = encoder(images)      # eval + no_grad: nn.MultiheadAttention takes its fused fast path
    for h in handles:
        h.remove()
    out, state = {}, encoder.state_dict()
    sites = list(iter_sites(encoder, images, out))
    assert torch.allclose(out["features"], expected, atol=1e-5)
    checked = set()
    for site in sites:
        if site.name == "proj":
            got, want = site.inputs @ state["proj"], expected
        elif site.kind == "norm":
            got = site.inputs * state[site.weight] + state[site.bias]
            want = captured[site.name]
            want = want[:, 0] if site.name == "ln_post" else want
        elif site.name.endswith("attn.in_proj"):      # its input is ln_1's output
            got, want = site.inputs, captured[site.name.replace("attn.in_proj", "ln_1")]
        elif site.name.endswith("attn.out_proj"):     # the attention module's output
            got = F.linear(site.inputs, state[site.weight], state[site.bias])
            want = captured[site.name.replace(".out_proj", "")]
        else:
            bias = state[site.bias] if site.bias else None
            got = F.linear(site.inputs, as_matrix(site.weight, state[site.weight]), bias)
            want = captured[site.name]
            if site.name == "conv1":
                want = want.flatten(2).transpose(1, 2)
        assert torch.allclose(got.reshape(-1), want.reshape(-1), atol=1e-5), site.name
        checked.add(site.name.split(".")[-1])
    assert {"conv1", "ln_pre", "ln_1", "in_proj", "out_proj", "ln_2", "c_fc", "c_proj", "ln_post", "proj"} <= checked


def test_matrix_layout_round_trip(micro):
    for key, value in micro.pretrained.items():
        if value.dim() >= 2:
            assert torch.equal(from_matrix(key, as_matrix(key, value), value), value)
    assert as_matrix("proj", micro.pretrained["proj"]).shape == micro.pretrained["proj"].t().shape


def test_psd_pinv_matches_the_pseudo_inverse_and_drops_null_directions():
    a = torch.randn(40, 6, dtype=torch.float64) @ torch.randn(6, 10, dtype=torch.float64)  # rank 6 of 10
    g = a.t() @ a
    assert torch.allclose(psd_pinv(g), torch.linalg.pinv(g, hermitian=True, rtol=1e-10), atol=1e-8)
    assert torch.linalg.matrix_rank(psd_pinv(g)) == 6


# ------------------------------------------------------------------ LOT
def test_lot_is_the_exact_least_squares_solution():
    torch.manual_seed(0)
    xs = [torch.randn(30, 8, dtype=torch.float64) * (k + 1) for k in range(3)]
    ts = [torch.randn(5, 8, dtype=torch.float64) for _ in range(3)]
    got = lot_linear(ts, [gram(x, normalize=False) for x in xs])
    a = torch.cat(xs)                              # min_T sum_k ||X_k T^T - X_k T_k^T||^2 as one lstsq
    b = torch.cat([x @ t.t() for x, t in zip(xs, ts)])
    want = torch.linalg.lstsq(a, b).solution.t()
    assert torch.allclose(got, want, atol=1e-8)
    assert not torch.allclose(got, sum(ts) / 3, atol=1e-2)   # different inputs -> not the plain mean


def test_lot_reduces_to_the_mean_task_vector_with_equal_grams():
    torch.manual_seed(1)
    x = torch.randn(50, 8, dtype=torch.float64)
    ts = [torch.randn(4, 8, dtype=torch.float64) for _ in range(4)]
    assert torch.allclose(lot_linear(ts, [gram(x)] * 4), sum(ts) / 4, atol=1e-9)


def test_lot_rank_deficient_inputs_give_the_minimum_norm_solution():
    torch.manual_seed(2)
    xs = [torch.randn(3, 8, dtype=torch.float64) for _ in range(2)]     # 6 samples in 8 dims
    ts = [torch.randn(4, 8, dtype=torch.float64) for _ in range(2)]
    got = lot_linear(ts, [gram(x, normalize=False) for x in xs])
    a, b = torch.cat(xs), torch.cat([x @ t.t() for x, t in zip(xs, ts)])
    assert torch.allclose(got, (torch.linalg.pinv(a) @ b).t(), atol=1e-8)


def test_lot_norm_scale_minimizes_the_drift():
    torch.manual_seed(3)
    xhat = [torch.randn(20, 6) * torch.rand(6) * 3 for _ in range(3)]
    deltas = torch.randn(3, 6)
    gamma = lot_norm_scale(deltas, torch.stack([sq_norms(x) for x in xhat])).clone().requires_grad_(True)
    loss = sum(((gamma - d) * x.double()).pow(2).sum() for d, x in zip(deltas.double(), xhat))
    (grad,) = torch.autograd.grad(loss, gamma)
    assert grad.abs().max() < 1e-8
    assert not torch.allclose(gamma.detach().float(), deltas.mean(0), atol=1e-3)


def test_lot_merging_on_micro_solves_each_block_layer(micro):
    ctx = _ctx(micro)
    model = execute(MethodCall.parse("lot_merging(scaling=1.0, n_exemplars=8)").resolve(), ctx)
    merged = _weights_of(model)
    tvs = list(ctx.task_vectors().values())
    theta0 = ctx.pretrained_weights
    sites = {s[0].weight: s for s in expert_sites(_ctx(micro), 8)}
    key = "transformer.resblocks.1.mlp.c_proj.weight"
    want = lot_linear([tv[key] for tv in tvs], [gram(s.inputs) for s in sites[key]], 1e-8)
    assert torch.allclose(merged[key] - theta0[key], want.float(), atol=1e-5)
    bias = "transformer.resblocks.1.mlp.c_proj.bias"
    assert torch.allclose(merged[bias] - theta0[bias], sum(tv[bias] for tv in tvs) / len(tvs), atol=1e-6)
    for io in ("proj", "conv1.weight", "ln_post.weight"):    # io_layers='mean' (paper)
        assert torch.allclose(merged[io] - theta0[io], sum(tv[io] for tv in tvs) / len(tvs), atol=1e-6)
    assert ctx.data_used["unlabeled/train"]["images"] == {t: 8 for t in micro.tasks}


# ------------------------------------------------------------------ RegMean
def test_regmean_is_averaging_with_identity_grams():
    ts = [torch.randn(4, 6, dtype=torch.float64) for _ in range(3)]
    eye = torch.eye(6, dtype=torch.float64)
    assert torch.allclose(regmean_linear(ts, [eye] * 3, alpha=0.5), sum(ts) / 3, atol=1e-10)


def test_regmean_shrinks_only_off_diagonals_and_alpha_one_is_least_squares():
    g = torch.randn(5, 5, dtype=torch.float64)
    g = g @ g.t()
    s = shrink_off_diagonal(g, 0.3)
    assert torch.allclose(torch.diagonal(s), torch.diagonal(g))
    off = ~torch.eye(5, dtype=torch.bool)
    assert torch.allclose(s[off], 0.3 * g[off])
    xs = [torch.randn(20, 5, dtype=torch.float64) for _ in range(2)]
    ts = [torch.randn(3, 5, dtype=torch.float64) for _ in range(2)]
    grams = [gram(x) for x in xs]
    assert torch.allclose(regmean_linear(ts, grams, 1.0), lot_linear(ts, grams), atol=1e-9)
    diag_only = regmean_linear(ts, grams, 0.0)        # alpha=0: per-input-column weighted average
    d = torch.stack([torch.diagonal(gr) for gr in grams])
    assert torch.allclose(diag_only, (ts[0] * d[0] + ts[1] * d[1]) / d.sum(0), atol=1e-10)


# ------------------------------------------------------------------ Fisher
def test_fisher_is_the_mean_of_per_example_squared_gradients(micro):
    ctx = _ctx(micro)
    task = micro.tasks[1]
    encoder, head = ctx.expert_encoder(task), ctx.head(task)
    images = ctx.exemplars(task, 5)
    got = diagonal_fisher(encoder, head, images, torch.Generator().manual_seed(0), batch_size=3, chunk_size=2)
    g = torch.Generator().manual_seed(0)
    want = {k: torch.zeros_like(v) for k, v in encoder.named_parameters()}
    for batch in images.split(3):
        with torch.no_grad():
            labels = torch.multinomial(torch.softmax(head(encoder(batch)), -1), 1, generator=g).squeeze(1)
        for x, y in zip(batch, labels):
            model = ctx.encoder(ctx.expert_weights(task))
            torch.log_softmax(head(model(x[None])), -1)[0, y].backward()
            for k, p in model.named_parameters():
                want[k] += p.grad.pow(2) / len(images)
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-6, rtol=1e-4), k


def test_exact_fisher_is_the_official_expectation_over_classes(micro):
    """The loop of mmatena/model_merging fisher.py: per example, one backward per class, weighted by p(y|x)."""
    ctx = _ctx(micro)
    task = micro.tasks[1]
    encoder, head = ctx.expert_encoder(task), ctx.head(task)
    images = ctx.exemplars(task, 4)
    got = diagonal_fisher(encoder, head, images, None, batch_size=3, chunk_size=2, exact=True)
    model = ctx.encoder(ctx.expert_weights(task))
    want = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
    for x in images:
        log_probs = torch.log_softmax(head(model(x[None])), -1)[0]
        probs = log_probs.exp().detach()
        for i in range(len(probs)):
            model.zero_grad()
            log_probs[i].backward(retain_graph=True)
            for k, p in model.named_parameters():
                want[k] += probs[i] * p.grad.pow(2) / len(images)
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-7, rtol=1e-4), k
    assert get_method("fisher_merging").hyperparameters["estimator"].default == "exact"


def test_fisher_average_weights_by_information():
    tvs = [Weights({"w": torch.tensor([1.0, 1.0])}), Weights({"w": torch.tensor([-1.0, 3.0])})]
    fishers = [Weights({"w": torch.tensor([1.0, 1e-9])}), Weights({"w": torch.tensor([1e-9, 1.0])})]
    assert torch.allclose(fisher_average(tvs, fishers, [0.5, 0.5])["w"], torch.tensor([1.0, 3.0]), atol=1e-6)
    equal = [Weights({"w": torch.ones(2)})] * 2
    assert torch.allclose(fisher_average(tvs, equal, [0.5, 0.5])["w"], torch.tensor([0.0, 2.0]))


# ------------------------------------------------------------------ CAT
def test_cat_projection_removes_exactly_the_top_eigenvalues_of_the_conflict():
    torch.manual_seed(4)
    ts = torch.randn(2, 6, 5, dtype=torch.float64)
    xs = [torch.randn(40, 5, dtype=torch.float64) * torch.rand(5, dtype=torch.float64) * 2 for _ in range(2)]
    grams = torch.stack([gram(x) for x in xs])
    lam, c = 0.5, 2
    bases = cat_linear_bases(ts, grams, lam, c)
    projected = cat_project(ts, bases)

    def conflict(k, t):  # interference of task i's vector on task k minus lam * its own-task knowledge
        i = 1 - k
        return (t[i] @ grams[k] @ t[i].t()).trace() - lam * (t[i] @ grams[i] @ t[i].t()).trace()

    for k in range(2):
        m = ts[1 - k] @ (grams[k] - lam * grams[1 - k]) @ ts[1 - k].t()
        top = torch.linalg.eigvalsh(m).flip(0)[:c]
        assert bases[k].shape[1] == c
        assert torch.allclose(conflict(k, ts) - conflict(k, projected), top.sum(), rtol=1e-5, atol=1e-7)
        assert torch.allclose(bases[k].t() @ bases[k], torch.eye(bases[k].shape[1], dtype=torch.float64))


def test_cat_masks_the_top_c_dims_of_the_other_tasks():
    torch.manual_seed(1)
    v = torch.randn(3, 10)
    s = torch.rand(3, 10)
    masked = cat_mask(v, s, 0.5, 2)
    assert 0 < int((masked == 0).sum()) <= 3 * 2 * 2
    shift = cat_mask(v, None, 10.0, 2)          # constant input (shift, bias) at lambda_ln 10: scores all negative
    assert int((shift == 0).sum()) > 0
    for k in range(3):                          # task k's score: the dims where the others' shifts are smallest
        others = [i for i in range(3) if i != k]
        dims = (v[others] ** 2).sum(0).argsort()[:2]
        assert (shift[others][:, dims] == 0).all()


def test_cat_rescales_projections_to_their_norms_and_takes_features_on_the_scaled_models(micro, monkeypatch):
    t = torch.randn(3, 4, 5, dtype=torch.float64)
    p = t * torch.tensor([0.5, 2.0, 0.0], dtype=torch.float64)[:, None, None]
    r = cat_module.rescale_to_norms(p, t)
    assert torch.allclose(r[:2], t[:2]) and torch.equal(r[2], p[2])
    ctx = _ctx(micro, "cat_merging")
    seen = []
    real = cat_module.lockstep_sites

    def spy(encoders, images):
        seen.extend(e.state_dict() for e in encoders)
        return real(encoders, images)

    monkeypatch.setattr(cat_module, "lockstep_sites", spy)
    merged = _weights_of(execute(MethodCall.parse("cat_merging").resolve(), ctx))
    theta0, tvs = ctx.pretrained_weights, ctx.task_vectors()
    key = "transformer.resblocks.0.mlp.c_fc.weight"
    for state, task in zip(seen, micro.tasks):
        assert torch.allclose(state[key], theta0[key] + 0.4 * tvs[task][key], atol=1e-6)
    ta = {k: theta0[k] + 0.4 * sum(tv[k] for tv in tvs.values()) for k in theta0}
    for k in ("transformer.resblocks.0.mlp.c_fc.bias", "transformer.resblocks.0.ln_1.bias"):
        assert not torch.allclose(merged[k], ta[k])                  # biases and LN shifts are trimmed


# ------------------------------------------------------------------ DARE and TIES
def test_dare_keeps_one_minus_p_and_preserves_the_expectation():
    t = torch.randn(200_000)
    for p in (0.3, 0.9):
        out = dare_drop_(t.clone(), p, np.random.default_rng(1))
        kept = out != 0
        assert abs(kept.float().mean().item() - (1 - p)) < 0.01
        assert torch.allclose(out[kept], t[kept] / (1 - p))
        assert abs(out.sum().item() - t.sum().item()) < 4 * (t.pow(2).sum().item() * p / (1 - p)) ** 0.5
        assert abs(out.mean().item() - t.mean().item()) < 0.05
    ones = torch.ones(100_000)
    assert abs(dare_drop_(ones.clone(), 0.5, np.random.default_rng(2)).mean().item() - 1.0) < 0.02
    assert torch.equal(dare_drop_(ones.clone(), 0.0, np.random.default_rng(2)), ones)     # p = 0 drops nothing
    assert torch.equal(dare_drop_(ones.clone(), 0.5, np.random.default_rng(3)),
                       dare_drop_(ones.clone(), 0.5, np.random.default_rng(3)))        # the generator decides
    with pytest.raises(ValueError, match="p must be in"):
        dare_drop_(ones, 1.0, np.random.default_rng(0))


def test_dare_masks_depend_on_seed_task_and_tensor_not_on_the_reading_order(micro):
    from mergebench.methods.dare import DareContext

    key = "transformer.resblocks.0.mlp.c_fc.weight"
    first = DareContext(_ctx(micro, "dare"), 0.5, True)
    whole = [first.expert_weights(t)[key] for t in reversed(first.tasks)][::-1]      # whole experts, reversed order
    again = DareContext(_ctx(micro, "dare"), 0.5, True)
    streamed = next(iter(again.per_tensor([key])))[2]                                # one tensor across the experts
    assert all(torch.equal(a, b) for a, b in zip(whole, streamed))
    theta0 = first.pretrained_weights[key]
    dropped = [(e - theta0).abs() < 1e-12 for e in streamed]
    assert not torch.equal(dropped[0], dropped[1])                                   # each task its own mask
    other = DareContext(_ctx(micro, "dare", seed=1), 0.5, True)
    assert not torch.equal(next(iter(other.per_tensor([key])))[2][0], streamed[0])   # and each seed


def test_dare_wraps_the_base_merge(micro):
    ctx = _ctx(micro, "dare")
    base = _weights_of(execute(MethodCall.parse("task_arithmetic").resolve(), ctx))
    p0 = _weights_of(execute(MethodCall.parse("dare(p=0.0)").resolve(), ctx))
    assert all(torch.allclose(p0[k], base[k], atol=1e-6) for k in base)
    d = _weights_of(execute(MethodCall.parse("dare(p=0.5, merge='ties_merging(scaling=0.5)')").resolve(), ctx))
    theta0 = ctx.pretrained_weights
    key = "transformer.resblocks.0.mlp.c_fc.weight"
    assert not torch.allclose(d[key], base[key])
    ties = _weights_of(execute(MethodCall.parse("ties_merging(scaling=0.5)").resolve(), ctx))
    assert not torch.allclose(d[key], ties[key])                  # the drop-and-rescale reached TIES
    # TIES keeps each task's top 20% over the whole model, so at most 3 x 20% of the entries can move
    unchanged = torch.cat([(d[k] - theta0[k] == 0).flatten() for k in d]).float().mean()
    assert unchanged >= 0.4
    with pytest.raises(Exception, match="data-free"):
        execute(MethodCall.parse("dare(merge='regmean')").resolve(), ctx)


def _official_topk_values_mask(M, K=0.7):
    """Transcription of topk_values_mask (prateeky2806/ties-merging src/utils/merge_utils.py), 2-D input."""
    if K > 1:
        K /= 100
    n, d = M.shape
    k = int(d * K)
    k = d - k
    kth_values, _ = M.abs().kthvalue(k, dim=1, keepdim=True)
    mask = M.abs() >= kth_values
    return M * mask, mask.float().mean(dim=1)


@pytest.mark.parametrize("k", [20, 7.5, 50, 99])
def test_ties_trim_matches_the_official_topk_values_mask(k):
    torch.manual_seed(3)
    tvs = torch.randn(3, 37)
    tvs[1, :5] = tvs[1, 5]                            # tied magnitudes are kept alike
    assert torch.equal(trim_top_k(tvs, k), _official_topk_values_mask(tvs, k)[0])
    assert torch.equal(trim_top_k(tvs, 100), tvs)     # official kthvalue(0) raises; 100 % keeps everything


def test_ties_keeps_the_documented_fraction_and_agrees_with_the_elected_sign():
    torch.manual_seed(5)
    tvs = torch.randn(4, 1000)
    trimmed = trim_top_k(tvs, 20)
    assert ((trimmed != 0).sum(1) == 201).all()       # the official threshold rank keeps int(n k) + 1
    assert torch.equal(trimmed[trimmed != 0], tvs[trimmed != 0])
    assert (trimmed.abs().max(1).values == tvs.abs().max(1).values).all()
    sign = elect_sign(trimmed)
    merged = disjoint_merge(trimmed, sign, "sum")
    assert ((torch.sign(merged) == sign) | (merged == 0)).all()
    mean = disjoint_merge(trimmed, sign, "mean")
    assert mean.abs().max() <= trimmed.abs().max()


# ------------------------------------------------------------------ TALL masks / Consensus
def test_tall_mask_definition():
    tv = torch.tensor([[1.0, 0.1, -2.0], [0.5, 1.0, 2.0]])
    mtl = tv.sum(0)
    assert tall_mask(tv[0], mtl, 0.5).tolist() == [True, False, True]
    assert tall_mask(tv[1], mtl, 0.5).tolist() == [False, True, True]  # 0.5 > 0.5 * 1.0 is false: strict


def test_tall_masks_store_bits_and_route_by_task(micro):
    ctx = _ctx(micro)
    model = execute(MethodCall.parse("tall_masks(lam=0.4)").resolve(), ctx)
    assert isinstance(model, TallMaskModel)
    backbone = list(micro.pretrained.values())
    numel = sum(v.numel() for v in backbone)
    counts = parameter_counts(model, numel, sum(tensor_bytes(v) for v in backbone))
    assert counts["added_bits"] == len(micro.tasks) * numel
    assert counts["added_bytes"] == pytest.approx(4 * numel + len(micro.tasks) * numel / 8)
    tvs = ctx.task_vectors()
    flat = torch.stack([tv.flatten() for tv in tvs.values()])
    images = ctx.exemplars(micro.tasks[0], 4)
    outputs = {}
    for i, task in enumerate(micro.tasks):
        m = tall_mask(flat[i], flat.sum(0), 0.4)
        expected_w = ctx.pretrained_weights + tvs[task].unflatten(flat.sum(0) * m)
        with torch.no_grad():
            outputs[task] = model(images, task)
            assert torch.allclose(outputs[task], ctx.encoder(expected_w)(images), atol=1e-5)
    assert not torch.allclose(outputs[micro.tasks[0]], outputs[micro.tasks[1]])


def test_tall_takes_the_smallest_lambda_on_tied_validation_accuracy(micro, monkeypatch):
    monkeypatch.setattr(tall_module, "_val_accuracy", lambda *a: 0.5)
    _, _, chosen, _ = tall_module._masks(_ctx(micro), "ta", None, tall_module._val_sets(_ctx(micro), 4))
    assert set(chosen.values()) == {min(tall_module.LAMBDA_GRID)}      # official max(d, key=d.get) on a tie


def test_consensus_tunes_alpha_on_val_by_normalized_accuracy(micro, monkeypatch):
    ctx = _ctx(micro)
    theta0 = ctx.pretrained_weights
    delta = ctx.task_vectors()[micro.tasks[0]]
    key = max(delta, key=lambda k: delta[k].norm())

    def accuracy_peaked_at_0_7(ctx_, encoder, task, val):           # alpha read back from the encoder's weights
        w = encoder.state_dict()[key] - theta0[key]
        alpha = (w * delta[key]).sum() / (delta[key] * delta[key]).sum()
        return max(0.01, 1 - abs(alpha.item() - 0.7))

    val = tall_module._val_sets(ctx, 4)
    monkeypatch.setattr(tall_module, "_val_accuracy", accuracy_peaked_at_0_7)
    assert tall_module.tune_alpha(ctx, delta, val) == 0.7
    monkeypatch.setattr(tall_module, "_val_accuracy", lambda *a: 0.5)
    assert tall_module.tune_alpha(ctx, delta, val) == 0.1              # find_optimal_coef's strict > : first best
    assert get_method("consensus_ta").hyperparameters["scaling"].default is None


def test_consensus_extremes(micro):
    ctx = _ctx(micro)
    theta0 = ctx.pretrained_weights
    ta = _weights_of(execute(MethodCall.parse("task_arithmetic(scaling=0.3)").resolve(), ctx))
    all_kept = _weights_of(execute(MethodCall.parse("consensus_ta(k=0, lam=0.4, scaling=0.3)").resolve(), ctx))
    none_kept = _weights_of(execute(MethodCall.parse(f"consensus_ta(k={len(micro.tasks) + 1}, lam=0.4)").resolve(), ctx))
    some = _weights_of(execute(MethodCall.parse("consensus_ta(k=2, lam=0.4, scaling=0.3)").resolve(), ctx))
    for k in theta0:
        assert torch.allclose(all_kept[k], ta[k], atol=1e-6)
        assert torch.equal(none_kept[k], theta0[k])
    assert any(not torch.allclose(some[k], ta[k]) for k in theta0)


# ------------------------------------------------------------------ TSV-M, Iso-C / Iso-CTS
def test_tsv_bases_are_orthonormal_and_disjoint_tasks_are_summed_exactly():
    torch.manual_seed(6)
    t = torch.randn(4, 16, 12)
    merged, parts = tsv_matrix(t)
    k = 12 // 4
    assert parts["u"].shape == (16, 4 * k) and parts["vh"].shape == (4 * k, 12)
    assert torch.allclose(parts["u"].t() @ parts["u"], torch.eye(4 * k), atol=1e-5)
    assert torch.allclose(parts["vh"] @ parts["vh"].t(), torch.eye(4 * k), atol=1e-5)
    # rank-k task matrices on mutually orthogonal row and column spaces: nothing to decorrelate
    q_out, _ = torch.linalg.qr(torch.randn(16, 16))
    q_in, _ = torch.linalg.qr(torch.randn(12, 12))
    tasks = torch.stack([q_out[:, i * k:(i + 1) * k] @ torch.diag(torch.rand(k) + 0.5) @ q_in[:, i * k:(i + 1) * k].t()
                         for i in range(4)])
    assert torch.allclose(tsv_matrix(tasks)[0], tasks.sum(0), atol=1e-5)


def test_iso_c_flattens_the_spectrum_of_the_summed_task_matrix():
    torch.manual_seed(7)
    t = torch.randn(3, 10, 7)
    merged = iso_c_matrix(t)
    s = torch.linalg.svdvals(merged)
    assert torch.allclose(s, torch.full_like(s, torch.linalg.svdvals(t.sum(0)).mean().item()), rtol=1e-4)
    u, _, vh = torch.linalg.svd(t.sum(0), full_matrices=False)
    assert torch.allclose(merged, s[0] * u @ vh, atol=1e-5)   # same singular vectors as the sum


def test_iso_cts_has_a_flat_spectrum_and_spans_the_common_space():
    torch.manual_seed(8)
    t = torch.randn(4, 32, 24)
    merged = iso_cts_matrix(t, 0.8)
    s = torch.linalg.svdvals(merged)
    assert (s.max() - s.min()) / s.max() < 1e-4
    r = 24
    kc = r - round((r - int(r * 0.8)) / 4) * 4             # 20: the common space; 1 direction per task
    common = torch.linalg.svd(t.sum(0), full_matrices=False)[0][:, :kc]
    col_space = torch.linalg.svd(merged, full_matrices=False)[0]
    residual = common - col_space @ (col_space.t() @ common)
    assert residual.norm() / common.norm() < 1e-3
    assert not torch.allclose(merged, iso_c_matrix(t), atol=1e-3)


# ------------------------------------------------------------------ WUDI
def test_wudi_descends_towards_its_closed_form():
    torch.manual_seed(9)
    t = torch.randn(3, 5, 8)
    sq = t.flatten(1).pow(2).sum(1)
    merged, losses = wudi_matrix(t, steps=300, lr=1e-1)
    assert losses[-1] < 0.5 * losses[0] and losses == sorted(losses, reverse=True)[:1] + losses[1:]
    # the objective is quadratic: its minimizer is LOT's formula with G_t = tau_t^T tau_t / ||tau_t||^2
    closed = lot_linear(list(t), [x.t() @ x / n for x, n in zip(t.double(), sq.double())], 1e-12).float()
    assert wudi_loss(merged, t, sq) <= wudi_loss(closed, t, sq) * 1.001
    assert torch.allclose(merged, closed, atol=1e-3)
    assert not torch.allclose(closed, t.sum(0), atol=0.1)     # the start (sum of task vectors) is not optimal
    other = torch.randn(3, 5, 8) * 10
    together, _ = wudi_matrix(torch.stack([t, other]), steps=20, lr=1e-2)  # layers of one shape in one batch
    assert torch.allclose(together[0], wudi_matrix(t, steps=20, lr=1e-2)[0], atol=1e-6)
    assert torch.allclose(together[1], wudi_matrix(other, steps=20, lr=1e-2)[0], atol=1e-5)


def test_wudi_default_touches_only_block_linear_weights(micro):
    ctx = _ctx(micro, "wudi_merging")
    merged = _weights_of(execute(MethodCall.parse("wudi_merging(steps=3)").resolve(), ctx))
    theta0 = ctx.pretrained_weights
    assert torch.equal(merged["proj"], theta0["proj"]) and torch.equal(merged["ln_post.weight"], theta0["ln_post.weight"])
    assert not torch.equal(merged["transformer.resblocks.0.attn.in_proj_weight"],
                           theta0["transformer.resblocks.0.attn.in_proj_weight"])


def test_wudi_leaves_a_tensor_no_task_changed_at_zero():
    """LoRA experts leave proj and the positional embedding unadapted: all their task vectors are zero. The WUDI
    objective of such a tensor is 0 / 0 in the direct form (fusion_bench's wudi_merging returns NaN there);
    others='mean' keeps it at theta_0."""
    zeros = [torch.zeros(6, 4) for _ in range(3)]
    merged, losses = wudi_optimize(*wudi_terms(zeros), steps=5)
    assert torch.equal(merged, torch.zeros(6, 4)) and all(math.isfinite(x) for x in losses)


# ------------------------------------------------------------------ registration and end to end
def test_registered_with_paper_and_defaults_source():
    for name in METHODS:
        spec = get_method(name)
        assert spec.paper is not None and spec.paper.arxiv and spec.defaults_source, name
        assert spec.doc and not spec.is_addon, name
    assert get_method("lot_merging").hyperparameters["scaling"].default == 1.2
    assert get_method("lot_merging").hyperparameters["n_exemplars"].default == 64
    assert get_method("lot_merging").needs == "unlabeled"
    assert get_method("tall_masks").adds_params


@pytest.mark.parametrize("spec", [
    "lot_merging(n_exemplars=8)", "lot_merging(n_exemplars=8, io_layers='closed_form')", "regmean(n_exemplars=8)",
    "fisher_merging(n_exemplars=8)", "cat_merging", "dare", "dare(merge='ties_merging(scaling=0.5)')",
    "tall_masks(val_images=16)", "consensus_ta(val_images=16)", "consensus_ties(lam=0.5)", "tsv_merging", "iso_c",
    "iso_cts", "wudi_merging(steps=5)"])
def test_runs_end_to_end_on_micro(micro, results_dir, spec):
    # FLOPs (fvcore tracing, seconds) only for the task-routing model; the shared encoders are all alike
    rec = run_one(spec, micro, results_dir=results_dir, force=True, show_progress=False,
                  count_flops=spec.startswith("tall_masks"))
    assert rec["status"] == "ok", rec.get("traceback")
    assert 0 <= rec["metrics"]["avg_accuracy"] <= 100
    if get_method(MethodCall.parse(spec).name).needs != "nothing" and "lam=" not in spec:
        assert rec["data_used"], "data a method used must be recorded"


def test_wudi_quadratic_form_takes_the_same_adam_steps_as_the_direct_objective():
    torch.manual_seed(10)
    t = torch.randn(4, 12, 6) * 0.01
    fast, losses = wudi_matrix(t, steps=50, lr=1e-4)
    ref = torch.nn.Parameter(t.sum(0).clone())
    opt = torch.optim.Adam([ref], lr=1e-4)
    sq = t.flatten(1).pow(2).sum(1)
    for _ in range(50):
        opt.zero_grad()
        loss = wudi_loss(ref, t, sq)
        loss.backward()
        opt.step()
    assert torch.allclose(fast, ref.detach(), atol=1e-7)
    assert losses[-1] == pytest.approx(wudi_loss(ref.detach(), t, sq).item(), rel=1e-2)


@pytest.mark.parametrize("failing", [{torch.float32}, {torch.float32, torch.float64}])
def test_iso_retries_an_svd_that_fails_to_converge(monkeypatch, failing):
    torch.manual_seed(2)
    task_matrices = torch.randn(3, 12, 9)
    expected_c, expected_cts = iso_c_matrix(task_matrices), iso_cts_matrix(task_matrices)
    real_svd, calls = torch.linalg.svd, []

    def svd(a, *args, **kwargs):           # LAPACK's non-convergence, forced for the listed dtypes
        calls.append(a.dtype)
        if a.dtype in failing:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real_svd(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", svd)
    got_c, got_cts = iso_c_matrix(task_matrices), iso_cts_matrix(task_matrices)
    assert torch.float64 in calls                     # the retry ran (in float64; then scipy's gesvd if that failed)
    assert got_c.dtype == torch.float32
    assert torch.allclose(got_c, expected_c, atol=1e-5) and torch.allclose(got_cts, expected_cts, atol=1e-5)
