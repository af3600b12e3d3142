"""Manifests from the files a user has: ``mergebench zoo init`` (a folder of checkpoints, a Hugging Face cache),
``zoo hash``, the activation never guessed, experts checked before heads, Hugging Face datasets (parquet) read from
an HF cache through ``data check`` and an evaluation, and the committed example manifest and its documentation."""

from __future__ import annotations

import hashlib
import io
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from safetensors.torch import save_file

from mergebench.suites import checkpoints
from mergebench.suites.real import cards as cardlib
from mergebench.suites.real import imagecache, zoo, zoo_init

sys.path.insert(0, str(Path(__file__).parent))
from test_real_suite import TINY, hf_config, tiny_clip, world  # noqa: E402,F401  (world: the fixture)

open_clip = pytest.importorskip("open_clip")
REPO = Path(__file__).resolve().parents[1]


def _manifest_entries(path: Path) -> dict:
    """{name: (resolved path, sha256, format)} of a manifest's backbone and experts."""
    m = zoo.Manifest.load(path)
    out = {"backbone": (m.backbone.path.resolve(), m.backbone.sha256, m.backbone.format)}
    out.update({t: (e.path.resolve(), e.sha256, e.format) for t, e in m.experts.items()})
    return out


# ------------------------------------------------------------------ zoo hash
def test_zoo_hash_is_the_documented_sha256(world, capsys):
    from mergebench.cli import main

    folder = world.manifest.parent / "hf_RESISC45"
    file = world.manifest.parent / "MNIST.safetensors"
    assert main(["zoo", "hash", str(file), str(folder)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[0] == hashlib.sha256(file.read_bytes()).hexdigest()
    # a folder: sha256 over its files (sorted by path) of "relative/path NUL hex-sha256-of-the-file"
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f.relative_to(folder).as_posix().encode() + b"\0" + hashlib.sha256(f.read_bytes()).hexdigest().encode())
    assert out[1].split()[0] == h.hexdigest() == checkpoints.sha256_of(folder)
    assert "folder" in out[1]
    doc = (REPO / "docs" / "manifest.md").read_text()
    assert "NUL" in doc and "zoo hash" in doc


# ------------------------------------------------------------------ zoo init DIR
def test_zoo_init_writes_the_manifest_of_a_folder(world, tmp_path, capsys):
    from mergebench.cli import main
    from mergebench.suites import get_suite

    folder = world.manifest.parent
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    out = tmp_path / "m.yaml"
    assert main(["zoo", "init", str(folder), "--model-config", str(cfg), "--out", str(out)]) == 0, capsys.readouterr()
    got, want = _manifest_entries(out), _manifest_entries(world.manifest)
    assert {k: v[:2] for k, v in got.items()} == {k: v[:2] for k, v in want.items()}  # same files, same hashes
    formats = {k: v[2] for k, v in got.items()}
    assert formats["EuroSAT"] == "task_vectors_pickle"  # a pickled ImageEncoder, seen without unpickling it
    assert formats["RESISC45"] == formats["GTSRB"] == "hf" and formats["SUN397"] == "safetensors"
    assert formats["backbone"] == formats["DTD"] == formats["SVHN"] == "torch"
    assert "quick_gelu: from model_config" in out.read_text()
    suite = get_suite("real", manifest=out, data_root=world.data, trust_pickle=True, verbose=False)
    for task in ("EuroSAT", "GTSRB", "SVHN"):
        for k, v in world.experts[task].items():
            assert torch.allclose(suite.expert_weights(task)[k], v.float(), atol=1e-6), (task, k)

    # an architecture open_clip has no name for: say it
    assert main(["zoo", "init", str(folder), "--out", str(tmp_path / "n.yaml")]) == 2
    assert "--model-config" in capsys.readouterr().err


def test_zoo_init_finds_the_backbone_and_refuses_to_guess_among_several(world, tmp_path, capsys):
    from mergebench.cli import main

    folder = tmp_path / "ckpts"
    (folder / "task_vectors" / "DTD").mkdir(parents=True)
    clip = tiny_clip(0)
    torch.save(clip.state_dict(), folder / "ViT-tiny-openai.pt")
    torch.save(clip.visual.state_dict(), folder / "task_vectors" / "DTD" / "zeroshot.pt")  # not an expert
    save_file({k: v.contiguous() for k, v in world.experts["DTD"].items()}, folder / "task_vectors" / "DTD" / "finetuned.safetensors")
    save_file({k: v.contiguous() for k, v in world.experts["MNIST"].items()}, folder / "clip-vit-tiny_mnist.safetensors")
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    out = tmp_path / "m.yaml"
    assert main(["zoo", "init", str(folder), "--model-config", str(cfg), "-o", str(out)]) == 0, capsys.readouterr()
    got = _manifest_entries(out)
    assert got["backbone"][0] == (folder / "ViT-tiny-openai.pt").resolve()
    assert set(got) == {"backbone", "DTD", "MNIST"}
    assert got["DTD"][0].name == "finetuned.safetensors"
    assert "no expert found for SUN397" in capsys.readouterr().out
    # two full CLIPs that name no task: which is the backbone is the user's call
    torch.save(tiny_clip(1).state_dict(), folder / "other.pt")
    assert main(["zoo", "init", str(folder), "--model-config", str(cfg), "-o", str(out)]) == 0  # "openai" decides
    (folder / "ViT-tiny-openai.pt").rename(folder / "mine.pt")
    assert main(["zoo", "init", str(folder), "--model-config", str(cfg), "-o", str(out)]) == 2
    assert "--backbone" in capsys.readouterr().err
    assert main(["zoo", "init", str(folder), "--model-config", str(cfg), "-o", str(out), "--backbone",
                 str(folder / "mine.pt")]) == 0


def test_architecture_is_matched_by_tensor_shapes_and_hf_configs():
    transformers = pytest.importorskip("transformers")
    for name in ("ViT-B-32", "ViT-B-16", "ViT-L-14"):
        with torch.device("meta"):  # shapes only, no memory
            model = open_clip.CLIP(**open_clip.get_model_config(name))
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert zoo_init.matching_models(zoo_init.signature_of_state(shapes))[0] == name
    # transformers' CLIPConfig defaults are openai/clip-vit-base-patch32's
    cfg, act = zoo_init.config_from_hf(transformers.CLIPConfig().to_dict())
    assert zoo_init.matching_models(zoo_init._signature(cfg), zoo_init._heads(cfg))[0] == "ViT-B-32" and act is True


# ------------------------------------------------------------------ the activation is never guessed
def _b32_manifest(tmp_path: Path, backbone: Path, **fields) -> zoo.Manifest:
    raw = {"model": "ViT-B-32", "backbone": {"path": str(backbone)}, "experts": {"MNIST": str(backbone)}, **fields}
    (tmp_path / "q.yaml").write_text(yaml.safe_dump(raw))
    return zoo.Manifest.load(tmp_path / "q.yaml")


def test_quick_gelu_comes_from_the_name_the_manifest_or_the_file(world, tmp_path):
    plain = tmp_path / "b.safetensors"
    save_file({"x": torch.zeros(1)}, plain)
    with pytest.raises(ValueError, match=r"cannot tell whether the backbone .*b\.safetensors.*QuickGELU.*"
                                         r"`quick_gelu: true`.*ViT-B-32-quickgelu"):
        _b32_manifest(tmp_path, plain).clip_config()
    assert _b32_manifest(tmp_path, plain, quick_gelu=False).clip_config()["quick_gelu"] is False
    assert _b32_manifest(tmp_path, plain, model="ViT-B-32-quickgelu").clip_config()["quick_gelu"] is True
    with pytest.raises(ValueError, match="ambiguous.*ViT-B-32-quickgelu says QuickGELU.*quick_gelu says GELU"):
        _b32_manifest(tmp_path, plain, model="ViT-B-32-quickgelu", quick_gelu=False).clip_config()
    with pytest.raises(ValueError, match="quick_gelu is 'yes'"):
        _b32_manifest(tmp_path, plain, quick_gelu="yes")
    # the file says it: an HF config's hidden_act, a TorchScript model's modules, a pickled model's classes
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"vision_config": {"hidden_act": "gelu"}, "text_config": {}}))
    assert _b32_manifest(tmp_path, hf).clip_config()["quick_gelu"] is False
    scripted = tmp_path / "jit.pt"
    torch.jit.save(torch.jit.script(tiny_clip(0)), str(scripted))
    assert checkpoints.checkpoint_activation(scripted) is True
    gelu = open_clip.CLIP(**{**TINY, "quick_gelu": False})
    torch.save(gelu, tmp_path / "pickled.pt")
    assert checkpoints.checkpoint_activation(tmp_path / "pickled.pt") is False
    assert checkpoints.checkpoint_activation(world.manifest.parent / "EuroSAT" / "finetuned.pt") is True
    assert checkpoints.checkpoint_activation(world.manifest.parent / "backbone.pt") is None  # a state dict


