"""The real suite, offline: a tiny open_clip CLIP (random weights) saved in every supported checkpoint
format, small fixture datasets written in each real on-disk layout, and the full path (manifest,
loading, conversion, heads, preprocessing cache, merging, evaluation, record) checked against an
independent computation with open_clip itself."""

from __future__ import annotations

import json
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from safetensors.torch import save_file

from mergebench.suites import checkpoints
from mergebench.suites.checkpoints.hf import hf_to_open_clip, open_clip_to_hf
from mergebench.suites.real import cards as cardlib
from mergebench.suites.real import imagecache, zoo

open_clip = pytest.importorskip("open_clip")

TINY = {"embed_dim": 16,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16, "mlp_ratio": 2.0},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
        "quick_gelu": True}


def tiny_clip(seed=0):
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY).eval()
    with torch.no_grad():  # open_clip zero-inits some tensors; random values make the checks meaningful
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def hf_config(with_proj=True):
    v = TINY["vision_cfg"]
    cfg = dict(hidden_size=v["width"], intermediate_size=int(v["width"] * v["mlp_ratio"]), num_hidden_layers=v["layers"],
               num_attention_heads=v["width"] // v["head_width"], image_size=v["image_size"], patch_size=v["patch_size"],
               projection_dim=TINY["embed_dim"], hidden_act="quick_gelu", layer_norm_eps=1e-5)
    return cfg


def write_hf_folder(folder: Path, visual: dict, with_proj: bool):
    """A Hugging Face CLIPVisionModel(WithProjection) folder holding ``visual`` (open_clip keys)."""
    state = open_clip_to_hf(visual)
    if not with_proj:
        state.pop("visual_projection.weight")
    try:
        from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection
    except ImportError:  # the same files, written by hand
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({**hf_config(), "model_type": "clip_vision_model"}))
        save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
        return
    cls = CLIPVisionModelWithProjection if with_proj else CLIPVisionModel
    model = cls(CLIPVisionConfig(**hf_config()))
    if not any(k.startswith("vision_model.") for k in model.state_dict()):  # transformers >= 5, CLIPVisionModel
        state = {k.removeprefix("vision_model."): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    model.save_pretrained(folder)


# ------------------------------------------------------------------ fixture datasets in the real layouts
def _img(path: Path, rng, size=(12, 10), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path)


def _idx(path: Path, arr: np.ndarray, magic: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape) + arr.astype(np.uint8).tobytes())


def write_datasets(root: Path, all_cards: dict, skip=()):
    import scipy.io as sio

    rng = np.random.default_rng(0)
    if "MNIST" not in skip:
        raw = root / "MNIST" / "raw"
        for prefix, n in (("train", 30), ("t10k", 12)):
            _idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), 2051)
            _idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, 2049)
    if "SVHN" not in skip:
        for split, n in (("train", 30), ("test", 12)):
            (root / "svhn").mkdir(parents=True, exist_ok=True)
            sio.savemat(root / "svhn" / f"{split}_32x32.mat",
                        {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8), "y": (np.arange(n) % 10 + 1)[:, None]})
    if "GTSRB" not in skip:
        for c in range(43):
            _img(root / "gtsrb/GTSRB/Training" / f"{c:05d}" / f"00000_0000{c % 3}.ppm", rng, (15, 17))
        rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
        for i in range(12):
            _img(root / "gtsrb/GTSRB/Final_Test/Images" / f"{i:05d}.ppm", rng)
            rows.append(f"{i:05d}.ppm;12;10;0;0;11;9;{(i * 7) % 43}")
        (root / "gtsrb/GT-final_test.csv").write_text("\n".join(rows) + "\n")
    if "Cars" not in skip:
        base = root / "stanford_cars"
        (base / "devkit").mkdir(parents=True, exist_ok=True)
        names = all_cards["Cars"].classnames
        sio.savemat(base / "devkit/cars_meta.mat", {"class_names": np.array(names, dtype=object)[None, :]})
        for split, n, mat in (("train", 196, base / "devkit/cars_train_annos.mat"),
                              ("test", 12, base / "cars_test_annos_withlabels.mat")):
            ann = np.zeros(n, dtype=[("fname", "O"), ("class", "O")])
            for i in range(n):
                ann[i] = (f"{i:05d}.jpg", np.uint16(i % 196 + 1))  # the .mat files count classes from 1
                _img(base / f"cars_{split}" / f"{i:05d}.jpg", rng, (20, 12))
            sio.savemat(mat, {"annotations": ann[None, :]})
    if "DTD" not in skip:
        for c in all_cards["DTD"].classnames:
            _img(root / "dtd/train" / c.replace(" ", "_") / f"{c}_0001.jpg", rng)
            _img(root / "dtd/val" / c.replace(" ", "_") / f"{c}_0002.jpg", rng)
    if "EuroSAT" not in skip:
        folders = list(all_cards["EuroSAT"].layout["folder_to_classname"])
        for split, n in (("train", 3), ("val", 1), ("test", 1)):
            for f in folders:
                for i in range(n):
                    _img(root / "EuroSAT_splits" / split / f / f"{f}_{split}{i}.jpg", rng, (16, 16))
    if "RESISC45" not in skip:
        splits = {"train": [], "val": [], "test": []}
        for c in all_cards["RESISC45"].classnames:
            folder = c.replace(" ", "_")
            for i, split in enumerate(("train", "train", "val", "test")):
                name = f"{folder}_{i + 1:03d}.jpg"
                _img(root / "resisc45/NWPU-RESISC45" / folder / name, rng, (14, 14))
                splits[split].append(name)
        for split, files in splits.items():
            (root / f"resisc45/resisc45-{split}.txt").write_text("\n".join(files) + "\n")
    if "SUN397" not in skip:
        for c in all_cards["SUN397"].classnames:
            folder = f"{c[0]}_{c.replace(' ', '_')}"
            _img(root / "sun397/train" / folder / "sun_a.jpg", rng, (10, 14))
            _img(root / "sun397/val" / folder / "sun_b.jpg", rng, (10, 14))


