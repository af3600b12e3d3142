"""Test-time adaptive merging (issue 4): AdaMerging, Representation Surgery, IntervMerge.

Fast tests on the micro suite, plus parameter counts on the real ViT-B/32 architecture (random weights). The speed
of their loops is measured in tests/benchmarks/test_bench_steps.py.
"""

from __future__ import annotations

import pytest
import torch

import mergebench
from mergebench.api.context import DataNotDeclaredError, MergeContext
from mergebench.engine.runspec import RunSpec
from mergebench.engine.functional import FunctionalMerge
from mergebench.methods.adaptive import entropy, functional_merge
from mergebench.api.models import AdaMergedModel
from mergebench.methods.intervmerge import (
    EfficientMini, InterventionModel, MiniNoReFT, NoReFT, _orthonormal_columns, efficient_slice_start,
    intervention_param_count,
)
from mergebench.methods.surgery import SurgeryModel
from mergebench.engine.metrics import count_macs, model_macs, parameter_counts, tensor_bytes
from mergebench.api.models import SharedModel, build_encoder, encoder_weights
from mergebench.api.pipeline import MethodCall
from mergebench.engine.run import run_one
from mergebench.engine.execution import execute, seed_everything

ADAPTIVE = ["adamerging_taskwise", "adamerging_layerwise", "adamerging_taskwise_pp", "adamerging_layerwise_pp",
            "surgery", "intervmerge", "intervmerge_mini", "intervmerge_efficient_mini"]
ADDONS = {"surgery", "intervmerge", "intervmerge_mini", "intervmerge_efficient_mini"}
VIT_B_32 = dict(image_size=224, patch_size=32, width=768, layers=12, heads=12, output_dim=512, act="quick_gelu")
FAST = {"steps": 2}


def _ctx(suite, method="adamerging_taskwise", seed=0, **settings):
    """The context of a run of ``method`` (so the data it declared) on ``suite``, on the CPU."""
    seed_everything(seed)
    return MergeContext(suite, RunSpec.build(method, suite, seed=seed, device="cpu", **settings), show_progress=False)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ registry
def test_all_variants_registered_with_metadata():
    for name in ADAPTIVE:
        spec = mergebench.get_method(name)
        assert spec.needs == "unlabeled"
        assert spec.family == "test-time adaptation"
        assert spec.paper is not None and spec.paper.arxiv and spec.paper.code.startswith("https://github.com/")
        assert spec.defaults_source and "official" in spec.defaults_source
        assert "Deviations" in spec.doc
        assert spec.is_addon == (name in ADDONS)
        assert spec.adds_params == (name in ADDONS)
        assert spec.hyperparameters["lr"].default == 1e-3
        assert spec.hyperparameters["batch_size"].default == 16
    assert mergebench.get_method("intervmerge").hyperparameters["rank"].default == 1
    assert mergebench.get_method("intervmerge_mini").hyperparameters["slice_width"].default == 64
    assert mergebench.get_method("surgery").hyperparameters["rank"].default == 16
    assert mergebench.get_method("adamerging_layerwise").hyperparameters["init"].default == 0.3
    assert mergebench.get_method("adamerging_layerwise_pp").hyperparameters["k"].default == 20


# ------------------------------------------------------------------ parameter formulas on ViT-B/32
@pytest.fixture(scope="module")
def vit_b32():
    torch.manual_seed(0)
    encoder = build_encoder(VIT_B_32).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    tensors = list(encoder.state_dict().values())
    return encoder, sum(t.numel() for t in tensors), sum(tensor_bytes(t) for t in tensors)


TASKS8 = ["SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD"]


@pytest.mark.parametrize("kind,expected", [("full", 147_648), ("mini", 12_480), ("efficient_mini", 6_240)])
def test_intervmerge_param_counts_vit_b32(vit_b32, kind, expected):
    encoder, backbone, nbytes = vit_b32
    model = InterventionModel(SharedModel(encoder), TASKS8, kind, rank=1, slice_width=64)
    try:
        counts = parameter_counts(model, backbone, nbytes)
        assert counts["added"] == expected
        assert counts["added_bytes"] == 4 * expected
        assert intervention_param_count(kind, 8, 12, 768, 1, 64) == expected
    finally:
        model.attach(SharedModel(build_encoder(dict(VIT_B_32, layers=1))))  # unhook the shared fixture encoder