def test_zoo_init_writes_an_incomplete_manifest_when_the_activation_is_unknown(world, tmp_path, capsys):
    from mergebench.cli import main

    folder = tmp_path / "z"
    folder.mkdir()
    clip = tiny_clip(0)
    torch.save(clip.state_dict(), folder / "pretrained.pt")
    save_file({k: v.contiguous() for k, v in world.experts["MNIST"].items()}, folder / "mnist.safetensors")
    cfg = {k: v for k, v in TINY.items() if k != "quick_gelu"}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    out = tmp_path / "m.yaml"
    assert main(["zoo", "init", str(folder), "--model-config", str(tmp_path / "c.json"), "-o", str(out)]) == 1
    assert "INCOMPLETE" in capsys.readouterr().out and "quick_gelu: FILL IN" in out.read_text()
    with pytest.raises(ValueError, match="Add `quick_gelu: true` or `quick_gelu: false`"):
        zoo.Manifest.load(out).clip_config()
    assert main(["zoo", "init", str(folder), "--model-config", str(tmp_path / "c.json"), "-o", str(out),
                 "--quick-gelu"]) == 0
    assert zoo.Manifest.load(out).clip_config()["quick_gelu"] is True


# ------------------------------------------------------------------ a bad expert fails before the heads
def test_experts_are_verified_before_the_heads_are_computed(world, tmp_path, monkeypatch):
    from mergebench.suites import real

    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "cache"))  # no cached heads
    raw = yaml.safe_load(world.manifest.read_text())
    base = world.manifest.parent
    raw["backbone"]["path"] = str(base / raw["backbone"]["path"])
    for e in raw["experts"].values():
        e["path"] = str(base / e["path"])
    raw["experts"]["DTD"]["sha256"] = "0" * 64
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(raw))

    def heads(*a, **k):
        raise AssertionError("computed the heads before checking the experts")
    monkeypatch.setattr(real, "zero_shot_heads", heads)
    with pytest.raises(checkpoints.CheckpointError, match="expert DTD: sha256 mismatch"):
        real.load_real(tmp_path / "m.yaml", world.data, trust_pickle=True, verbose=False)


