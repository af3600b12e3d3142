"""mini8's generators and its content-addressed cache."""

import dataclasses

import torch

from mergebench.suites import mini8_tasks
from mergebench.suites.mini8 import CONFIGS, load_mini8


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
            "cfg = dataclasses.replace(mini8.CONFIGS['micro'], tasks=tuple(t.name for t in mini8.mini8_tasks.TASKS), "
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


def test_micro_suite_is_cached_and_uses_open_clip_names(micro, tmp_path):
    assert "transformer.resblocks.0.attn.in_proj_weight" in micro.pretrained
    assert {"ln_post.weight", "proj", "conv1.weight"} <= set(micro.pretrained)
    assert set(micro.heads) == set(micro.tasks)
    import mergebench.suites.mini8 as mini8_module

    def no_build(*args, **kwargs):
        raise AssertionError("a cached suite loads without building")

    original, mini8_module._build = mini8_module._build, no_build
    try:
        again = load_mini8("micro", verbose=False)
    finally:
        mini8_module._build = original
    assert again.info["checkpoints"] == micro.info["checkpoints"]
    for task in micro.tasks:  # experts differ from the pretrained backbone
        diff = sum((micro.expert_weights(task)[k] - micro.pretrained[k]).abs().sum() for k in micro.pretrained)
        assert diff > 0


def test_build_is_reproducible(tmp_path):
    cfg = dataclasses.replace(CONFIGS["micro"], tasks=("digits",), n_train=64, n_val=8, n_test=8,
                              pretrain_per_task=32, pretrain_generic=32)
    a = load_mini8(cfg, cache_dir=tmp_path / "a", verbose=False)
    b = load_mini8(cfg, cache_dir=tmp_path / "b", verbose=False)
    assert a.info["checkpoints"] == b.info["checkpoints"], "same seed, same bytes"


def test_missing_cache_without_build_is_a_clear_error(tmp_path):
    import pytest
    with pytest.raises(FileNotFoundError, match="mergebench build"):  # a custom configuration has no artifact
        load_mini8(dataclasses.replace(CONFIGS["micro"], seed=1), cache_dir=tmp_path, build=False)


def test_heads_are_the_pretraining_classifiers_class_vectors(micro, tmp_path):
    from safetensors.torch import load_file

    cfg = dataclasses.replace(CONFIGS["micro"], seed=1)  # built here (micro itself loads from its artifact)
    built = load_mini8(cfg, cache_dir=tmp_path, verbose=False)
    classifier = load_file(tmp_path / "pretrain" / f"{cfg.pretrain_key()}.classifier.safetensors")
    for task in built.tasks:  # like zero-shot text heads: the class vectors the tower was trained against
        assert torch.allclose(built.heads[task], torch.nn.functional.normalize(classifier[task], dim=-1))
    protos = load_mini8(dataclasses.replace(cfg, heads="prototypes"), cache_dir=tmp_path, verbose=False)
    assert torch.allclose(protos.heads["digits"].norm(dim=-1), torch.ones(10))
    assert not torch.allclose(protos.heads["digits"], built.heads["digits"])
    try:
        load_mini8(dataclasses.replace(cfg, heads="text"), cache_dir=tmp_path, verbose=False)
    except ValueError as e:
        assert "classifier" in str(e) and "prototypes" in str(e)
    else:
        raise AssertionError("an unknown heads kind must be an error")


def test_hue_rotation_per_image_and_per_task_options():
    import pytest

    from mergebench.suites import mini8

    x, _ = mini8_tasks.generate(mini8_tasks.TASKS[5], 6, seed=3)
    angles = torch.tensor([0.0, 90.0, 120.0, 180.0, 240.0, 300.0])
    per_image = mini8.hue_rotate(x, angles)
    for i, a in enumerate(angles.tolist()):  # one angle per image = that angle for the image alone
        alone = mini8.hue_rotate(x[i:i + 1], a)[0]
        assert (per_image[i].int() - alone.int()).abs().max() <= 1, a
    assert torch.equal(per_image[0], x[0]) and not torch.equal(per_image[3], x[3])
    gray = x.float().mean(1)  # rotation about the gray axis keeps each pixel's channel mean (up to clamping)
    assert (mini8.hue_rotate(x, 180.0).float().mean(1) - gray).abs().mean() < 2

    base = dataclasses.replace(CONFIGS["mini8"], pretrain_hue_per="task", pretrain_hue_overrides={},
                               pretrain_invert={})
    keys = {base.pretrain_key(), dataclasses.replace(base, pretrain_hue_per="image").pretrain_key(),
            dataclasses.replace(base, pretrain_hue_overrides={"signs": 0.0}).pretrain_key(),
            dataclasses.replace(base, pretrain_invert={"digits": 1.0}).pretrain_key()}
    assert len(keys) == 4, "each pretraining option is part of the backbone's content address"
    specs = [s for s in mini8_tasks.TASKS if s.name in base.tasks]
    with pytest.raises(ValueError, match="pretrain_hue_per"):
        mini8._pretrain(dataclasses.replace(base, pretrain_hue_per="pixel"), None, specs, None)
    with pytest.raises(ValueError, match="street_signs"):
        mini8._pretrain(dataclasses.replace(base, pretrain_hue_overrides={"street_signs": 0.0}), None, specs, None)
    with pytest.raises(ValueError, match="pretrain_invert names \\['mnist'\\]"):
        mini8._pretrain(dataclasses.replace(base, pretrain_invert={"mnist": 1.0}), None, specs, None)
    with pytest.raises(ValueError, match="pretrain_per_task_overrides names \\['svhn'\\]"):
        mini8._pretrain(dataclasses.replace(base, pretrain_per_task_overrides={"svhn": 900}), None, specs, None)