def test_surgery_param_count_vit_b32(vit_b32):
    encoder, backbone, nbytes = vit_b32
    model = SurgeryModel(SharedModel(encoder), TASKS8, dim=512, rank=16)
    assert parameter_counts(model, backbone, nbytes)["added"] == 131_072 == 8 * 2 * 16 * 512


def test_layerwise_coefficients_one_per_tensor_vit_b32(vit_b32):
    # the official 158 rows = these 152 visual tensors + 6 text-side leftovers that never train
    assert len(encoder_weights(vit_b32[0])) == 152


# ------------------------------------------------------------------ functional merge
def test_functional_merge_matches_task_arithmetic_and_has_gradients(micro):
    ctx = _ctx(micro)
    fm = functional_merge(ctx, "layer", 0.3)
    assert fm.lambdas.shape == (len(ctx.pretrained_weights), len(ctx.tasks))
    ta = execute(MethodCall.parse("task_arithmetic(scaling=0.3)").resolve(), ctx)
    x = next(ctx.unlabeled(ctx.tasks[0], 8))
    with torch.no_grad():
        assert torch.allclose(fm(x), ta(x, ctx.tasks[0]), atol=1e-5)
    loss = entropy(ctx.head(ctx.tasks[0])(fm(x)))
    loss.backward()
    assert fm.lambdas.grad is not None and fm.lambdas.grad.abs().sum() > 0
    # the hard clamp: outside [0, 1] the coefficient gets no gradient
    fm2 = FunctionalMerge(ctx.encoder(), ctx.pretrained_weights, [ctx.task_vector(t) for t in ctx.tasks], "task", 1.5)
    entropy(ctx.head(ctx.tasks[0])(fm2(x))).backward()
    assert torch.all(fm2.lambdas.grad == 0)
    assert torch.allclose(fm2.coefficients(), torch.ones_like(fm2.lambdas))


def test_adamerging_lowers_entropy_and_keeps_coefficients_in_range(micro):
    ctx = _ctx(micro)
    model = mergebench.get_method("adamerging_layerwise").fn(ctx, steps=15, lr=0.02)
    assert isinstance(model, AdaMergedModel)
    lam = model.merge_state.coefficients
    assert lam.shape == (len(ctx.pretrained_weights), len(ctx.tasks))
    assert lam.min() >= 0 and lam.max() <= 1 and not torch.allclose(lam, torch.full_like(lam, 0.3))
    assert len(ctx.logs["adamerging_layerwise/loss"]) == 15
    ta = execute(MethodCall.parse("task_arithmetic").resolve(), ctx)
    before = after = 0.0
    with torch.no_grad():
        for t in ctx.tasks:
            x, head = ctx.exemplars(t, 64, split="test"), ctx.head(t)
            before += entropy(head(ta(x, t))).item()
            after += entropy(head(model(x, t))).item()
    assert after < before


def test_adamerging_pp_uses_ties_vectors(micro):
    ctx = _ctx(micro)
    model = mergebench.get_method("adamerging_taskwise_pp").fn(ctx, steps=0)
    assert model.merge_state.ties_k == 20 and model.merge_state.coefficients.shape == (1, len(ctx.tasks))
    ties = execute(MethodCall.parse("ties_merging(k=20, scaling=0.3)").resolve(), ctx)
    for k, v in ties.encoder.state_dict().items():  # 0 steps: TIES tvs with lambda 0.3 = the TIES baseline
        assert torch.allclose(model.encoder.state_dict()[k], v, atol=1e-6), k


# ------------------------------------------------------------------ add-ons
def test_surgery_leaves_base_untouched_and_approaches_the_experts(micro):
    ctx = _ctx(micro)
    base = execute(MethodCall.parse("task_arithmetic").resolve(), ctx)
    before = _state(base)
    model = mergebench.get_method("surgery").fn(ctx, base=base, steps=10, lr=0.01)
    assert _same(before, _state(base))
    assert model.base is base and all(not p.requires_grad for p in base.parameters())
    gap_base = gap_surgery = 0.0
    with torch.no_grad():
        for t in ctx.tasks:
            x = ctx.exemplars(t, 64, split="test")
            target = ctx.expert_encoder(t)(x)
            gap_base += (base(x, t) - target).abs().mean().item()
            gap_surgery += (model(x, t) - target).abs().mean().item()
    assert gap_surgery < gap_base