# ------------------------------------------------------------------ the zoo: one tiny CLIP, experts in every format
class _PickledEncoder(torch.nn.Module):
    """What the task-vectors repository pickles: ``src.modeling.ImageEncoder`` with ``.model`` = open_clip CLIP."""

    def __init__(self, model):
        super().__init__()
        self.model = model


def write_task_vectors_pickle(path: Path, clip_model):
    import copy
    model = copy.deepcopy(clip_model)
    delattr(model, "transformer")  # as ImageEncoder(keep_lang=False) does
    src, modeling = types.ModuleType("src"), types.ModuleType("src.modeling")
    cls = type("ImageEncoder", (_PickledEncoder,), {"__module__": "src.modeling"})
    modeling.ImageEncoder, src.modeling = cls, modeling
    sys.modules["src"], sys.modules["src.modeling"] = src, modeling
    try:
        torch.save(cls(model), path)
    finally:  # the loader must not need the repository's code
        del sys.modules["src"], sys.modules["src.modeling"]


FORMATS = {"SUN397": "safetensors", "Cars": "open_clip_full", "RESISC45": "hf_proj", "EuroSAT": "task_vectors_pickle",
           "SVHN": "model_prefixed", "GTSRB": "hf_noproj", "MNIST": "safetensors", "DTD": "bare_torch"}