# ------------------------------------------------------------------ a Hugging Face cache (what fusion_bench users have)
def _hf_repo(hub: Path, kind: str, repo_id: str, source: Path, commit: str) -> Path:
    """A cached repository as huggingface_hub writes it: blobs/<sha256>, snapshots/<commit>/<file> -> blob, refs/main."""
    repo = hub / f"{kind}s--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    for f in sorted(p for p in source.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / f.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * (len(f.relative_to(source).parts) + 1)) / "blobs" / blob.name)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snap


def _parquet(path: Path, rng, labels, names=None, row_group_size=4, size=(14, 12)):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cells = []
    for _ in labels:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
        cells.append({"bytes": buf.getvalue(), "path": None})
    table = pa.table({"image": pa.array(cells, type=pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                      "label": pa.array(list(labels), type=pa.int64())})
    if names is not None:  # what the datasets library stores in the schema
        features = {"image": {"_type": "Image"}, "label": {"names": list(names), "_type": "ClassLabel"}}
        table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)


TASK_REPOS = {"SUN397": "sun397", "Cars": "stanford-cars", "RESISC45": "resisc45", "EuroSAT": "eurosat", "SVHN": "svhn",
              "GTSRB": "gtsrb", "MNIST": "mnist", "DTD": "dtd"}