def test_surgery_adapter_is_identity_at_init(micro):
    ctx = _ctx(micro)
    base = execute(MethodCall.parse("task_arithmetic").resolve(), ctx)
    model = SurgeryModel(base, ctx.tasks, micro.encoder_config["output_dim"], 16)
    x = next(ctx.unlabeled(ctx.tasks[1], 4))
    with torch.no_grad():
        assert torch.equal(model(x, ctx.tasks[1]), base(x, ctx.tasks[1]))


@pytest.mark.parametrize("name,extra", [("intervmerge", {}), ("intervmerge_mini", {"slice_width": 16}),
                                        ("intervmerge_efficient_mini", {"slice_width": 16})])
def test_intervmerge_leaves_frozen_base_untouched(micro, name, extra):
    ctx = _ctx(micro)
    base = execute(MethodCall.parse("task_arithmetic").resolve(), ctx)
    before = _state(base)
    x = next(ctx.unlabeled(ctx.tasks[0], 8))
    with torch.no_grad():
        out_before = base(x, ctx.tasks[0])
    model = mergebench.get_method(name).fn(ctx, base=base, **FAST, **extra)
    assert _same(before, _state(base))
    with torch.no_grad():
        assert torch.equal(base(x, ctx.tasks[0]), out_before)  # the hooks act only inside the add-on's forward
        assert not torch.allclose(model(x, ctx.tasks[0]), out_before)
    assert all(not p.requires_grad for p in model.parameters())