def write_zoo(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    clip = tiny_clip(0)
    torch.save(clip.state_dict(), folder / "backbone.pt")
    pre = {k: v.clone() for k, v in clip.visual.state_dict().items()}
    experts, entries = {}, {}
    for i, (task, fmt) in enumerate(FORMATS.items()):
        g = torch.Generator().manual_seed(100 + i)
        visual = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in pre.items()}
        if fmt == "hf_noproj":
            visual["proj"] = pre["proj"].clone()  # a CLIPVisionModel has no projection: the backbone's is used
        experts[task] = visual
        if fmt == "safetensors":
            path = folder / f"{task}.safetensors"
            save_file({k: v.contiguous() for k, v in visual.items()}, path)
        elif fmt == "open_clip_full":
            full = clip.state_dict()
            full.update({f"visual.{k}": v for k, v in visual.items()})
            path = folder / f"{task}.pt"
            torch.save(full, path)
        elif fmt == "model_prefixed":
            path = folder / f"{task}.bin"
            torch.save({"state_dict": {f"model.visual.{k}": v for k, v in visual.items()}}, path)
        elif fmt == "bare_torch":
            path = folder / f"{task}.pt"
            torch.save(visual, path)
        elif fmt.startswith("hf"):
            path = folder / f"hf_{task}"
            write_hf_folder(path, visual, with_proj=fmt == "hf_proj")
        elif fmt == "task_vectors_pickle":
            path = folder / task / "finetuned.pt"
            path.parent.mkdir()
            c = tiny_clip(0)
            c.visual.load_state_dict(visual)
            write_task_vectors_pickle(path, c)
        entries[task] = {"path": str(path.relative_to(folder)), "sha256": checkpoints.sha256_of(path)}
    manifest = {"name": "tiny", "model_config": TINY, "backbone": {"path": "backbone.pt", "sha256": checkpoints.sha256_of(folder / "backbone.pt")},
                "experts": entries}
    (folder / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return folder / "manifest.yaml", clip, pre, experts


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("real")
    all_cards = cardlib.load_cards()
    write_datasets(base / "data", all_cards)
    manifest, clip, pre, experts = write_zoo(base / "zoo")
    return types.SimpleNamespace(base=base, data=base / "data", manifest=manifest, clip=clip, pre=pre, experts=experts,
                                 cards=all_cards)


@pytest.fixture(scope="module")
def suite(world):
    from mergebench.suites import get_suite
    return get_suite("real", manifest=world.manifest, data_root=world.data, trust_pickle=True, verbose=False)


# ------------------------------------------------------------------ cards and protocol
def test_cards_hold_the_task_vectors_classes_templates_and_sizes():
    all_cards = cardlib.load_cards()
    assert set(all_cards) == set(cardlib.REAL_TASKS)
    counts = {"SUN397": 397, "Cars": 196, "RESISC45": 45, "EuroSAT": 10, "SVHN": 10, "GTSRB": 43, "MNIST": 10, "DTD": 47}
    for name, card in all_cards.items():
        assert card.num_classes == counts[name] == len(set(card.classnames)), name
        assert card.template_set.startswith("task_vectors:") and card.templates
        s = card.sizes
        if "from" in card.splits["val"]:
            n = s["source"]["train"]
            assert s["val"] == min(int(0.1 * n), 5000) and s["train"] + s["val"] == n, name
        assert s["test"] == s["source"]["test"]
    # the test sets of the eight tasks: about 87k images
    assert sum(c.sizes["test"] for c in all_cards.values()) == 87433
    assert all_cards["GTSRB"].prompts("stop")[0] == 'a zoomed in photo of a "stop" traffic sign.'
    assert all_cards["EuroSAT"].classnames[2] == "brushland or shrubland"
    assert cardlib.resolve_task("StanfordCars", all_cards).name == "Cars"
    with pytest.raises(KeyError, match="no dataset card"):
        cardlib.resolve_task("ImageNet", all_cards)


def test_val_split_is_the_task_vectors_random_split():
    tr, va = cardlib.val_partition(60000, {"fraction": 0.1, "max": 5000, "seed": 0})
    assert tr[0] == 36044  # task_vectors asserts this for MNISTVal
    ref_tr, ref_va = torch.utils.data.random_split(range(60000), [55000, 5000], generator=torch.Generator().manual_seed(0))
    assert list(tr[:100]) == list(ref_tr.indices[:100]) and sorted(va) == sorted(ref_va.indices)
    with pytest.raises(ValueError, match="cannot carve"):
        cardlib.val_partition(5, {"fraction": 0.1})


# ------------------------------------------------------------------ HF <-> open_clip
def test_hf_mapping_gives_identical_outputs():
    transformers = pytest.importorskip("transformers")
    from mergebench.api.models import build_encoder

    torch.manual_seed(0)
    hf = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**hf_config())).eval()
    enc_cfg = zoo.encoder_config(TINY)
    oc = build_encoder(enc_cfg).eval()
    oc.load_state_dict(hf_to_open_clip(hf.state_dict()))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(hf(pixel_values=x).image_embeds, oc(x), atol=1e-5)
        # and the other way: an open_clip tower written as HF keys runs identically in transformers
        clip = tiny_clip(1)
        hf2 = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**hf_config())).eval()
        missing, unexpected = hf2.load_state_dict(open_clip_to_hf(clip.visual.state_dict()), strict=False)
        assert not unexpected and all("position_ids" in k for k in missing)
        assert torch.allclose(hf2(pixel_values=x).image_embeds, clip.visual(x), atol=1e-5)
    assert hf_to_open_clip(open_clip_to_hf(clip.visual.state_dict())).keys() == clip.visual.state_dict().keys()