def write_hf_cache(hub: Path, all_cards: dict, tmp: Path):
    """A tiny openai/clip-vit-base-patch32 (CLIPModel), eight tanganke experts (CLIPVisionModel), four datasets."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    t = TINY["text_cfg"]
    text = dict(vocab_size=t["vocab_size"], hidden_size=t["width"], intermediate_size=4 * t["width"],
                num_hidden_layers=t["layers"], num_attention_heads=t["heads"], max_position_embeddings=t["context_length"],
                hidden_act="quick_gelu", eos_token_id=49407, bos_token_id=49406, pad_token_id=0, layer_norm_eps=1e-5)
    clip = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=hf_config(),
                                                          projection_dim=TINY["embed_dim"])).eval()
    with torch.no_grad():
        for p in clip.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    clip.save_pretrained(tmp / "backbone")
    _hf_repo(hub, "model", "openai/clip-vit-base-patch32", tmp / "backbone", "c0ffee")
    experts = {}
    for i, (task, suffix) in enumerate(TASK_REPOS.items()):
        expert = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**hf_config())).eval()
        state = {k: v for k, v in clip.vision_model.state_dict().items()}
        g = torch.Generator().manual_seed(10 + i)
        tower = getattr(expert, "vision_model", expert)  # transformers >= 5: the CLIPVisionModel is the tower itself
        missing, unexpected = tower.load_state_dict({k: v + 0.05 * torch.randn(v.shape, generator=g)
                                                     if v.is_floating_point() else v for k, v in state.items()},
                                                    strict=False)
        assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
        expert.save_pretrained(tmp / f"expert_{task}")
        _hf_repo(hub, "model", f"tanganke/clip-vit-base-patch32_{suffix}", tmp / f"expert_{task}", f"e{i:05d}")
        experts[task] = expert
    # decoys: a B/16 expert without a B/16 backbone, and a second MNIST expert from another organisation
    _hf_repo(hub, "model", "tanganke/clip-vit-base-patch16_mnist", tmp / "expert_MNIST", "d1")
    _hf_repo(hub, "model", "someone/clip-vit-base-patch32_mnist", tmp / "expert_SVHN", "d2")

    rng = np.random.default_rng(0)
    data = tmp / "datasets"
    # EuroSAT: the card's folder names as class names, no val split (the card has its own val folder)
    eurosat = list(all_cards["EuroSAT"].layout["folder_to_classname"])
    _parquet(data / "eurosat/data/train-00000-of-00001.parquet", rng, np.arange(20) % 10, eurosat)
    _parquet(data / "eurosat/data/test-00000-of-00001.parquet", rng, np.arange(10) % 10, eurosat)
    # MNIST (ylecun/mnist): a config folder, class names only in the README's dataset_info
    _parquet(data / "mnist/mnist/train-00000-of-00001.parquet", rng, np.arange(30) % 10)
    _parquet(data / "mnist/mnist/test-00000-of-00001.parquet", rng, (np.arange(12) * 3) % 10)
    names = "\n".join(f"          '{i}': '{i}'" for i in range(10))
    (data / "mnist/README.md").write_text(f"---\ndataset_info:\n  features:\n  - name: image\n    dtype: image\n  - name: "
                                          f"label\n    dtype:\n      class_label:\n        names:\n{names}\n---\n# MNIST\n")
    # DTD: the card's classes in reverse order (labels index that order)
    dtd = list(reversed(all_cards["DTD"].classnames))
    _parquet(data / "dtd/data/train-00000-of-00002.parquet", rng, np.arange(47) % 47, dtd)
    _parquet(data / "dtd/data/train-00001-of-00002.parquet", rng, (np.arange(20) * 5) % 47, dtd)
    _parquet(data / "dtd/data/test-00000-of-00001.parquet", rng, (np.arange(15) * 7) % 47, dtd)
    # GTSRB: other class-name texts, test split only
    _parquet(data / "gtsrb/data/test-00000-of-00001.parquet", rng, np.arange(9) % 43, [f"sign {i}" for i in range(43)])
    for repo, folder in (("tanganke/eurosat", "eurosat"), ("ylecun/mnist", "mnist"), ("tanganke/dtd", "dtd"),
                         ("tanganke/gtsrb", "gtsrb")):
        _hf_repo(hub, "dataset", repo, data / folder, "da7a")
    return clip, experts


@pytest.fixture(scope="module")
def hf_world(tmp_path_factory):
    base = tmp_path_factory.mktemp("hf")
    hub = base / "huggingface" / "hub"
    all_cards = cardlib.load_cards()
    clip, experts = write_hf_cache(hub, all_cards, base / "src")
    return base, hub, clip, experts, all_cards


def _expected_accuracy(clip, expert, card, source):
    """Accuracy of ``expert`` (an HF CLIPVisionModel) with the backbone's projection and zero-shot heads, computed
    with transformers and open_clip's transforms alone; labels mapped to the card's classes by name."""
    transform = open_clip.image_transform(32, is_train=False)
    x = torch.stack([transform(source.image(i)) for i in range(len(source))])
    prompts = [p for c in card.classnames for p in card.prompts(c)]
    with torch.no_grad():
        tokens = open_clip.tokenize(prompts, context_length=32)
        e = clip.get_text_features(input_ids=tokens)
        e = F.normalize(e if torch.is_tensor(e) else e.pooler_output, dim=-1)
        text = F.normalize(e.view(card.num_classes, len(card.templates), -1).mean(1), dim=-1)
        image = clip.visual_projection(expert(pixel_values=x).pooler_output)
        pred = (F.normalize(image, dim=-1) @ text.t()).argmax(-1).numpy()
    return 100.0 * (pred == source.labels).mean(), len(source)


def test_hf_cache_zoo_init_data_check_and_evaluation(hf_world, tmp_path, monkeypatch, capsys):
    from mergebench.cli import main

    base, hub, clip, experts, all_cards = hf_world
    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "b32.yaml"
    # the HF home: models--* are found in its hub/ folder
    assert main(["zoo", "init", "--hf-cache", str(base / "huggingface"), "--out", str(out)]) == 0, capsys.readouterr()
    printed = capsys.readouterr().out
    text = out.read_text()
    m = zoo.Manifest.load(out)
    assert m.backbone.path.name == "c0ffee" and m.backbone.format == "hf"
    assert set(m.experts) == set(cardlib.REAL_TASKS) and all(e.format == "hf" for e in m.experts.values())
    assert m.experts["MNIST"].path.parent.parent.name == "models--tanganke--clip-vit-base-patch32_mnist"
    assert m.experts["Cars"].sha256 == checkpoints.sha256_of(hub / "models--tanganke--clip-vit-base-patch32_stanford-cars"
                                                     / "snapshots" / "e00001")
    assert m.model is None and m.model_config["vision_cfg"]["width"] == 32  # a tiny model open_clip has no name for
    assert m.clip_config()["quick_gelu"] is True and "quick_gelu: from" in text and "hidden_act" not in printed

    # data check: the HF datasets, where they differ from the cards, and the cache they need
    assert main(["data", "check", "--root", str(hub), "--tasks", "EuroSAT,MNIST,DTD,GTSRB", "--image-size", "32"]) == 1
    report = capsys.readouterr().out
    assert "source: Hugging Face dataset tanganke/eurosat" in report and "source: Hugging Face dataset ylecun/mnist" in report
    assert "val: carved from train (this Hugging Face copy has no val split)" in report  # EuroSAT
    assert "cache at 32 px: train 18 images 55.7 kB (on first use); val 2 images 6.4 kB (on first use)" in report
    assert "lists the card's classes in another order; labels are remapped by name" in report  # DTD
    assert re.search(r"class names differ from the card at 43 of 43 indices \(0: 'sign 0' vs card '[^']+'", report)
    assert "sizes: test 15, train 67" in report  # DTD: two train files
    assert "test: 15 images, the protocol has 1880" in report
    assert f"test 15 images {imagecache.split_bytes(15, 32) / 1e3:.1f} kB (to write)" in report
    dtd = cardlib.check_dataset(all_cards["DTD"], hub)
    assert dtd["sizes"] == {"train": 67, "test": 15}

    # a micro evaluation straight from the cache (three tasks)
    results = tmp_path / "results"
    assert main(["run", "task_arithmetic", "--suite", "real", "--manifest", str(out), "--data-root", str(hub),
                 "--tasks", "EuroSAT,MNIST,DTD", "--results", str(results), "-q", "--device", "cpu"]) == 0, \
        capsys.readouterr()
    rec = json.loads(next((results / "real-custom").glob("*.json")).read_text())
    assert rec["suite"]["tasks"] == ["EuroSAT", "MNIST", "DTD"]
    for task in ("EuroSAT", "MNIST", "DTD"):
        card = all_cards[task]
        source = cardlib.open_source(card, hub, "test")
        expected, n = _expected_accuracy(clip, experts[task], card, source)
        assert abs(rec["metrics"]["reference_accuracy"][task] - expected) <= 100.0 / n + 1e-9, task
    # the same function: heads and expert features from the cache equal transformers' on open_clip's transform
    from mergebench.suites import get_suite
    suite = get_suite("real", manifest=out, data_root=hub, tasks=["DTD"], verbose=False)
    card = all_cards["DTD"]
    source = cardlib.open_source(card, hub, "test")
    transform = open_clip.image_transform(32, is_train=False)
    with torch.no_grad():
        encoder = suite.build_encoder({**suite.pretrained, **suite.expert_weights("DTD")}).eval()
        ours = encoder(suite.normalize(suite.split("test", "DTD").images))
        x = torch.stack([transform(source.image(i)) for i in range(len(source))])
        theirs = clip.visual_projection(experts["DTD"](pixel_values=x).pooler_output)
        assert torch.allclose(ours, theirs, atol=1e-4)
        tokens = open_clip.tokenize(card.prompts(card.classnames[5]), context_length=32)
        e = clip.get_text_features(input_ids=tokens)
        e = F.normalize(F.normalize(e if torch.is_tensor(e) else e.pooler_output, dim=-1).mean(0), dim=-1)
        assert torch.allclose(suite.heads["DTD"][5], e, atol=1e-5)
    # DTD's labels were remapped: the stored test labels are the card's indices of the dataset's classes
    src = cardlib.open_source(all_cards["DTD"], hub, "test")
    assert src.labels.tolist() == [46 - (i * 7) % 47 for i in range(15)]
    # only the test splits were cached
    for task in ("EuroSAT", "MNIST", "DTD"):
        d = imagecache.cache_dir(all_cards[task], hub, 32)
        assert sorted(p.name for p in d.glob("*.npy")) == ["test.images.npy", "test.labels.npy"], task


def test_a_run_on_short_splits_is_marked_and_records_its_data(hf_world, tmp_path, monkeypatch, capsys):
    """The run compares each split's image count with the card, says which are short, and records the counts and
    where the data came from; EuroSAT's copy (no val split) gets val carved from train, so --tune runs on it."""
    from mergebench import leaderboard
    from mergebench.cli import main

    base, hub, clip, experts, all_cards = hf_world
    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "cache"))  # heads computed here: their log is printed
    out = tmp_path / "b32.yaml"
    assert main(["zoo", "init", "--hf-cache", str(base / "huggingface"), "--out", str(out)]) == 0
    capsys.readouterr()
    results = tmp_path / "results"
    assert main(["run", "task_arithmetic", "--tune", "scaling=0.2,0.3", "--suite", "real", "--manifest", str(out),
                 "--data-root", str(hub), "--tasks", "EuroSAT,MNIST", "--results", str(results),
                 "--device", "cpu"]) == 0, capsys.readouterr()
    printed = capsys.readouterr()
    assert "MNIST test: 12 images, the card has 10,000" in printed.err and "data_complete: false" in printed.err
    assert "MNIST: 10 classes x 1 template\n" in printed.out and "1 templates" not in printed.out
    rec = json.loads(next((results / "real-custom").glob("*.json")).read_text())
    assert rec["status"] == "ok" and rec["suite"]["data_complete"] is False
    assert "EuroSAT test: 10 images, the card has 2,700" in rec["suite"]["data_short"]
    eurosat, mnist = rec["suite"]["data"]["EuroSAT"], rec["suite"]["data"]["MNIST"]
    assert eurosat["carved"] == {"val": "from train"} and eurosat["images"] == {"train": 18, "val": 2, "test": 10}
    assert eurosat["expected"] == {"train": 19440, "val": 2160, "test": 2700}  # 21,600 train: 10% carved
    assert mnist["source"] == "hf:ylecun/mnist@da7a" and mnist["images"] == {"train": 27, "val": 3, "test": 12}
    snap = hub / "datasets--ylecun--mnist" / "snapshots" / "da7a"
    assert mnist["path_sha256"] == hashlib.sha256(str(snap.resolve()).encode()).hexdigest()[:16]
    table = leaderboard.render(results, "real-custom")
    assert "‡" in table and "ran on data whose split sizes differ from the dataset cards" in table


