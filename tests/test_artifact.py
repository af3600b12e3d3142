"""The committed suite artifacts (bench/suites/artifacts): checked by sha256, rebuilt by the same code."""

import json
import shutil

import pytest

from mergebench.suites import artifact, mini8, mini8_lora
from mergebench.suites.registry import get_suite


@pytest.fixture
def artifacts_copy(tmp_path, monkeypatch):
    """A copy of the committed artifacts that a test may alter (the repository's stay untouched)."""
    root = tmp_path / "artifacts"
    shutil.copytree(artifact.ROOT, root)
    monkeypatch.setattr(artifact, "ROOT", root)
    return root


def test_committed_artifacts_exist_and_are_small():
    for name in ("mini8", "micro", "mini8-lora", "micro-lora"):
        assert artifact.exists(name), f"bench/suites/artifacts/{name} is not committed (make {name}-artifact)"
    size = sum(p.stat().st_size for p in artifact.ROOT.rglob("*") if p.is_file())
    assert size <= 64 * 2**20, f"the artifacts take {size / 2**20:.1f} MB (64 MB at most)"


def test_micro_loads_from_its_artifact_with_a_machine_independent_identity(micro):
    meta = artifact.read("micro")
    assert micro.info["cache_key"] == artifact.identity(meta)
    assert micro.info["checkpoints"]["pretrained.safetensors"] == meta["files"]["pretrained.safetensors"]
    assert micro.info["checkpoints"]["data"] == meta["data_sha256"]
    assert all(v.dtype.is_floating_point and v.dtype.itemsize == 4 for v in micro.pretrained.values())


def test_an_altered_file_is_an_error_naming_it(artifacts_copy, tmp_path):
    expert = artifacts_copy / "micro" / "experts" / "digits.safetensors"
    data = bytearray(expert.read_bytes())
    data[-1] ^= 0xFF
    expert.write_bytes(bytes(data))
    with pytest.raises(artifact.ArtifactError, match=r"experts/digits\.safetensors.*git checkout"):
        mini8.load_mini8("micro", cache_dir=tmp_path)
    expert.unlink()
    with pytest.raises(artifact.ArtifactError, match="digits.safetensors is missing"):
        mini8.load_mini8("micro", cache_dir=tmp_path)


def test_a_configuration_that_differs_from_the_artifact_is_an_error(artifacts_copy, tmp_path):
    manifest = artifacts_copy / "micro" / artifact.MANIFEST
    meta = json.loads(manifest.read_text())
    meta["config"]["finetune_lr"] = 0.5
    manifest.write_text(json.dumps(meta))
    with pytest.raises(artifact.ArtifactError, match="finetune_lr.*make micro-artifact"):
        mini8.load_mini8("micro", cache_dir=tmp_path)


def test_an_artifact_built_before_a_config_field_existed_loads_with_the_field_at_its_default(artifacts_copy, tmp_path):
    manifest = artifacts_copy / "micro" / artifact.MANIFEST
    meta = json.loads(manifest.read_text())
    for field in ("pretrain_per_task_overrides", "head_noise", "pretrain_transpose"):  # micro has their defaults
        meta["config"].pop(field, None)
    # this machine's data, so that the test checks the configuration alone on any CPU
    meta["data_sha256"] = mini8.tensors_sha256(mini8.generate_data(mini8.CONFIGS["micro"]))
    manifest.write_text(json.dumps(meta))
    suite = mini8.load_mini8("micro", cache_dir=tmp_path)
    assert suite.info["mini8_config"]["head_noise"] == 0.0


@pytest.mark.parametrize("edit, field", [
    (lambda c: c.pop("finetune_lr"), "finetune_lr"),  # absent: its default 1.5e-4, not micro's 1e-3
    (lambda c: c.update(head_noise=0.3), "head_noise"),
    (lambda c: c.update(no_such_field=1), "no_such_field"),
])
def test_a_stored_config_field_that_differs_is_absent_or_unknown_is_an_error(artifacts_copy, tmp_path, edit, field):
    manifest = artifacts_copy / "micro" / artifact.MANIFEST
    meta = json.loads(manifest.read_text())
    edit(meta["config"])
    manifest.write_text(json.dumps(meta))
    with pytest.raises(artifact.ArtifactError, match=f"fields {field}\\).*make micro-artifact"):
        mini8.load_mini8("micro", cache_dir=tmp_path)


def test_data_that_differ_from_the_artifact_are_an_error(artifacts_copy, tmp_path):
    manifest = artifacts_copy / "micro" / artifact.MANIFEST
    meta = json.loads(manifest.read_text())
    meta["data_sha256"] = "0" * 64
    manifest.write_text(json.dumps(meta))
    with pytest.raises(artifact.ArtifactError, match="generators produced data"):
        mini8.load_mini8("micro", cache_dir=tmp_path)


def test_rebuilding_micro_reproduces_the_committed_accuracies(artifacts_copy):
    committed = artifact.read("micro")
    mini8.build_artifact("micro", verbose=False)
    rebuilt = artifact.read("micro")
    assert rebuilt["config"] == committed["config"] and rebuilt["data_sha256"] == committed["data_sha256"]
    for kind in ("pretrained", "experts"):
        for task, acc in committed["accuracy"][kind].items():
            assert abs(rebuilt["accuracy"][kind][task] - acc) <= 0.5, (kind, task, acc, rebuilt["accuracy"][kind][task])


def test_micro_lora_loads_its_committed_adapters(artifacts_copy):
    suite = get_suite("micro-lora", verbose=False)
    assert suite.info["cache_key"].startswith(artifact.identity(artifact.read("micro")) + "+")
    assert suite.lora_factors("digits")
    adapter = artifacts_copy / "micro-lora" / "adapters" / "digits" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-1])
    with pytest.raises(artifact.ArtifactError, match="adapter_model.safetensors"):
        mini8_lora.load_mini8_lora("micro-lora")