def test_encoder_config_builds_open_clips_image_tower_for_the_real_models():
    from mergebench.api.models import build_encoder

    clip = tiny_clip(0)
    enc = build_encoder(zoo.encoder_config(TINY)).eval()
    enc.load_state_dict(clip.visual.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(enc(x), clip.visual(x))
    for name, (width, layers, patch, heads, dim) in {"ViT-B-32": (768, 12, 32, 12, 512), "ViT-B-16": (768, 12, 16, 12, 512),
                                                      "ViT-L-14": (1024, 24, 14, 16, 768)}.items():
        cfg = zoo.encoder_config({**open_clip.get_model_config(name), "quick_gelu": True})
        assert (cfg["width"], cfg["layers"], cfg["patch_size"], cfg["heads"], cfg["output_dim"], cfg["act"]) == \
            (width, layers, patch, heads, dim, "quick_gelu")


# ------------------------------------------------------------------ data check
def test_data_check_says_what_is_missing_and_how_to_get_it(world, tmp_path, capsys):
    from mergebench.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    reports = [cardlib.check_dataset(c, empty) for c in world.cards.values()]
    assert all(r["status"] == "missing" and r["missing"] and r["how_to_get"] for r in reports)
    reports = {c.name: cardlib.check_dataset(c, world.data) for c in world.cards.values()}
    assert {r["status"] for r in reports.values()} == {"problems"}  # present, but the fixtures are small
    assert reports["MNIST"]["sizes"] == {"train": 30, "test": 12}
    assert any("the protocol has 60000" in p for p in reports["MNIST"]["problems"])
    assert main(["data", "check", "--root", str(empty)]) == 1
    out = capsys.readouterr().out
    assert "SUN397: MISSING" in out and "MISSING  sun397/train" in out and "how to get it" in out
    # checksums of files stored as published: a fixture file does not match
    rep = cardlib.check_dataset(world.cards["SVHN"], world.data, verify=True, count=False)
    assert rep["checksums"]["svhn/train_32x32.mat"] == "MISMATCH"


def test_class_folders_must_match_the_card(world, tmp_path):
    root = tmp_path / "d"
    for folder in ("train", "val"):
        for c in world.cards["DTD"].classnames[:-1] + ["zzz_not_a_texture"]:
            _img(root / "dtd" / folder / c / "x.jpg", np.random.default_rng(0))
    with pytest.raises(ValueError, match="first difference at index 46: found 'zzz not a texture', card has 'zigzagged'"):
        cardlib.open_source(world.cards["DTD"], root, "train")
    with pytest.raises(cardlib.DatasetMissingError, match="missing sun397/train.*How to get it"):
        cardlib.open_source(world.cards["SUN397"], root, "train")


# ------------------------------------------------------------------ the full path
def _expected_heads(clip, card):
    tokens = open_clip.tokenize(card.prompts(card.classnames[0]) + card.prompts(card.classnames[-1]), context_length=32)
    with torch.no_grad():
        emb = F.normalize(clip.encode_text(tokens), dim=-1)
    t = len(card.templates)
    return F.normalize(emb[:t].mean(0), dim=-1), F.normalize(emb[t:].mean(0), dim=-1)


def test_suite_loads_every_format_heads_and_data(world, suite):
    assert suite.name == "real-tiny"
    assert suite.tasks == list(cardlib.REAL_TASKS)
    for k, v in world.pre.items():
        assert torch.equal(suite.pretrained[k], v), k
    for task, visual in world.experts.items():  # every format reads back exactly what was saved
        got = suite.expert_weights(task)
        assert got.keys() == visual.keys()
        for k in visual:
            assert torch.allclose(got[k], visual[k].float(), atol=1e-6), (task, FORMATS[task], k)
    assert any("GTSRB" in n and "no visual projection" in n for n in suite.info["notes"])
    for task in ("Cars", "GTSRB"):
        first, last = _expected_heads(world.clip, world.cards[task])
        assert torch.allclose(suite.heads[task][0], first, atol=1e-5)
        assert torch.allclose(suite.heads[task][-1], last, atol=1e-5)
    # splits follow the cards' protocol
    sizes = {t: {s: len(suite.split(s, t)) for s in ("train", "val", "test")} for t in suite.tasks}
    assert sizes["MNIST"] == {"train": 27, "val": 3, "test": 12}
    assert sizes["EuroSAT"] == {"train": 30, "val": 10, "test": 10}       # its own val folder
    assert sizes["RESISC45"] == {"train": 81, "val": 9, "test": 45}       # split files, val carved from train
    assert sizes["SUN397"]["test"] == 397 and sizes["Cars"]["train"] + sizes["Cars"]["val"] == 196
    x = suite.split("test", "GTSRB").images
    assert x.dtype == torch.uint8 and tuple(x.shape[1:]) == (3, 32, 32)
    labels = suite.split("test", "GTSRB").labels
    assert labels.tolist() == [(i * 7) % 43 for i in range(12)]


def test_preprocessing_cache_is_built_once_and_matches_open_clip(world, suite, monkeypatch):
    card = world.cards["Cars"]
    directory = imagecache.cache_dir(card, world.data, 32)
    assert (directory / "test.meta.json").exists() and (directory / "test.images.npy").exists()
    stamp = (directory / "test.meta.json").stat().st_mtime_ns

    def fail(*a, **k):
        raise AssertionError("decoded an image again")
    monkeypatch.setattr(imagecache, "preprocess", fail)
    again = imagecache.load_or_build(card, world.data, 32)
    assert (directory / "test.meta.json").stat().st_mtime_ns == stamp
    assert torch.equal(again["test"].images, suite.split("test", "Cars").images)
    monkeypatch.undo()
    # the cached uint8 images normalized on the device == open_clip's own evaluation transform
    transform = open_clip.image_transform(32, is_train=False)
    path = world.data / "stanford_cars/cars_test/00003.jpg"
    expected = transform(Image.open(path))
    assert torch.allclose(suite.normalize(again["test"].images[3:4])[0], expected, atol=1e-5)


def _open_clip_accuracy(world, visual, task, suite):
    """Accuracy of ``visual`` on ``task``'s test split computed with open_clip alone (no mergebench code path)."""
    clip = tiny_clip(0)
    clip.visual.load_state_dict(visual)
    card = world.cards[task]
    source = cardlib.open_source(card, world.data, card.splits["test"]["source"])
    transform = open_clip.image_transform(32, is_train=False)
    x = torch.stack([transform(source.image(i)) for i in range(len(source))])
    with torch.no_grad():
        prompts = [p for c in card.classnames for p in card.prompts(c)]
        e = F.normalize(clip.encode_text(open_clip.tokenize(prompts, context_length=32)), dim=-1)
        text = F.normalize(e.view(card.num_classes, len(card.templates), -1).mean(1), dim=-1)
        logits = F.normalize(clip.encode_image(x), dim=-1) @ text.t()
    return 100.0 * (logits.argmax(-1).numpy() == source.labels).mean(), len(source)


def test_merge_evaluate_record_with_two_methods(world, suite, results_dir):
    from mergebench.engine.run import run_one

    rec = run_one("task_arithmetic", suite, results_dir=results_dir, device="cpu", show_progress=False,
                  count_flops=False)
    assert rec["status"] == "ok", rec.get("error")
    assert rec["suite"]["name"] == "real-tiny"
    assert rec["suite"]["checkpoints"]["backbone"] == checkpoints.sha256_of(world.manifest.parent / "backbone.pt")
    assert set(rec["metrics"]["accuracy"]) == set(cardlib.REAL_TASKS)
    merged = {k: world.pre[k] + 0.3 * sum(world.experts[t][k] - world.pre[k] for t in cardlib.REAL_TASKS) for k in world.pre}
    for task in ("GTSRB", "EuroSAT", "MNIST"):
        expected, n = _open_clip_accuracy(world, merged, task, suite)
        assert abs(rec["metrics"]["accuracy"][task] - expected) <= 100.0 / n + 1e-9, task
    ties = run_one("ties_merging", suite, results_dir=results_dir, device="cpu", show_progress=False, count_flops=False)
    assert ties["status"] == "ok", ties.get("error")
    assert Path(ties["_path"]).exists() and ties["config_hash"] != rec["config_hash"]
    assert ties["metrics"]["reference_accuracy"] == rec["metrics"]["reference_accuracy"]
    # the expert of a task on its own test set, as open_clip computes it
    expected, n = _open_clip_accuracy(world, world.experts["DTD"], "DTD", suite)
    assert abs(rec["metrics"]["reference_accuracy"]["DTD"] - expected) <= 100.0 / n + 1e-9


def test_cli_runs_the_real_suite(world, suite, tmp_path, capsys):
    from mergebench.cli import main

    code = main(["run", "weight_averaging", "--suite", "real", "--manifest", str(world.manifest), "--data-root",
                 str(world.data), "--trust-pickle", "--results", str(tmp_path), "-q", "--device", "cpu"])
    out = capsys.readouterr()
    assert code == 0, out
    assert list((tmp_path / "real-tiny").glob("*.json"))
    assert f"records: {tmp_path / 'real-tiny'} (`mergebench leaderboard --suite real-tiny --results {tmp_path}` " \
           f"shows them)" in out.out  # the run names its folder
    assert main(["leaderboard", "--suite", "real-tiny", "--results", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "| Weight Averaging" in table
    # the suite's name as typed finds the folder named after the backbone
    assert main(["leaderboard", "--suite", "real", "--results", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert out.out == table and f"suite real: the records in {tmp_path / 'real-tiny'}" in out.err


# ------------------------------------------------------------------ clear errors for bad checkpoints
def _manifest_with(world, tmp_path, task, path, sha=None, fmt=None):
    raw = yaml.safe_load(world.manifest.read_text())
    base = world.manifest.parent
    raw["backbone"]["path"] = str(base / raw["backbone"]["path"])
    for t, e in raw["experts"].items():
        e["path"] = str(base / e["path"])
    raw["experts"][task] = {"path": str(path), **({"sha256": sha} if sha else {}), **({"format": fmt} if fmt else {})}
    out = tmp_path / "manifest.yaml"
    out.write_text(yaml.safe_dump(raw))
    return zoo.Manifest.load(out)


def test_bad_checkpoints_are_clear_errors(world, tmp_path):
    reference = {k: v for k, v in world.pre.items()}
    good = world.experts["MNIST"]
    # sha256 mismatch
    m = _manifest_with(world, tmp_path, "MNIST", world.manifest.parent / "MNIST.safetensors", sha="0" * 64)
    with pytest.raises(checkpoints.CheckpointError, match="sha256 mismatch for .*MNIST.safetensors"):
        zoo.load_expert(m, "MNIST", reference, world.pre)
    # missing key
    p = tmp_path / "missing.safetensors"
    save_file({k: v.contiguous() for k, v in good.items() if k != "ln_post.weight"}, p)
    with pytest.raises(checkpoints.CheckpointError, match=r"missing\.safetensors.*missing key 'ln_post\.weight'"):
        zoo.load_expert(_manifest_with(world, tmp_path, "MNIST", p), "MNIST", reference, world.pre)
    # wrong shape
    p = tmp_path / "shape.safetensors"
    save_file({**{k: v.contiguous() for k, v in good.items()}, "proj": torch.zeros(32, 8)}, p)
    with pytest.raises(checkpoints.CheckpointError, match=r"shape\.safetensors.*key 'proj' has shape \(32, 8\).*\(32, 16\)"):
        zoo.load_expert(_manifest_with(world, tmp_path, "MNIST", p), "MNIST", reference, world.pre)
    # corrupt (truncated) file
    p = tmp_path / "corrupt.pt"
    data = (world.manifest.parent / "DTD.pt").read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoints.CheckpointError, match="corrupt.pt.*corrupt or truncated"):
        zoo.load_expert(_manifest_with(world, tmp_path, "MNIST", p), "MNIST", reference, world.pre)
    # a missing file
    with pytest.raises(checkpoints.CheckpointError, match="does not exist"):
        zoo.load_expert(_manifest_with(world, tmp_path, "MNIST", tmp_path / "nope.pt"), "MNIST", reference, world.pre)


def test_pickled_checkpoints_need_trust(world, tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "cache"))  # no converted copy yet
    path = world.manifest.parent / "EuroSAT" / "finetuned.pt"
    m = _manifest_with(world, tmp_path, "EuroSAT", path)
    with pytest.raises(checkpoints.CheckpointError, match="pickled Python object.*--trust-pickle"):
        zoo.load_expert(m, "EuroSAT", world.pre, world.pre)
    m = _manifest_with(world, tmp_path, "EuroSAT", path, fmt="task_vectors_pickle")
    with pytest.raises(checkpoints.CheckpointError, match="needs --trust-pickle"):
        zoo.load_expert(m, "EuroSAT", world.pre, world.pre)
    state, _, _ = zoo.load_expert(m, "EuroSAT", world.pre, world.pre, trust_pickle=True)
    assert torch.allclose(state["conv1.weight"], world.experts["EuroSAT"]["conv1.weight"])
    converted = list((tmp_path / "cache" / "real" / "converted").glob("*.safetensors"))
    assert len(converted) == 1
    # converted once: later loads read the safetensors copy
    state2, _, _ = zoo.load_expert(m, "EuroSAT", world.pre, world.pre)
    assert torch.equal(state2["proj"], state["proj"])


def test_missing_dataset_is_reported_on_use(world, tmp_path):
    from mergebench.suites import get_suite

    root = tmp_path / "partial"
    write_datasets(root, world.cards, skip=("SVHN", "Cars", "SUN397", "GTSRB", "DTD", "EuroSAT", "RESISC45"))
    s = get_suite("real", manifest=world.manifest, data_root=root, trust_pickle=True, verbose=False, tasks=["MNIST", "SVHN"])
    assert len(s.split("test", "MNIST")) == 12
    with pytest.raises(cardlib.DatasetMissingError, match=r"SVHN: missing svhn/test_32x32.mat.*How to get it"):
        s.split("test", "SVHN")
    with pytest.raises(KeyError, match="no dataset card for task 'ImageNet'"):
        get_suite("real", manifest=world.manifest, data_root=root, verbose=False, tasks=["MNIST", "ImageNet"])


def _refile(rec: dict, folder: Path, filename: str, **suite_fields) -> dict:
    """A copy of ``rec`` filed under ``folder`` with some of its suite fields changed (what another run would say)."""
    out = {"schema": 1, **json.loads(json.dumps({k: v for k, v in rec.items() if k != "_path"}))}
    out["suite"].update(suite_fields)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / filename).write_text(json.dumps(out))
    return out


def test_published_numbers_follow_the_model_and_task_set_not_the_suite_name(world, suite, tmp_path):
    from mergebench import leaderboard
    from mergebench.engine.run import run_one

    eight = list(cardlib.REAL_TASKS)
    from mergebench.suites import real as real_suite

    rows = {r["method"]: r for r in real_suite.published("ViT-B-32", eight)}
    assert {k: v["avg"] for k, v in rows.items()} == {
        "pretrained": 48.0, "individual": 90.5, "weight_averaging": 65.8, "task_arithmetic": 69.1, "ties_merging": 72.4,
        "adamerging_taskwise": 71.1, "adamerging_layerwise": 80.1, "lot_merging": 82.7, "cat_merging": 78.3}
    from mergebench.api.registry import get_method
    for name in rows:  # every published row sits beside a registered method
        get_method(name)
    assert real_suite.published(None, eight) == [] and real_suite.published("ViT-B-32", eight[:3]) == []
    assert real_suite.published("ViT-B-32", eight, quick_gelu=False) == []  # a GELU backbone is another model
    rec = run_one("task_arithmetic", suite, results_dir=tmp_path / "r", device="cpu", show_progress=False,
                  count_flops=False)
    assert rec["suite"]["model"] == {"name": None, "open_clip": None, "quick_gelu": True}  # a model_config manifest
    assert "Published numbers" not in leaderboard.render(tmp_path / "r", "real-tiny")
    # the fixtures' splits are far smaller than the cards': the run says so, and is never beside published numbers
    assert rec["suite"]["data_complete"] is False and "MNIST test: 12 images, the card has 10,000" in \
        rec["suite"]["data_short"]
    b32 = {"name": "ViT-B-32", "open_clip": "ViT-B-32-quickgelu", "quick_gelu": True}
    _refile(rec, tmp_path / "s" / "real-my-zoo", "ta.json", model=b32, name="real-my-zoo")
    md = leaderboard.render(tmp_path / "s", "real-my-zoo")
    assert "Published numbers" not in md and "Task Arithmetic ‡" in md
    # a ViT-B/32 run on complete data whose manifest says `name: my-zoo`: the published 69.1 sits beside it
    _refile(rec, tmp_path / "r" / "real-my-zoo", "ta.json", model=b32, name="real-my-zoo", data_complete=True,
            data_short=[])
    md = leaderboard.render(tmp_path / "r", "real-my-zoo")
    line = next(l for l in md.splitlines() if l.startswith("| Task Arithmetic") and "69.1" in l)
    assert f"{rec['metrics']['avg_accuracy']:.1f}" in line and "2310.02575" in line
    assert "Published numbers (ViT-B-32" in md and "‡" not in md
    # the same architecture with GELU weights, or under a suite named real-ViT-B-32: no published numbers
    _refile(rec, tmp_path / "g" / "real-ViT-B-32", "ta.json", model={**b32, "quick_gelu": False})
    assert "Published numbers" not in leaderboard.render(tmp_path / "g", "real-ViT-B-32")
    # records written before the model field: read from the backbone description
    old = {k: v for k, v in rec["suite"].items() if k != "model"}
    old["backbone"] = "open_clip ViT-B-32 (QuickGELU) {}"
    assert real_suite.record_model({"suite": old}) == ("ViT-B-32", True)


def test_a_task_subset_run_is_kept_apart_from_the_full_rows(world, suite, tmp_path):
    from mergebench import leaderboard
    from mergebench.engine.run import run_one

    results = tmp_path / "r"
    full = run_one("task_arithmetic", suite, results_dir=results, device="cpu", show_progress=False,
                   count_flops=False)
    wa = run_one("weight_averaging", suite, results_dir=results, device="cpu", show_progress=False,
                 count_flops=False)
    assert full["status"] == wa["status"] == "ok"
    b32 = {"name": "ViT-B-32", "open_clip": "ViT-B-32", "quick_gelu": True}
    for r, name in ((full, "ta.json"), (wa, "wa.json")):  # as if on complete data (the fixtures' splits are small)
        _refile(r, results / "real-b32", name, model=b32, data_complete=True, data_short=[])
    # a newer 3-task Task Arithmetic run (`--tasks MNIST,SVHN,DTD`) that scores higher than the full row
    sub = {"schema": 1, **json.loads(json.dumps({k: v for k, v in full.items() if k != "_path"}))}
    three = ["MNIST", "SVHN", "DTD"]
    sub["suite"].update(tasks=three, model=b32)
    sub["metrics"]["accuracy"] = {t: 97.3 for t in three}
    sub["metrics"]["normalized_accuracy"] = {t: 100.0 for t in three}
    sub["metrics"]["avg_accuracy"] = 97.3
    sub["finished"] = "9999-01-01T00:00:00+00:00"
    (results / "real-b32" / "ta-sub.json").write_text(json.dumps(sub))

    df = leaderboard.table(results, "real-b32")[0]
    ta = df[df["Pipeline"] == full["method"]["pipeline"]]
    assert len(ta) == 1 and ta["Avg"].iloc[0] == full["metrics"]["avg_accuracy"]  # the full row is still there
    assert list(leaderboard.task_columns(df)) == list(cardlib.REAL_TASKS)
    subset = leaderboard.table(results, "real-b32", tasks=tuple(three))[0]
    assert list(subset["Pipeline"]) == [full["method"]["pipeline"]] and subset["Pareto"].tolist() == [True]
    md = leaderboard.render(results, "real-b32")
    main_part, _, rest = md.partition("## Runs over 3 of the 8 tasks: MNIST, SVHN, DTD")
    assert rest, md
    # the 97.3 row is not in the main table, has no star there, and is not the measured number beside 69.1
    assert "97.3" not in main_part
    published = rest[rest.index("## Published numbers"):]
    line = next(l for l in published.splitlines() if l.startswith("| Task Arithmetic"))
    assert f"{full['metrics']['avg_accuracy']:.1f}" in line and "97.3" not in line
    assert "97.3" in rest[: rest.index("## Published numbers")]


def test_torchscript_backbone_file_is_read(world, tmp_path):
    """OpenAI distributes CLIP as a TorchScript archive; it is read without unpickling Python objects."""
    scripted = torch.jit.script(tiny_clip(0))
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.save(scripted, str(path))
    assert checkpoints.guess_format(path) == "openai_jit"
    raw = yaml.safe_load(world.manifest.read_text())
    raw["backbone"] = {"path": str(path), "sha256": checkpoints.sha256_of(path)}
    raw["experts"] = {t: {**e, "path": str(world.manifest.parent / e["path"])} for t, e in raw["experts"].items()}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(raw))
    clip, digest = zoo.build_clip(zoo.Manifest.load(tmp_path / "m.yaml"))
    assert digest == checkpoints.sha256_of(path)
    for k, v in world.clip.state_dict().items():
        assert torch.equal(clip.state_dict()[k], v), k


def test_a_run_caches_only_the_splits_it_reads_and_data_check_says_the_space(world, tmp_path, monkeypatch, capsys):
    from mergebench.cli import main
    from mergebench.engine.run import run_one
    from mergebench.suites.datasets import size_text
    from mergebench.suites import get_suite

    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "cache"))
    s = get_suite("real", manifest=world.manifest, data_root=world.data, trust_pickle=True, verbose=False,
                  tasks=["MNIST", "DTD"])
    assert run_one("task_arithmetic", s, results_dir=tmp_path / "r", device="cpu", show_progress=False,
                   count_flops=False)["status"] == "ok"

    def cached(task):
        return sorted(p.name.split(".")[0] for p in imagecache.cache_dir(world.cards[task], world.data, 32).glob("*.meta.json"))
    assert cached("MNIST") == cached("DTD") == ["test"]  # a data-free method: the test splits only
    assert len(s.split("train", "MNIST")) == 27  # a method that reads training data caches train, not val
    assert cached("MNIST") == ["test", "train"]
    assert main(["data", "check", "--root", str(world.data), "--tasks", "MNIST,DTD", "--image-size", "32"]) == 1
    out = capsys.readouterr().out
    assert f"test 12 images {size_text(imagecache.split_bytes(12, 32))} (cached)" in out
    assert f"val 3 images {size_text(imagecache.split_bytes(3, 32))} (on first use)" in out
    assert f"test 47 images {size_text(imagecache.split_bytes(47, 32))} (cached)" in out
    assert "writes 0.0 kB more" in out  # --splits test (the default): both test splits are there
    assert main(["data", "prepare", "--root", str(world.data), "--tasks", "DTD", "--image-size", "32", "--splits",
                 "all"]) == 0
    assert cached("DTD") == ["test", "train", "val"]
    # the full benchmark at 224 px, from the cards' protocol sizes: 13.2 GB of test images, 48.5 GB for every split
    cards_ = cardlib.load_cards()
    test = sum(imagecache.split_bytes(c.sizes["test"], 224) for c in cards_.values())
    every = sum(imagecache.split_bytes(c.sizes[sp], 224) for c in cards_.values() for sp in ("train", "val", "test"))
    assert round(test / 1e9, 1) == 13.2 and round(every / 1e9, 1) == 48.5


