"""mini8's generators, its loading, and the build tool's content-addressed cache."""

import dataclasses

import pytest
import torch

from mergebench.build import mini8 as build_mini8
from mergebench.build import mini8_lora as build_lora
from mergebench.suites.mini8 import CONFIGS, LORA_CONFIGS, load_mini8
from mergebench.suites.mini8 import tasks as mini8_tasks


def test_generators_are_deterministic_and_well_formed():
    for spec in mini8_tasks.TASKS + [mini8_tasks.GENERIC]:
        x1, y1 = mini8_tasks.generate(spec, 64, seed=5)
        x2, y2 = mini8_tasks.generate(spec, 64, seed=5)
        x3, _ = mini8_tasks.generate(spec, 64, seed=6)
        assert x1.shape == (64, 3, 32, 32) and x1.dtype == torch.uint8, spec.name
        assert torch.equal(x1, x2) and torch.equal(y1, y2), spec.name
        assert not torch.equal(x1, x3), spec.name
        assert 0 <= y1.min() and y1.max() < spec.num_classes, spec.name
        assert x1.float().std() > 5, f"{spec.name} images are nearly constant"


def test_float64_generators_draw_the_same_bytes_under_generic_and_vector_kernels():
    """generator_dtype="float64" draws every task's images identically under torch's generic kernels
    (ATEN_CPU_CAPABILITY=default) and this CPU's vector kernels, as it must for a suite that is the same bytes on
    every machine (float32 does not: measured, docs/mini8.md)."""
    import os
    import subprocess
    import sys

    code = ("import dataclasses; from mergebench.suites import mini8; "
            "cfg = dataclasses.replace(mini8.CONFIGS['micro'], tasks=tuple(t.name for t in mini8.tasks.TASKS), "
            "generator_dtype='float64'); print(mini8.tensors_sha256(mini8.generate_data(cfg)))")
    digests = {cap: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                   env={**os.environ, "ATEN_CPU_CAPABILITY": cap}).stdout.strip()
               for cap in ("default", "")}
    assert len(set(digests.values())) == 1 and len(digests["default"]) == 64, digests
    x, _ = mini8_tasks.generate(mini8_tasks.TASKS[0], 4, seed=0, dtype=torch.float64)
    assert x.dtype == torch.uint8 and torch.get_default_dtype() == torch.float32  # the default is restored


def test_eight_tasks_with_distinct_analogues():
    assert len(mini8_tasks.TASKS) == 8
    assert {t.analogue for t in mini8_tasks.TASKS} == {
        "SUN397", "StanfordCars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD"}


def test_micro_suite_uses_open_clip_names_and_a_second_load_generates_nothing(micro, tmp_path, monkeypatch):
    assert "transformer.resblocks.0.attn.in_proj_weight" in micro.pretrained
    assert {"ln_post.weight", "proj", "conv1.weight"} <= set(micro.pretrained)
    assert set(micro.heads) == set(micro.tasks)
    from mergebench.suites.mini8 import load

    def no_generation(*args, **kwargs):
        raise AssertionError("a second load reads the data cached by the first")

    load_mini8("micro", cache_dir=tmp_path)
    monkeypatch.setattr(load, "generate_data", no_generation)
    again = load_mini8("micro", cache_dir=tmp_path)
    assert again.info["checkpoints"] == micro.info["checkpoints"]
    for task in micro.tasks:  # experts differ from the pretrained backbone
        diff = sum((micro.expert_weights(task)[k] - micro.pretrained[k]).abs().sum() for k in micro.pretrained)
        assert diff > 0


def test_a_custom_build_is_reproducible_and_cached(tmp_path, monkeypatch):
    cfg = dataclasses.replace(CONFIGS["micro"], tasks=("digits",), n_train=64, n_val=8, n_test=8,
                              pretrain_per_task=32, pretrain_generic=32)
    a = build_mini8.load_or_build(cfg, cache_dir=tmp_path / "a", verbose=False)
    b = build_mini8.load_or_build(cfg, cache_dir=tmp_path / "b", verbose=False)
    assert a.info["checkpoints"] == b.info["checkpoints"], "same seed, same bytes"
    assert a.info["cache_key"] == build_mini8.key(cfg) != build_mini8.key(dataclasses.replace(cfg, seed=1))

    def no_build(*args, **kwargs):
        raise AssertionError("a cached build loads without building")

    monkeypatch.setattr(build_mini8, "build_into", no_build)
    again = build_mini8.load_or_build(cfg, cache_dir=tmp_path / "a", verbose=False)
    assert again.info["checkpoints"] == a.info["checkpoints"]


def test_missing_custom_build_without_build_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="load_or_build"):  # a custom configuration has no artifact
        build_mini8.load_or_build(dataclasses.replace(CONFIGS["micro"], seed=1), cache_dir=tmp_path, build=False)


def test_heads_are_the_pretraining_classifiers_class_vectors(tmp_path):
    from safetensors.torch import load_file

    cfg = dataclasses.replace(CONFIGS["micro"], seed=1)  # built here (micro itself loads from its artifact)
    built = build_mini8.load_or_build(cfg, cache_dir=tmp_path, verbose=False)
    classifier = load_file(tmp_path / "pretrain" / f"{build_mini8.pretrain_key(cfg)}.classifier.safetensors")
    for task in built.tasks:  # like zero-shot text heads: the class vectors the tower was trained against
        assert torch.allclose(built.heads[task], torch.nn.functional.normalize(classifier[task], dim=-1))