def test_pretrain_zoom_is_identity_at_one_enlarges_above_and_is_validated():
    import pytest

    from mergebench.suites import mini8

    x, _ = mini8_tasks.generate(mini8_tasks.TASKS[6], 4, seed=2, dtype=torch.float64)
    assert torch.equal(mini8.zoom(x, torch.ones(4, dtype=torch.float64), torch.float64), x)
    zoomed = mini8.zoom(x, torch.full((4,), 1.5, dtype=torch.float64), torch.float64)
    assert not torch.equal(zoomed, x)
    # zooming in spreads a bright digit over more pixels: its bright area grows by about 1.5^2
    bright = lambda im: (im.float().mean(1) > 128).sum().item()
    assert bright(zoomed) > 1.5 * bright(x)

    base = CONFIGS["mini8"]
    zoom = {"digits": [1.2, 1.4]}
    assert dataclasses.replace(base, pretrain_zoom=zoom).pretrain_key() != base.pretrain_key()
    specs = [s for s in mini8_tasks.TASKS if s.name in base.tasks]
    with pytest.raises(ValueError, match="pretrain_zoom names \\['mnist'\\]"):
        mini8._pretrain(dataclasses.replace(base, pretrain_zoom={"mnist": [1.2, 1.4]}), None, specs, None)
    with pytest.raises(ValueError, match="0 < lo <= hi"):
        mini8._pretrain(dataclasses.replace(base, pretrain_zoom={"digits": [1.4, 1.2]}), None, specs, None)


def test_experts_fine_tuned_in_parallel_have_the_bytes_of_those_fine_tuned_in_turn(tmp_path):
    """``mergebench build --jobs N`` fine-tunes the experts and the LoRA adapters in N spawned processes; each
    run is seeded on its own, so the files are the same as when they train one after another."""
    import json

    from mergebench.suites import mini8, mini8_lora

    cfg = CONFIGS["micro"]
    meta = {}
    for jobs in (1, 2):
        root = tmp_path / f"jobs{jobs}" / "mini8" / cfg.key()
        mini8._build(cfg, root, False, jobs)
        meta[jobs] = json.loads((root / "meta.json").read_text())
        assert meta[jobs]["build"]["jobs"] == jobs
    assert meta[1]["sha256"] == meta[2]["sha256"]

    lora_cfg, base = mini8_lora.CONFIGS["micro-lora"], load_mini8("micro", verbose=False)
    adapters = {}
    for jobs in (1, 2):
        mini8_lora._build(lora_cfg, base, tmp_path / f"lora{jobs}", False, jobs=jobs)
        adapters[jobs] = json.loads((tmp_path / f"lora{jobs}" / "meta.json").read_text())["sha256"]
    assert list(adapters[2]) == [f"adapters/{t}/adapter_model.safetensors" for t in base.tasks]
    assert adapters[1] == adapters[2]
    if base.info["data_matches_artifact"]:  # on a CPU that draws the committed data, the committed adapters' bytes
        committed = mini8_lora.artifact.read("micro-lora")["files"]
        assert adapters[2] == {k: v for k, v in committed.items() if k in adapters[2]}


def test_build_jobs_come_from_the_argument_or_the_environment(monkeypatch):
    import pytest

    from mergebench.suites.mini8 import build_jobs

    monkeypatch.delenv("MERGEBENCH_BUILD_JOBS", raising=False)
    assert build_jobs(None, 8) == 1 and build_jobs(16, 8) == 8
    monkeypatch.setenv("MERGEBENCH_BUILD_JOBS", "4")
    assert build_jobs(None, 8) == 4 and build_jobs(2, 8) == 2
    monkeypatch.setenv("MERGEBENCH_BUILD_JOBS", "two")
    with pytest.raises(ValueError, match="MERGEBENCH_BUILD_JOBS='two'"):
        build_jobs(None, 8)
    with pytest.raises(ValueError, match="at least 1"):
        build_jobs(0, 8)