def test_intervention_edits_only_the_cls_attention_output(micro):
    ctx = _ctx(micro)
    base = execute(MethodCall.parse("task_arithmetic").resolve(), ctx)
    model = InterventionModel(base, ctx.tasks, "full", rank=1)
    seen = []
    block0 = base.encoder.transformer.resblocks[0]
    handle = block0.attn.register_forward_hook(lambda m, a, out: seen.append(out[0].detach().clone()))
    x = next(ctx.unlabeled(ctx.tasks[0], 4))
    with torch.no_grad():
        base(x, ctx.tasks[0])
        model(x, ctx.tasks[0])
    handle.remove()
    raw, edited = seen
    assert raw.shape[1] == (32 // 8) ** 2 + 1  # batch-first (N, L, D): token 0 is CLS
    assert torch.equal(raw[:, 1:], edited[:, 1:])
    phi = model.interventions[ctx.tasks[0]][0]
    assert torch.allclose(edited[:, 0], phi(raw[:, 0]), atol=1e-6)
    h = raw[:, 0]
    manual = h + (phi.learned_source(h) - phi.proj_layer(h)) @ phi.proj_layer.weight
    assert torch.allclose(edited[:, 0], manual, atol=1e-6)


def test_intervention_forms():
    torch.manual_seed(0)
    h = torch.randn(5, 32)
    mini = MiniNoReFT(32, 1, 8, 0)
    out = mini(h)
    assert torch.equal(out[:, 8:], h[:, 8:]) and not torch.allclose(out[:, :8], h[:, :8])
    eff = EfficientMini(32, 2, 8, 16)
    with torch.no_grad():
        eff.rotate.mul_(3.0).add_(0.1)  # no longer orthonormal: the forward must orthonormalise it
    r = _orthonormal_columns(eff.rotate)
    assert torch.allclose(r.T @ r, torch.eye(2), atol=1e-5)
    q = torch.linalg.qr(eff.rotate)[0]
    assert torch.allclose((q.T @ r).abs(), torch.eye(2), atol=1e-5)  # same columns as QR, up to sign
    out = eff(h)
    assert torch.equal(out[:, :16], h[:, :16]) and torch.equal(out[:, 24:], h[:, 24:])
    delta = out[:, 16:24] - h[:, 16:24]
    assert torch.allclose(delta, delta[:1].expand_as(delta))  # input-independent shift
    assert torch.allclose(delta[0], r @ eff.learned_source, atol=1e-6)
    assert 0 <= eff.learned_source.min() and eff.learned_source.max() < 1  # U[0, 1) init
    assert [efficient_slice_start(b, 64, 768) for b in (0, 1, 11)] == [0, 64, 704]
    assert [efficient_slice_start(b, 64, 128) for b in range(4)] == [0, 64, 0, 64]
    noreft = NoReFT(32, 1)
    assert not torch.allclose(noreft(h), h)  # default init: not the identity (official NoReFT)
    with pytest.raises(ValueError, match="slice"):
        MiniNoReFT(32, 1, 64)


def test_joint_intervmerge_trains_the_adamerging_coefficients(micro):
    ctx = _ctx(micro)
    base = mergebench.get_method("adamerging_layerwise").fn(ctx, steps=2)
    before = _state(base)
    joint = mergebench.get_method("intervmerge").fn(ctx, base=base, steps=3, lr=0.01, joint=True)
    assert _same(before, _state(base))
    assert isinstance(joint.base, AdaMergedModel) and joint.base is not base
    assert not torch.allclose(joint.base.merge_state.coefficients, base.merge_state.coefficients)
    assert not _same(_state(joint.base.encoder), before)
    assert len(ctx.logs["intervmerge/lambda_mean/" + ctx.tasks[0]]) == 1
    frozen = mergebench.get_method("intervmerge").fn(ctx, base=base, steps=1, joint=False)
    assert frozen.base is base


# ------------------------------------------------------------------ harness integration
def test_pipeline_record_flops_and_params(micro, results_dir):
    ta = run_one("task_arithmetic", micro, results_dir=results_dir, show_progress=False)
    assert ta["status"] == "ok"
    base_macs = ta["flops"]["mean"]
    d, r = micro.encoder_config["output_dim"], 16
    width, blocks = micro.encoder_config["width"], micro.encoder_config["layers"]
    cases = {
        "surgery(steps=1)": (2 * d * r, len(micro.tasks) * 2 * r * d),
        "intervmerge(steps=1)": (blocks * 3 * width, intervention_param_count("full", 3, blocks, width)),
        "intervmerge_mini(steps=1, slice_width=16)": (blocks * 3 * 16,
                                                      intervention_param_count("mini", 3, blocks, width, 1, 16)),
        "intervmerge_efficient_mini(steps=1, slice_width=16)": (
            blocks * 16, intervention_param_count("efficient_mini", 3, blocks, width, 1, 16)),
    }
    for spec, (extra_macs, added) in cases.items():
        rec = run_one(spec, micro, results_dir=results_dir, show_progress=False)
        assert rec["status"] == "ok", rec.get("error")
        assert rec["params"]["added"] == added, spec
        assert rec["flops"]["mean"] == base_macs + extra_macs, spec  # the added modules' MACs are counted
        assert rec["method"]["adds_params"] is True
    rec = run_one("surgery(base=adamerging_layerwise(steps=1), steps=1)", micro, results_dir=results_dir,
                  show_progress=False)
    assert rec["status"] == "ok", rec.get("error")
    assert rec["method"]["pipeline"].startswith("surgery(base=adamerging_layerwise(")
    assert set(rec["timing"]["stages_s"]) >= {"surgery", "adamerging_layerwise"}
    assert {"adamerging_layerwise/loss", "surgery/loss"} <= set(rec["logs"])
    assert rec["data_used"] and rec["data_used"][0]["kind"] == "unlabeled"


def test_added_macs_per_task_match_model_macs(micro):
    ctx = _ctx(micro)
    base = execute(MethodCall.parse("task_arithmetic").resolve(), ctx)
    model = InterventionModel(base, ctx.tasks, "full", rank=2)
    shape = (3, 32, 32)
    with_interv = model_macs(model, ctx.tasks, shape)
    plain = count_macs(base.encoder, shape)["macs"]
    width, blocks = micro.encoder_config["width"], micro.encoder_config["layers"]
    assert all(v == plain + blocks * 3 * 2 * width for v in with_interv["per_task"].values())


def test_deterministic_under_a_seed(micro):
    spec = "intervmerge(base=adamerging_taskwise(steps=2), steps=2)"
    a = run_one(spec, micro, seed=3, write=False, show_progress=False)
    b = run_one(spec, micro, seed=3, write=False, show_progress=False)
    c = run_one(spec, micro, seed=4, write=False, show_progress=False)
    assert a["status"] == b["status"] == c["status"] == "ok"
    assert a["logs"] == b["logs"] and a["metrics"]["accuracy"] == b["metrics"]["accuracy"]
    assert a["logs"]["intervmerge/loss"] != c["logs"]["intervmerge/loss"]


@pytest.mark.parametrize("name", ADAPTIVE)
def test_methods_needing_data_refuse_without_it(micro, name):
    ctx = _ctx(micro, "task_arithmetic")
    kwargs = dict(steps=1)
    if name in ("intervmerge_mini", "intervmerge_efficient_mini"):
        kwargs["slice_width"] = 16
    if name in ADDONS:
        kwargs["base"] = execute(MethodCall.parse("task_arithmetic").resolve(), ctx)
    with pytest.raises(DataNotDeclaredError, match="unlabeled"):
        mergebench.get_method(name).fn(ctx, **kwargs)


def test_missing_data_split_is_a_failed_record(micro):
    rec = run_one("adamerging_taskwise(steps=1)", micro, unlabeled_split="nosuch", write=False,
                  show_progress=False)
    assert rec["status"] == "failed" and "nosuch" in rec["error"]


def test_intervmerge_needs_a_single_shared_encoder(micro):
    rec = run_one("intervmerge(base=individual, steps=1)", micro, write=False, show_progress=False)
    assert rec["status"] == "failed" and "exactly one shared encoder" in rec["error"]



# ------------------------------------------------------------------ precision and the written-out forward
@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_vit_forward_equals_the_encoders_own_forward_and_gradients(micro, act):
    """The adaptation loops' forward (vit_forward) computes what functional_call on the open_clip skeleton does,
    values and gradients in the coefficients, for both activations."""
    from mergebench.engine.functional import vit_forward, vit_forward_supports
    from mergebench.api.models import encoder_from_weights

    ctx = _ctx(micro)
    config = dict(micro.encoder_config, act=act)
    encoder = encoder_from_weights(config, dict(micro.pretrained), "cpu").eval()
    assert vit_forward_supports(encoder)
    fm = FunctionalMerge(encoder, ctx.pretrained_weights, [ctx.task_vector(t) for t in ctx.tasks], "layer", 0.3)
    x = torch.randn(6, 3, config["image_size"], config["image_size"])
    grads = []
    for forward in (lambda w: fm(x, w), lambda w: vit_forward(fm.encoder, w, x)):
        fm.lambdas.grad = None
        out = forward(fm.merged_weights())
        out.square().sum().backward()
        grads.append((out.detach(), fm.lambdas.grad.clone()))
    (ref, ref_grad), (fast, fast_grad) = grads
    assert torch.allclose(fast, ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(fast_grad, ref_grad, atol=1e-4, rtol=1e-4)
    assert ref_grad.abs().sum() > 0


def test_vit_forward_refuses_encoders_it_does_not_cover(micro):
    """An encoder with layer scale (or any other variant vit_forward does not write out) is not covered, and
    FunctionalMerge.embed falls back to the skeleton's own forward."""
    from open_clip.transformer import LayerScale

    from mergebench.engine.functional import vit_forward_supports

    ctx = _ctx(micro)
    fm = functional_merge(ctx, "task", 0.3)
    assert vit_forward_supports(fm.encoder)
    block = fm.encoder.transformer.resblocks[0]
    block.ls_1 = LayerScale(block.ln_1.normalized_shape[0], 0.5)
    assert not vit_forward_supports(fm.encoder)
    fm._fast = None
    x = next(ctx.unlabeled(ctx.tasks[0], 4))
    with torch.no_grad():
        w = fm.merged_weights()
        assert torch.equal(fm.embed(x, w), fm(x, w))  # the layer scale is applied: the skeleton ran


def test_precision_bf16_autocasts_the_encoder_and_stays_close_to_fp32(micro):
    """ctx.autocast(): bfloat16 under "bf16", nothing under "fp32"; a few AdaMerging steps in bf16 follow the fp32
    entropy trajectory closely but not bit for bit. The default "auto" is bf16 where the CPU multiplies bfloat16
    natively, else fp32."""
    from mergebench.api.context import native_bf16

    losses = {}
    for precision in ("fp32", "bf16"):
        seed_everything(0)
        ctx = _ctx(micro, precision=precision)
        with ctx.autocast():
            assert torch.is_autocast_enabled("cpu") == (precision == "bf16")
        mergebench.get_method("adamerging_layerwise").fn(ctx, steps=4)
        losses[precision] = torch.tensor(ctx.logs["adamerging_layerwise/loss"])
    assert _ctx(micro).precision == ("bf16" if native_bf16("cpu") else "fp32")
    assert torch.allclose(losses["bf16"], losses["fp32"], rtol=2e-2, atol=1e-2), losses
    assert not torch.equal(losses["bf16"], losses["fp32"])
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        _ctx(micro, precision="fp16")


def test_precision_is_recorded_and_keys_only_the_adaptive_runs(micro, results_dir):
    from mergebench.api.context import native_bf16
    from mergebench.errors import InputError
    from mergebench.engine.runspec import RunSpec

    def config(method, **settings):
        return RunSpec.build(method, micro, budget="smoke", device="cpu", **settings).config()

    ada, ta = "adamerging_taskwise", "task_arithmetic"
    assert config(ada, precision="fp32") != config(ada, precision="bf16")
    assert config(ada)["precision"] == ("bf16" if native_bf16("cpu") else "fp32")  # "auto", resolved
    assert config(ta, precision="fp32") == config(ta, precision="bf16")  # it cannot change TA
    rec = run_one("adamerging_taskwise", micro, results_dir=results_dir, show_progress=False, budget="smoke",
                  precision="fp32")
    assert rec["status"] == "ok", rec.get("error")
    assert rec["precision"] == "fp32" and rec["config"]["precision"] == "fp32"
    with pytest.raises(InputError, match="unknown precision 'half'"):
        run_one("adamerging_taskwise", micro, results_dir=results_dir, show_progress=False, precision="half")


def test_auto_precision_reuses_a_record_of_either_precision_and_an_explicit_one_asks_for_its_own(micro, results_dir):
    """Records made where "auto" is bf16 (AMX, CUDA) serve a machine where it is fp32, and the other way round."""
    from mergebench.api.context import native_bf16

    here = "bf16" if native_bf16("cpu") else "fp32"
    other = {"bf16": "fp32", "fp32": "bf16"}[here]
    kw = dict(results_dir=results_dir, show_progress=False, budget="smoke", count_flops=False)
    made = run_one("adamerging_taskwise", micro, precision=other, **kw)
    assert made["status"] == "ok" and not made.get("skipped")
    reused = run_one("adamerging_taskwise", micro, **kw)  # precision "auto": resolves to `here`, reuses `other`
    assert reused.get("skipped") and reused["precision"] == other and reused["config_hash"] == made["config_hash"]
    own = run_one("adamerging_taskwise", micro, precision=here, **kw)  # explicit: runs at its own precision
    assert not own.get("skipped") and own["precision"] == here and own["config_hash"] != made["config_hash"]
    assert run_one("adamerging_taskwise", micro, **kw)["config_hash"] == own["config_hash"]  # its own first


def test_cli_precision_option(micro, results_dir):
    from mergebench.cli import build_parser

    assert build_parser().parse_args(["run", "adamerging_taskwise", "--suite", "micro"]).precision == "auto"
    assert build_parser().parse_args(["run", "adamerging_taskwise", "--suite", "micro",
                                      "--precision", "fp32"]).precision == "fp32"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "adamerging_taskwise", "--suite", "micro", "--precision", "fp16"])


def test_auto_precision_follows_the_device(monkeypatch):
    """"auto" is bf16 exactly where the device has bfloat16 matrix hardware (CUDA bf16, AMX, AVX-512 BF16)."""
    from mergebench.api import context

    for amx, avx512_bf16, expected in ((False, False, "fp32"), (True, False, "bf16"), (False, True, "bf16")):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        assert context.resolve_precision("auto", "cpu") == expected
        assert context.resolve_precision("fp32", "cpu") == "fp32" and context.resolve_precision("bf16", "cpu") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert context.resolve_precision("auto", "cuda") == "fp32"
    with pytest.raises(ValueError, match="precision must be one of"):
        context.resolve_precision("half", "cpu")