def test_hue_rotation_per_image_and_per_task_options():
    x, _ = mini8_tasks.generate(mini8_tasks.TASKS[5], 6, seed=3)
    angles = torch.tensor([0.0, 90.0, 120.0, 180.0, 240.0, 300.0])
    per_image = build_mini8.hue_rotate(x, angles)
    for i, a in enumerate(angles.tolist()):  # one angle per image = that angle for the image alone
        alone = build_mini8.hue_rotate(x[i:i + 1], a)[0]
        assert (per_image[i].int() - alone.int()).abs().max() <= 1, a
    assert torch.equal(per_image[0], x[0]) and not torch.equal(per_image[3], x[3])
    gray = x.float().mean(1)  # rotation about the gray axis keeps each pixel's channel mean (up to clamping)
    assert (build_mini8.hue_rotate(x, 180.0).float().mean(1) - gray).abs().mean() < 2

    base = dataclasses.replace(CONFIGS["mini8"], pretrain_hue_per="task", pretrain_hue_overrides={})
    keys = {build_mini8.pretrain_key(base),
            build_mini8.pretrain_key(dataclasses.replace(base, pretrain_hue_per="image")),
            build_mini8.pretrain_key(dataclasses.replace(base, pretrain_hue_overrides={"signs": 0.0})),
            build_mini8.pretrain_key(dataclasses.replace(base, pretrain_label_smoothing=0.1))}
    assert len(keys) == 4, "each pretraining option is part of the backbone's content address"
    assert build_mini8.pretrain_key(dataclasses.replace(base, finetune_lr=1e-5)) == build_mini8.pretrain_key(base)
    with pytest.raises(ValueError, match="pretrain_hue_per"):
        dataclasses.replace(base, pretrain_hue_per="pixel")
    with pytest.raises(ValueError, match="street_signs"):
        dataclasses.replace(base, pretrain_hue_overrides={"street_signs": 0.0})
    with pytest.raises(ValueError, match="pretrain_per_task_overrides names \\['svhn'\\]"):
        dataclasses.replace(base, pretrain_per_task_overrides={"svhn": 900})


def test_experts_fine_tuned_in_parallel_have_the_bytes_of_those_fine_tuned_in_turn(tmp_path):
    """``mergebench build --jobs N`` fine-tunes the experts and the LoRA adapters in N spawned processes; each
    run is seeded on its own, so the files are the same as when they train one after another."""
    import json

    from mergebench.suites import artifact

    cfg = CONFIGS["micro"]
    meta = {}
    for jobs in (1, 2):
        root = tmp_path / f"jobs{jobs}" / "mini8" / build_mini8.key(cfg)
        build_mini8.build_into(cfg, root, False, jobs)
        meta[jobs] = json.loads((root / "meta.json").read_text())
        assert meta[jobs]["build"]["jobs"] == jobs
    assert meta[1]["sha256"] == meta[2]["sha256"]

    lora_cfg, base = LORA_CONFIGS["micro-lora"], load_mini8("micro")
    adapters = {}
    for jobs in (1, 2):
        build_lora.build_into(lora_cfg, base, tmp_path / f"lora{jobs}", False, jobs=jobs)
        adapters[jobs] = json.loads((tmp_path / f"lora{jobs}" / "meta.json").read_text())["sha256"]
    assert list(adapters[2]) == [f"adapters/{t}/adapter_model.safetensors" for t in base.tasks]
    assert adapters[1] == adapters[2]
    if base.info["data_matches_artifact"]:  # on a CPU that draws the committed data, the committed adapters' bytes
        committed = artifact.read("micro-lora")["files"]
        assert adapters[2] == {k: v for k, v in committed.items() if k in adapters[2]}


def test_build_jobs_come_from_the_argument_or_the_environment(monkeypatch):
    from mergebench.build.mini8 import build_jobs

    monkeypatch.delenv("MERGEBENCH_BUILD_JOBS", raising=False)
    assert build_jobs(None, 8) == 1 and build_jobs(16, 8) == 8
    monkeypatch.setenv("MERGEBENCH_BUILD_JOBS", "4")
    assert build_jobs(None, 8) == 4 and build_jobs(2, 8) == 2
    monkeypatch.setenv("MERGEBENCH_BUILD_JOBS", "two")
    with pytest.raises(ValueError, match="MERGEBENCH_BUILD_JOBS='two'"):
        build_jobs(None, 8)
    with pytest.raises(ValueError, match="at least 1"):
        build_jobs(0, 8)


def test_the_loaded_suite_holds_and_imports_no_training_code():
    """bench/suites/mini8 is the frozen configuration, the generators and the loading: no optimiser, no gradient
    step, no import of the build tool, in its source or among the modules loading micro and micro-lora imports."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    import mergebench.suites.mini8 as package

    folder = Path(package.__file__).parent
    for file in sorted(folder.glob("*.py")):
        tree = ast.parse(file.read_text())
        imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [m for m in imported if m.startswith(("mergebench.build", "torch.optim"))], (file.name, imported)
        attributes = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        assert not attributes & {"optim", "backward", "Parameter", "lr_scheduler"}, (file.name, attributes)
    code = ("import sys; from mergebench.suites import get_suite; get_suite('micro-lora', verbose=False); "
            "print(sorted(m for m in sys.modules if m.startswith(('mergebench.build', 'torch.optim'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "mergebench.build" not in loaded, loaded
