"""Data-free merges that stream over tensors: the same merged weights as the whole-model forms they replace, and
peak memory near the experts' own size.

The reference functions below are frozen copies of the whole-model implementations (every task vector at once;
WUDI's per-shape stacks of float64 Grams) that the streaming ones replaced.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mergebench.api.context import MergeContext
from mergebench.api.activations import is_block_linear_weight
from mergebench.methods.iso import iso_c_matrix
from mergebench.methods.tsv import tsv_matrix
from mergebench.api.pipeline import MethodCall
from mergebench.api.registry import get_method
from mergebench.engine.execution import execute, seed_everything
from mergebench.engine.runspec import RunSpec
from mergebench.api.weights import Weights


def _ctx(suite):
    seed_everything(0)
    return MergeContext(suite, RunSpec.build("task_arithmetic", suite, device="cpu"), show_progress=False)


def _merged(suite, spec: str) -> Weights:
    model = execute(MethodCall.parse(spec).resolve(), _ctx(suite))
    return Weights({k: v.detach().clone() for k, v in model.encoder.state_dict().items()})


# ------------------------------------------------------------------ frozen whole-model references
def _ref_task_arithmetic(ctx, scaling=0.3):
    return ctx.pretrained_weights + scaling * sum(ctx.task_vector(t) for t in ctx.tasks)   # every tau_t whole


def _ref_weight_averaging(ctx):
    return sum(ctx.expert_weights(t) for t in ctx.tasks) / len(ctx.tasks)


def _ref_tsv(ctx, scaling=1.0):
    tvs = list(ctx.task_vectors().values())
    merged = Weights()
    for key, ref in tvs[0].items():
        stacked = torch.stack([tv[key] for tv in tvs])
        merged[key] = tsv_matrix(stacked)[0].to(ref.dtype) if ref.dim() == 2 else stacked.mean(0)
    return ctx.pretrained_weights + scaling * merged


def _ref_iso_c(ctx, scaling=1.5):
    tvs = list(ctx.task_vectors().values())
    merged = Weights()
    for key, ref in tvs[0].items():
        stacked = torch.stack([tv[key] for tv in tvs])
        merged[key] = iso_c_matrix(stacked).to(ref.dtype) if ref.dim() == 2 else stacked.mean(0)
    return ctx.pretrained_weights + scaling * merged


def _ref_ties(ctx, k=20.0, scaling=0.3, merge="sum"):
    from mergebench.methods.ties import disjoint_merge, elect_sign, trim_top_k

    tvs = list(ctx.task_vectors().values())
    trimmed = trim_top_k(torch.stack([tv.flatten() for tv in tvs]), k)
    merged = disjoint_merge(trimmed, elect_sign(trimmed), merge)
    return ctx.pretrained_weights + scaling * tvs[0].unflatten(merged)


def _ref_wudi_matrix(task_matrices, steps, lr):
    t = task_matrices.float()
    t64 = t.double()
    sq = t64.flatten(-2).pow(2).sum(-1).clamp_min(torch.finfo(torch.float64).tiny)
    a = t64.transpose(-1, -2) @ t64 / sq[..., None, None]
    s_mat = a.sum(-3).float()
    p_mat = (t64 @ a).sum(-3).float()
    const = (t64 @ a * t64).sum((-3, -2, -1)).sum().item()
    merged = torch.nn.Parameter(t.sum(-3).clone())
    opt = torch.optim.Adam([merged], lr=lr, weight_decay=0.0)
    losses = []
    with torch.no_grad():
        for _ in range(steps):
            ms = merged @ s_mat
            losses.append(((ms * merged).sum() - 2 * (merged * p_mat).sum()).item() + const)
            merged.grad = 2 * (ms - p_mat)
            opt.step()
    return merged.detach(), losses


def _ref_wudi(ctx, steps=300, lr=1e-5, others="pretrained"):
    tvs = list(ctx.task_vectors().values())
    merged = Weights({k: torch.zeros_like(v) if others == "pretrained" else sum(tv[k] for tv in tvs) / len(tvs)
                      for k, v in tvs[0].items()})
    groups: dict[tuple, list[str]] = {}
    for key, ref in tvs[0].items():
        if (is_block_linear_weight(key) if others == "pretrained" else ref.dim() == 2):
            groups.setdefault(tuple(ref.shape), []).append(key)
    logs = {}
    for shape, keys in groups.items():
        stacked = torch.stack([torch.stack([tv[k] for tv in tvs]) for k in keys])
        result, losses = _ref_wudi_matrix(stacked, steps, lr)
        logs[f"wudi_loss/{'x'.join(map(str, shape))}"] = losses[-1]
        for k, r in zip(keys, result):
            merged[k] = r.to(tvs[0][k].dtype)
    return ctx.pretrained_weights + merged, logs


# ------------------------------------------------------------------ same weights as before
@pytest.mark.parametrize("spec,reference", [
    ("task_arithmetic", _ref_task_arithmetic), ("task_arithmetic(scaling=0.7)", lambda c: _ref_task_arithmetic(c, 0.7)),
    ("weight_averaging", _ref_weight_averaging)])
def test_streamed_arithmetic_is_bitwise_the_whole_model_expression(micro, spec, reference):
    merged, expected = _merged(micro, spec), reference(_ctx(micro))
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[k], expected[k]) for k in expected)


@pytest.mark.parametrize("spec,reference", [
    ("ties_merging", _ref_ties), ("ties_merging(k=100, merge='mean', scaling=1.0)", lambda c: _ref_ties(c, 100, 1.0, "mean")),
    ("ties_merging(k=5)", lambda c: _ref_ties(c, 5))])
def test_streamed_ties_equals_the_whole_model_form_bitwise(micro, spec, reference):
    merged, expected = _merged(micro, spec), reference(_ctx(micro))
    assert all(torch.equal(merged[k], expected[k]) for k in expected)


@pytest.mark.parametrize("spec,reference", [("tsv_merging", _ref_tsv), ("iso_c", _ref_iso_c)])
def test_streamed_svd_merges_equal_the_layer_by_layer_form(micro, spec, reference):
    """Same-shaped layers share one batched decomposition, which rounds differently from one call per layer: the
    weights agree to float32 rounding (1e-6 of each tensor's largest entry), not bit for bit."""
    merged, expected = _merged(micro, spec), reference(_ctx(micro))
    for k in expected:
        assert (merged[k] - expected[k]).abs().max() <= 1e-6 * expected[k].abs().max(), k


@pytest.mark.parametrize("steps,lr,others", [(300, 1e-5, "pretrained"), (40, 1e-3, "pretrained"), (40, 1e-3, "mean")])
def test_wudi_layer_by_layer_equals_the_stacked_float64_form(micro, steps, lr, others):
    ctx = _ctx(micro)
    model = execute(MethodCall.parse(f"wudi_merging(steps={steps}, lr={lr}, others='{others}')").resolve(), ctx)
    merged = model.encoder.state_dict()
    expected, logs = _ref_wudi(_ctx(micro), steps, lr, others)
    theta0 = ctx.pretrained_weights
    for key in expected:
        # the optimized task vectors agree to float32 rounding; everything else is bit for bit
        assert torch.allclose(merged[key] - theta0[key], expected[key] - theta0[key], rtol=1e-4, atol=1e-7), key
    assert not torch.equal(expected["transformer.resblocks.0.mlp.c_fc.weight"],
                           theta0["transformer.resblocks.0.mlp.c_fc.weight"])
    assert {k: v[-1] for k, v in ctx.logs.items()} == pytest.approx(logs, rel=1e-5)


class _CancellingContext(MergeContext):
    """micro's experts, except that tasks 0 and 1 move one block of entries by +x and -x and the others leave
    it: the trimmed values there sum to exactly zero, so TIES's whole-model majority sign decides them."""

    KEY, ROWS = "transformer.resblocks.0.mlp.c_fc.weight", slice(0, 3)

    def _expert_tensors(self, task):
        w = Weights(super()._expert_tensors(task))
        i = self.tasks.index(task)
        block = w[self.KEY].clone()
        block[self.ROWS] = self._source.pretrained[self.KEY][self.ROWS] + (1.0 if i == 0 else -1.0 if i == 1 else 0.0)
        w[self.KEY] = block
        return w


@pytest.mark.parametrize("merge", ["sum", "mean"])
def test_streamed_ties_completes_exact_cancellations_with_the_majority_sign(micro, merge):
    ctx = _CancellingContext(micro, RunSpec.build("ties_merging", micro, device="cpu"), show_progress=False)
    model = get_method("ties_merging").fn(ctx, merge=merge)
    merged = model.encoder.state_dict()
    expected = _ref_ties(_CancellingContext(micro, RunSpec.build("ties_merging", micro, device="cpu"), show_progress=False), merge=merge)
    key, rows = _CancellingContext.KEY, _CancellingContext.ROWS
    moved = merged[key][rows] - micro.pretrained[key][rows]
    assert moved.abs().min() > 0.1            # decided by the majority sign, not left at theta_0
    assert all(torch.equal(merged[k], expected[k]) for k in expected)


def test_shared_model_owns_fresh_results_and_copies_inputs(micro):
    ctx = _ctx(micro)
    theta0 = ctx.pretrained_weights
    fresh = Weights({k: v * 1.0 for k, v in theta0.items()})
    model = ctx.shared_model(fresh)
    params = model.encoder.state_dict()
    key = "transformer.resblocks.0.attn.in_proj_weight"
    assert params[key].data_ptr() == fresh[key].data_ptr()               # no copy of a fresh result
    again = ctx.shared_model(fresh).encoder.state_dict()                 # a second model copies it
    assert again[key].data_ptr() != fresh[key].data_ptr()
    built = ctx.shared_model(theta0).encoder.state_dict()                # the context's theta_0 is copied
    assert all(built[k].data_ptr() != theta0[k].data_ptr() for k in theta0)
    built[key].add_(1.0)
    assert torch.equal(ctx.pretrained_weights[key], micro.pretrained[key])
    task = micro.tasks[0]                                                 # an expert copy is the caller's own;
    built = ctx.shared_model(ctx.expert_weights(task)).encoder.state_dict()   # the suite's tensors never shared
    stored = micro.expert_weights(task)
    assert all(built[k].data_ptr() != stored[k].data_ptr() for k in stored if k in built)
    built[key].add_(1.0)
    assert not torch.equal(built[key], micro.expert_weights(task)[key])


def test_per_tensor_reads_the_context_experts(micro):
    """DARE's experts (and the sequential protocol's arrival check) apply to the streaming accessors too."""
    from mergebench.methods.dare import DareContext

    ctx = DareContext(_ctx(micro), 0.5, True)
    key = "transformer.resblocks.0.mlp.c_fc.weight"
    streamed = dict((k, [e.clone() for e in ex]) for k, _, ex in ctx.per_tensor([key]))[key]
    assert all(torch.equal(s, ctx.expert_weights(t)[key]) for s, t in zip(streamed, ctx.tasks))
    assert not torch.equal(streamed[0], micro.expert_weights(micro.tasks[0])[key])
    stacks = dict(ctx.task_vector_stacks([key]))
    assert torch.equal(stacks[key][1], ctx.task_vector(ctx.tasks[1])[key])


# ------------------------------------------------------------------ memory
MEMORY_SCRIPT = r"""
import ctypes, gc, json, sys
import torch
torch.set_num_threads(1)
from mergebench.engine import memory
from mergebench.api.context import MergeContext
from mergebench.api.pipeline import MethodCall
from mergebench.api.registry import get_method
from mergebench.engine.runspec import RunSpec
from mergebench.suites import get_suite

encoder = dict(image_size=224, patch_size=16, width=256, layers=12, heads=4, output_dim=128, act="quick_gelu")
suite = get_suite("synthetic-tiny", fraction=0.0002, encoder=encoder, verbose=False)
experts = [suite.expert_weights(t) for t in suite.tasks]
expert_bytes = sum(v.numel() * v.element_size() for e in experts for v in e.values())
out = {}
for spec in sys.argv[1:]:
    call = MethodCall.parse(spec).resolve()
    peaks = []
    for _ in range(2):  # the lower of two runs: what a merge holds shows in both, the allocator's timing in one
        ctx = MergeContext(suite, RunSpec.build(call, suite, device="cpu"), show_progress=False)
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)   # freed heap memory would hide new allocations from the RSS peak
        start = memory.rss_bytes()
        memory.reset_peak()
        with torch.no_grad():
            model = get_method(call.name).fn(ctx, **call.hparams)
        peaks.append((memory.peak_rss_bytes() - start) / expert_bytes)
        del model, ctx
    out[spec] = min(peaks)
print(json.dumps(out))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-merge peak RSS needs Linux's clear_refs")
def test_data_free_merges_stay_near_the_experts_size():
    """Peak memory of a merge above what the loaded experts already take, as a share of the experts' bytes:
    under 0.75 (the target is 0.5: total within 1.5x the experts' own size). Every task vector at once would be
    1.0 or more."""
    specs = ["task_arithmetic", "weight_averaging", "tsv_merging", "iso_c", "wudi_merging(steps=2)",
             "ties_merging", "dare"]
    env = dict(os.environ, MERGEBENCH_QUIET="1")
    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, *specs], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    overhead = json.loads(result.stdout.strip().splitlines()[-1])
    # the target is 0.5 (1.5x the experts); measured here 0.25 (TA, WA) to 0.62 (TSV-M, which holds each task's
    # SVD factors of a layer at once), varying by a tenth from run to run with experts handed out as copies (read-
    # only inputs). 0.75 still fails a merge that holds every task vector at once (1.0 or more).
    assert all(v <= 0.75 for v in overhead.values()), overhead


def test_a_merge_by_parts_on_threads_leaves_no_thread_running(micro, tmp_path):
    """TIES shares its parts among threads (mergebench.api.weights.map_parts); none outlives the merge, so the
    worker finds nothing left running."""
    from mergebench.engine.run import run_one

    record = run_one("ties_merging", micro, results_dir=tmp_path, count_flops=False, show_progress=False)
    assert record["status"] == "ok" and not record.get("worker", {}).get("left_running")
