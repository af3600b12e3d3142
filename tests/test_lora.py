"""LoRA experts (micro-lora, PEFT adapters in the real suite) and CoPA-Merging."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml
from safetensors.torch import save_file

from mergebench import MergeContext, leaderboard
from mergebench.api.lora import OPEN_CLIP_TARGETS, LoraFactor
from mergebench.methods.copa import NO_LORA, copa_merge_factors, copa_merging
from mergebench.api.registry import get_method, unmet_requirements
from mergebench.engine.run import run_one
from mergebench.engine.runspec import RunSpec
from mergebench.suites import checkpoints, get_suite
from mergebench.suites.real import zoo
from mergebench.suites.base import NoLoraExpertsError


def _adapted(name: str) -> bool:
    return any(name.endswith(t) for t in OPEN_CLIP_TARGETS.values())


def test_lora_experts_are_rank_r_updates_of_the_adapted_matrices(micro_lora):
    rank = micro_lora.info["lora"]["rank"]
    pre = micro_lora.pretrained
    for task in micro_lora.tasks:
        expert, factors = micro_lora.expert_weights(task), micro_lora.lora_factors(task)
        changed = {k for k in pre if not torch.equal(expert[k], pre[k])}
        assert changed and all(_adapted(k) for k in changed), sorted(changed)
        assert {f.target for f in factors.values()} == {k for k in pre if _adapted(k)}
        for f in factors.values():
            assert f.rank == rank and f.rows is None
            # exactly base + scale * B @ A
            assert torch.equal(expert[f.target], pre[f.target] + (f.B @ f.A) * f.scale)
            sv = torch.linalg.svdvals((expert[f.target] - pre[f.target]).double())
            assert sv[0] > 0 and (sv[rank:] <= 1e-5 * sv[0]).all(), (f.target, sv)


def test_adapters_are_stored_in_peft_layout_and_cached(micro_lora, monkeypatch):
    from mergebench.suites import artifact
    from mergebench.suites.mini8 import load

    folders = [artifact.path("micro-lora") / "adapters" / "digits"]  # the committed adapters
    assert (folders[0] / "adapter_config.json").exists()
    config = json.loads((folders[0] / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == micro_lora.info["lora"]["rank"]
    from safetensors.torch import load_file
    keys = set(load_file(folders[0] / "adapter_model.safetensors"))
    assert "base_model.model.transformer.resblocks.0.attn.in_proj.lora_A.weight" in keys
    assert "base_model.model.transformer.resblocks.1.mlp.c_proj.lora_B.weight" in keys

    def no_generation(*args, **kwargs):
        raise AssertionError("a second load must generate nothing")
    monkeypatch.setattr(load, "generate_data", no_generation)
    again = get_suite("micro-lora", verbose=False)
    for task in again.tasks:
        assert all(torch.equal(again.expert_weights(task)[k], micro_lora.expert_weights(task)[k])
                   for k in micro_lora.pretrained)
    assert again.info["cache_key"] == micro_lora.info["cache_key"] != get_suite("micro", verbose=False).info["cache_key"]


# ------------------------------------------------------------------ CoPA-Merging
def _official_copa(As, Bs, mask_ratio=0.2, att_ratio=0.2, fuse=2.0):
    """The official merge (AuroraZengfh/RobustMerge, llava/model/builder.py), transcribed for one module."""
    def clamp(x, min_ratio=0, max_ratio=0):
        d = x.size(1)
        sorted_x, _ = torch.sort(x, dim=1)
        lo = sorted_x[:, int(d * min_ratio)].unsqueeze(1)
        hi = sorted_x[:, int(d * (1 - max_ratio) - 1)].unsqueeze(1)
        return torch.clamp(x, lo, hi)

    fuse_weight = (torch.ones(len(As)) * fuse)[:, None, None]
    merged = {}
    for name, stacked in (("lora_A", torch.stack(As)), ("lora_B", torch.stack(Bs))):
        T, d1, d2 = stacked.shape
        flat = stacked.reshape(-1, d1 * d2)
        kth, _ = flat.abs().kthvalue(int(d1 * d2 * (1 - mask_ratio)), dim=1, keepdim=True)
        masks = (flat.abs() >= kth).reshape(T, d1, d2)
        trimmed = masks * stacked
        if name == "lora_A":
            s_vector = torch.sum(abs(stacked), dim=-1) / torch.sum(abs(masks * stacked), dim=-1)
            scale = clamp(s_vector, 1 - att_ratio, 0)
            merged[name] = torch.sum(fuse_weight * trimmed, dim=0)
        else:
            merged[name] = torch.sum(fuse_weight * scale.unsqueeze(1) * trimmed, dim=0) / torch.sum(scale.unsqueeze(1), dim=0)
    return merged["lora_A"], merged["lora_B"]


def test_copa_factors_equal_the_official_merge():
    g = torch.Generator().manual_seed(0)
    As = [torch.randn(16, 40, generator=g) for _ in range(3)]
    Bs = [torch.randn(24, 16, generator=g) for _ in range(3)]
    A_ref, B_ref = _official_copa(As, Bs)
    merged = copa_merge_factors([LoraFactor("w", a, b, 2.0) for a, b in zip(As, Bs)])
    assert torch.allclose(merged.A, A_ref) and torch.allclose(merged.B, 2.0 * B_ref, atol=1e-6)
    assert merged.rank == 16 and merged.scale == 1.0
    # the kept fraction is the official one: entries >= the int(0.8 n)-th smallest magnitude
    assert (merged.A != 0).sum() <= 3 * (640 - int(640 * 0.8) + 1)
    # cross-task normalization and complementary scales change the result (vs. a plain pruned mean of B)
    plain_B = 2.0 * sum(torch.where(b.abs() >= b.abs().flatten().kthvalue(int(384 * 0.8)).values, b, 0) for b in Bs) / 3
    assert not torch.allclose(merged.B, 2.0 * plain_B)


def test_copa_without_pruning_is_sum_of_A_and_mean_of_B():
    g = torch.Generator().manual_seed(1)
    fs = [LoraFactor("w", torch.randn(4, 10, generator=g), torch.randn(6, 4, generator=g), 0.5) for _ in range(3)]
    merged = copa_merge_factors(fs, keep=1.0, fuse_weight=3.0)
    assert torch.allclose(merged.A, 3.0 * sum(f.A for f in fs))
    assert torch.allclose(merged.B, 3.0 * sum(f.B * 0.5 for f in fs) / 3)
    with pytest.raises(ValueError, match="equal rank"):
        copa_merge_factors(fs + [LoraFactor("w", torch.randn(2, 10), torch.randn(6, 2), 0.5)])


def test_copa_on_one_expert_without_pruning_returns_that_expert(micro_lora):
    task = micro_lora.tasks[1]
    single = dataclasses.replace(micro_lora, tasks=[task])
    spec = RunSpec.build("copa_merging", single, device="cpu")
    model = copa_merging(MergeContext(single, spec, show_progress=False), keep=1.0, fuse_weight=1.0)
    merged = model.encoder.state_dict()
    expert = micro_lora.expert_weights(task)
    assert all(torch.allclose(merged[k], expert[k], atol=1e-6) for k in expert)
    default = copa_merging(MergeContext(single, spec, show_progress=False)).encoder.state_dict()
    assert not all(torch.allclose(default[k], expert[k], atol=1e-6) for k in expert), "pruning changes it"


def test_copa_runs_end_to_end_and_the_leaderboard_says_lora(micro_lora, results_dir):
    rec = run_one("copa_merging", micro_lora, results_dir=results_dir, device="cpu", show_progress=False)
    assert rec["status"] == "ok", rec.get("error")
    assert rec["params"]["added"] == 0 and rec["suite"]["name"] == "micro-lora"
    assert rec["suite"]["experts"].startswith("LoRA r=2")
    ta = run_one("task_arithmetic", micro_lora, results_dir=results_dir, device="cpu", show_progress=False)
    assert ta["status"] == "ok"
    md = leaderboard.render(results_dir, "micro-lora")
    assert "CoPA-Merging" in md and "Experts: LoRA r=2" in md


def test_copa_needs_lora_experts(micro, results_dir):
    rec = run_one("copa_merging", micro, results_dir=results_dir, device="cpu", show_progress=False)
    assert rec["status"] == "failed" and NO_LORA in rec["error"]
    with pytest.raises(NoLoraExpertsError, match="no LoRA experts"):
        MergeContext(micro, RunSpec.build("copa_merging", micro, device="cpu")).lora_factors(micro.tasks[0])
    assert unmet_requirements(get_method("copa_merging"), micro) == ["lora"]


# ------------------------------------------------------------------ PEFT adapters in the real suite
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from test_real_suite import TINY, tiny_clip

    folder = tmp_path_factory.mktemp("peft")
    clip = tiny_clip(0)
    torch.save(clip.state_dict(), folder / "backbone.pt")
    return folder, clip, TINY


def _write_adapter(folder, modules: dict, r=4, alpha=8.0, seed=0, extra=None, config=None):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (out_f, in_f) in modules.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, in_f, generator=g) * 0.1
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_f, r, generator=g) * 0.1
    tensors.update(extra or {})
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["q_proj"], **(config or {})}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return tensors


def _manifest(folder, tiny_cfg, experts: dict):
    raw = {"name": "tiny-lora", "model_config": tiny_cfg, "backbone": {"path": "backbone.pt"},
           "experts": {t: {"path": str(p)} for t, p in experts.items()}}
    (folder / "manifest.yaml").write_text(yaml.safe_dump(raw))
    return zoo.Manifest.load(folder / "manifest.yaml")


def test_peft_adapters_load_as_base_plus_scaled_BA(tiny):
    from mergebench.suites.checkpoints.hf import hf_to_open_clip, open_clip_to_hf

    folder, clip, cfg = tiny
    pre = {k: v.clone() for k, v in clip.visual.state_dict().items()}
    w, hidden = cfg["vision_cfg"]["width"], int(cfg["vision_cfg"]["width"] * cfg["vision_cfg"]["mlp_ratio"])
    hf_modules = {}
    for layer in range(2):
        p = f"vision_model.encoder.layers.{layer}"
        hf_modules.update({f"{p}.self_attn.q_proj": (w, w), f"{p}.self_attn.k_proj": (w, w),
                           f"{p}.self_attn.v_proj": (w, w), f"{p}.self_attn.out_proj": (w, w),
                           f"{p}.mlp.fc1": (hidden, w), f"{p}.mlp.fc2": (w, hidden)})
    hf_tensors = _write_adapter(folder / "hf_adapter", hf_modules, config={"use_rslora": True})
    oc_modules = {f"visual.transformer.resblocks.{i}.{m}": tuple(pre[f"transformer.resblocks.{i}.{t}"].shape)
                  for i in range(2) for m, t in OPEN_CLIP_TARGETS.items()}
    oc_tensors = _write_adapter(folder / "oc_adapter", oc_modules, seed=1)
    m = _manifest(folder, cfg, {"MNIST": folder / "hf_adapter", "SVHN": folder / "oc_adapter"})
    reference = {k: v for k, v in pre.items()}

    # open_clip names: exactly pretrained + (alpha / r) * B @ A on the named weights
    state, _, _ = zoo.load_expert(m, "SVHN", reference, pre)
    for i in range(2):
        for module, target in OPEN_CLIP_TARGETS.items():
            key = f"base_model.model.visual.transformer.resblocks.{i}.{module}"
            t = f"transformer.resblocks.{i}.{target}"
            expected = pre[t] + (oc_tensors[f"{key}.lora_B.weight"] @ oc_tensors[f"{key}.lora_A.weight"]) * (8.0 / 4)
            assert torch.equal(state[t], expected), t
    assert all(torch.equal(state[k], pre[k]) for k in pre if not _adapted(k))

    # HF names (rsLoRA scale alpha / sqrt(r)): the same as merging the deltas into HF weights and converting
    state, _, _ = zoo.load_expert(m, "MNIST", reference, pre)
    hf_state = open_clip_to_hf(pre)
    for module in hf_modules:
        key = f"base_model.model.{module}"
        hf_state[f"{module}.weight"] = hf_state[f"{module}.weight"] + \
            (hf_tensors[f"{key}.lora_B.weight"] @ hf_tensors[f"{key}.lora_A.weight"]) * (8.0 / 2.0)
    converted = hf_to_open_clip(hf_state)
    assert all(torch.allclose(state[k], converted[k], atol=1e-6) for k in pre)
    factors = zoo.load_lora_factors(m, "MNIST", reference)
    q = factors["transformer.resblocks.0.attn.in_proj.q"]
    assert q.target == "transformer.resblocks.0.attn.in_proj_weight" and q.rows == (0, w)
    assert factors["transformer.resblocks.0.attn.in_proj.v"].rows == (2 * w, 3 * w)


def test_bad_peft_adapters_are_clear_errors(tiny):
    folder, clip, cfg = tiny
    pre = dict(clip.visual.state_dict())
    w = cfg["vision_cfg"]["width"]
    cases = {
        "unknown": ({"vision_model.encoder.layers.0.self_attn.zz_proj": (w, w)}, {}, {}, "no LoRA target"),
        "text": ({"text_model.encoder.layers.0.self_attn.q_proj": (w, w)}, {}, {}, "text tower"),
        "shape": ({"vision_model.encoder.layers.0.mlp.fc1": (w, w)}, {}, {}, "its target"),
        "no_B": ({}, {"base_model.model.vision_model.encoder.layers.0.mlp.fc1.lora_A.weight": torch.zeros(4, w)}, {},
                 "no lora_B"),
        "bias": ({"vision_model.encoder.layers.0.mlp.fc1": (2 * w, w)},
                 {"base_model.model.vision_model.encoder.layers.0.mlp.fc1.lora_B.bias": torch.zeros(2 * w)}, {},
                 "not a LoRA factor"),
        "rank": ({"vision_model.encoder.layers.0.mlp.fc1": (2 * w, w)}, {}, {"r": 8}, "the config says r=8"),
        "type": ({"vision_model.encoder.layers.0.mlp.fc1": (2 * w, w)}, {}, {"peft_type": "IA3"}, "only LORA"),
    }
    for name, (modules, extra, config, message) in cases.items():
        _write_adapter(folder / name, modules, extra=extra, config=config)
        m = _manifest(folder, cfg, {"MNIST": folder / name})
        with pytest.raises(checkpoints.CheckpointError, match=message) as err:
            zoo.load_expert(m, "MNIST", pre, pre)
        assert "expert MNIST" in str(err.value), name
    (folder / "no_config").mkdir()
    m = _manifest(folder, cfg, {"MNIST": folder / "no_config"})
    with pytest.raises(checkpoints.CheckpointError):
        zoo.load_expert(m, "MNIST", pre, pre)


def test_real_suite_with_peft_experts_runs_copa(tiny, tmp_path, results_dir):
    from test_real_suite import write_datasets

    from mergebench.suites.real import cards as cardlib

    folder, clip, cfg = tiny
    cards = cardlib.load_cards()
    write_datasets(tmp_path / "data", cards, skip=[t for t in cardlib.REAL_TASKS if t not in ("MNIST", "SVHN")])
    pre = clip.visual.state_dict()
    modules = {f"visual.transformer.resblocks.{i}.{m}": tuple(pre[f"transformer.resblocks.{i}.{t}"].shape)
               for i in range(2) for m, t in OPEN_CLIP_TARGETS.items()}
    experts = {}
    for i, task in enumerate(("MNIST", "SVHN")):
        _write_adapter(folder / f"real_{task}", modules, seed=10 + i)
        experts[task] = folder / f"real_{task}"
    _manifest(folder, cfg, experts)
    suite = get_suite("real", manifest=folder / "manifest.yaml", data_root=tmp_path / "data", verbose=False)
    assert suite.has_lora and suite.info["experts"] == "LoRA (PEFT adapters)"
    rec = run_one("copa_merging", suite, results_dir=results_dir, device="cpu", show_progress=False)
    assert rec["status"] == "ok", rec.get("error")


def test_run_all_skips_methods_the_suite_cannot_run(micro, micro_lora, monkeypatch, capsys, tmp_path):
    import mergebench.engine.run
    from mergebench.cli import main

    ran = {}
    monkeypatch.setattr(mergebench.engine.run, "run_many", lambda specs, suite, **kw: ran.setdefault(suite.name, specs) and [])
    main(["run", "--all", "--suite", "micro", "--results", str(tmp_path)])
    main(["run", "--all", "--suite", "micro-lora", "--results", str(tmp_path)])
    assert "copa_merging" not in ran["micro"] and "task_arithmetic" in ran["micro"]
    assert "copa_merging" in ran["micro-lora"]
    assert "skipped copa_merging: needs lora experts" in capsys.readouterr().err


def test_a_results_folders_notes_stand_under_its_table(tmp_path):
    """NOTES.md beside the records (e.g. results/mini8-lora: why a method falls on LoRA experts) is shown under the
    main table of LEADERBOARD.md, in the files `write` makes too; a folder without one shows nothing more."""
    import shutil
    from pathlib import Path

    records = Path(__file__).parent / "data" / "leaderboard" / "records" / "micro"
    shutil.copytree(records, tmp_path / "micro")
    before = leaderboard.render(tmp_path, "micro")
    note = "**Note.** WUDI Merging falls below the pretrained model on these experts; see its method page."
    (tmp_path / "micro" / "NOTES.md").write_text(note + "\n")
    md = leaderboard.render(tmp_path, "micro")
    assert note not in before and md.count(note) == 1
    table_end = md.index("\n\n", md.index("| Method"))
    assert md.index(note) > table_end and md.index(note) < md.index("## Benchmark sanity")
    assert md.replace("\n\n" + note, "", 1) == before
    leaderboard.write(tmp_path, "micro", out_dir=tmp_path / "out", plots=False)
    assert note in (tmp_path / "out" / "LEADERBOARD.md").read_text()