def test_checkpoint_reading_imports_neither_the_zoo_nor_lora():
    """Checkpoint reading (mergebench.suites.checkpoints, its trust boundary and the HF key conversion) stands on its
    own: the zoo and LoRA import it, never the other way round (no import loop between them)."""
    import subprocess
    import sys

    code = ("import sys, mergebench.suites.checkpoints, mergebench.suites.checkpoints.hf_cache; "
            "print(sorted(m for m in sys.modules if m in ('mergebench.api.lora', 'mergebench.suites.real', "
            "'mergebench.suites.real.zoo')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]", loaded


def test_one_converter_maps_both_hf_towers():
    from mergebench.suites.checkpoints.hf import ConversionError

    state = {"text_model.embeddings.token_embedding.weight": torch.zeros(10, 4),
             "text_model.encoder.layers.0.self_attn.q_proj.weight": torch.ones(4, 4),
             "text_model.encoder.layers.0.self_attn.k_proj.weight": 2 * torch.ones(4, 4),
             "text_model.encoder.layers.0.self_attn.v_proj.weight": 3 * torch.ones(4, 4),
             "text_projection.weight": torch.arange(8.0).view(2, 4), "logit_scale": torch.tensor(4.6)}
    text = hf_to_open_clip(state, tower="text")
    assert set(text) == {"token_embedding.weight", "transformer.resblocks.0.attn.in_proj_weight", "text_projection",
                         "logit_scale"}
    assert torch.equal(text["transformer.resblocks.0.attn.in_proj_weight"][4:8], 2 * torch.ones(4, 4))
    assert torch.equal(text["text_projection"], state["text_projection.weight"].t())
    with pytest.raises(ConversionError, match="no CLIP vision keys"):  # a text tower alone has no image tower
        hf_to_open_clip(state)
    del state["text_model.encoder.layers.0.self_attn.v_proj.weight"]
    with pytest.raises(ConversionError, match="text layer 0 lacks self_attn.v_proj.weight"):
        hf_to_open_clip(state, tower="text")