def test_rows_on_incomplete_data_are_never_beside_published_numbers():
    from mergebench.suites.real import published_references, reference_results

    tasks = list(reference_results()["tasks"])
    rec = {"suite": {"model": {"name": "ViT-B-32", "quick_gelu": True}, "tasks": tasks, "data_complete": True},
           "metrics": {"accuracy": {t: 50.0 for t in tasks}}, "method": {"pipeline": "task_arithmetic"}}
    assert published_references([rec]) is not None
    short = {**rec, "suite": {**rec["suite"], "data_complete": False, "data_short": ["MNIST test: 32 of 10,000"]}}
    assert published_references([rec, short]) is None


def test_a_full_cache_filesystem_is_one_line_naming_the_file(hf_world, tmp_path, monkeypatch, capsys):
    import errno
    import os

    from mergebench.cli import main

    base, hub, clip, experts, all_cards = hf_world
    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "cache"))

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    assert main(["data", "prepare", "--root", str(hub), "--tasks", "GTSRB", "--image-size", "32"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no space left on the device writing" in err
    assert "test.images.npy" in err and "MERGEBENCH_CACHE" in err
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]  # nothing half-written is left


# ------------------------------------------------------------------ the example manifest and the field reference
def test_example_manifest_loads_and_every_field_is_documented():
    example = REPO / "examples" / "zoo" / "vit-b-32.yaml"
    m = zoo.Manifest.load(example)
    assert m.model == "ViT-B-32" and m.clip_config()["quick_gelu"] is True
    assert list(m.experts) == list(cardlib.REAL_TASKS)
    assert zoo.encoder_config(m.clip_config())["width"] == 768
    doc = (REPO / "docs" / "manifest.md").read_text()
    raw = yaml.safe_load(example.read_text())
    fields = set(raw) | {"model_config", "data_root", "name", "path", "sha256", "format"} | set(checkpoints.FORMATS)
    for field in fields:
        assert f"`{field}`" in doc, field
    readme = (REPO / "README.md").read_text()
    assert "examples/zoo/vit-b-32.yaml" in readme and "docs/manifest.md" in readme
