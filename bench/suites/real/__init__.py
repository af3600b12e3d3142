"""The real benchmark: open_clip ViT-B/32, B/16, L/14 on the eight datasets, from local files.

``load_real(manifest, data_root)`` returns the same ``Suite`` as mini8, so every method and
measurement runs the same code path:

- the backbone (full CLIP) and the experts come from a model-zoo manifest (``zoo.py``; the files are read by
  ``mergebench.suites.checkpoints``), every file checked against its sha256 and against the architecture's keys
  and shapes;
- the encoder is the CLIP image tower (an open_clip ``VisionTransformer``, built by
  ``mergebench.api.models.build_encoder`` from the open_clip model config);
- the heads are zero-shot heads: for each class, the normalized mean of the normalized text
  embeddings of the card's templates (the task-vectors recipe), computed once and cached;
- the data come from the dataset cards (``datasets/*.yaml``) and the preprocessing cache
  (``imagecache.py``), each split built on first use (a data-free run reads only the test splits),
  memory-mapped afterwards; a card may also point at a Hugging Face dataset in an HF cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from functools import lru_cache
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
import yaml
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from safetensors.torch import load_file

from mergebench.errors import MissingFileError, NotFoundError
from mergebench.engine.io import atomic_save_tensors, cache_root
from mergebench.api.models import build_encoder, encoder_weights
from mergebench.engine.progress import progress
from mergebench.suites.real import cards as cardlib
from mergebench.suites.real import imagecache, zoo
from mergebench.suites.base import SPLITS, Suite
from mergebench.suites.checkpoints import CheckpointError
from mergebench.suites.registry import MergingSanity, References, register_suite
from mergebench.api.weights import Weights

HEADS_VERSION = 1


@torch.no_grad()
def zero_shot_heads(clip, card: cardlib.Card, context_length: int, device="cpu", batch: int = 256,
                    bar=None) -> torch.Tensor:
    """(classes, embed_dim): per class, normalize(mean over templates of normalize(text embedding)); ``bar`` (a
    progress bar) advances by the prompts of each batch."""
    clip = clip.to(device).eval()
    prompts = [p for name in card.classnames for p in card.prompts(name)]  # class-major, templates inner
    emb = []
    for i in range(0, len(prompts), batch):
        tokens = open_clip.tokenize(prompts[i:i + batch], context_length=context_length).to(device)
        emb.append(F.normalize(clip.encode_text(tokens).float(), dim=-1).cpu())
        if bar is not None:
            bar.update(len(tokens))
    emb = torch.cat(emb).view(card.num_classes, len(card.templates), -1)
    return F.normalize(emb.mean(1), dim=-1)


def plural(n: int, word: str, words: str | None = None) -> str:
    """"1 template", "3 templates"."""
    return f"{n:,} {word if n == 1 else (words or word + 's')}"


def data_provenance(card: cardlib.Card, root: Path) -> dict:
    """What a run reads of ``card``'s data under ``root`` (``data check``'s count): where it comes from (the card's
    layout or a Hugging Face copy, and a hash of its path), the images of each protocol split against the card's,
    the splits carved from another, and ``short``: each split whose count differs from the card's."""
    report = cardlib.check_dataset(card, root, count=True)
    where = cardlib.hf_location(card, root)
    path = where[1] if where else root
    images = cardlib.protocol_sizes(card, root, report["sizes"]) if report["sizes"] else {}
    expected = cardlib.protocol_sizes(card, root)
    specs = cardlib.split_specs(card, root)
    return {"source": cardlib.source_id(card, root) or "layout",
            "path_sha256": hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16],
            "images": images, "expected": expected,
            **({"carved": {s: f"from {v['from']}" for s, v in specs.items() if "from" in v}}
               if any("from" in v for v in specs.values()) else {}),
            "short": [f"{card.name} {split}: {images[split]:,} images, the card has {n:,}"
                      for split, n in expected.items() if split in images and images[split] != n]}


def _heads_key(backbone_sha: str, card: cardlib.Card, cfg: dict) -> str:
    payload = {"backbone": backbone_sha, "card": card.digest(), "v": HEADS_VERSION,
               "text_cfg": cfg.get("text_cfg"), "quick_gelu": cfg.get("quick_gelu")}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def load_real(manifest: str | os.PathLike | zoo.Manifest, data_root: str | os.PathLike | None = None,
              tasks: list[str] | None = None, trust_pickle: bool = False, cards_dir=None, verbose: bool = True,
              workers: int | None = None, device: str | None = None) -> Suite:
    """The real suite from ``manifest`` (backbone + experts) and the datasets under ``data_root``."""
    if manifest is None:
        raise zoo.ManifestError("the real suite needs a model-zoo manifest: --manifest M.yaml (see docs/manifest.md)")
    m = manifest if isinstance(manifest, zoo.Manifest) else zoo.Manifest.load(manifest)
    root = Path(data_root) if data_root else m.data_root
    if root is None:
        raise zoo.ManifestError("no data root: pass --data-root DIR (or data_root: in the manifest)")
    if not root.is_dir():
        raise MissingFileError(f"data root {root} does not exist; `mergebench data check --root DIR` lists what each "
                                f"dataset needs")
    all_cards = cardlib.load_cards(cards_dir)
    by_card: dict[str, str] = {}  # card name -> the manifest's key for it (which may be an alias)
    for key in m.experts:
        by_card.setdefault(cardlib.resolve_task(key, all_cards).name, key)
    names = list(tasks) if tasks else [t for t in cardlib.REAL_TASKS if t in by_card] + \
        [t for t in by_card if t not in cardlib.REAL_TASKS]
    task_cards = {}
    for t in names:
        card = cardlib.resolve_task(t, all_cards)
        if card.name not in by_card:
            raise NotFoundError(f"manifest {m.path} has no expert for task {card.name!r} (it has "
                                f"{', '.join(m.experts)})")
        task_cards[card.name] = card
    expert_name = {c: by_card[c] for c in task_cards}
    log = print if verbose else (lambda *a, **k: None)

    cfg = m.clip_config()
    enc_cfg = zoo.encoder_config(cfg)
    checkpoints = {"backbone": zoo.verify(m.backbone, "backbone")}
    expert_sha: dict[str, str] = {}
    for name in task_cards:  # every file checked before the (minutes-long, on first use) head computation
        expert_sha[name] = zoo.verify(m.experts[expert_name[name]], f"expert {name}")
        checkpoints[f"expert/{name}"] = expert_sha[name]
    clip, backbone_sha = zoo.build_clip(m, trust_pickle)
    # The encoder mergebench builds must be exactly open_clip's image tower (same keys and shapes).
    reference = build_encoder(enc_cfg).state_dict()
    zoo.check_fits(clip.visual.state_dict(), reference, f"image tower of {m.model or 'model_config'}")
    pretrained = encoder_weights(clip.visual)

    provenance = {name: data_provenance(card, root) for name, card in task_cards.items()}
    short = [line for p in provenance.values() for line in p["short"]]
    if short:  # a partial download gives numbers that look right: the run says so and its record is marked
        print(f"warning: the data under {root} differ from the dataset cards ({'; '.join(short)}); this run is "
              f"recorded with data_complete: false and is not compared with published numbers; `mergebench data "
              f"check --root {root}` says what is missing", file=sys.stderr, flush=True)

    heads = {}
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    paths = {name: cache_root() / "real" / "heads" / f"{_heads_key(backbone_sha, card, cfg)}.safetensors"
             for name, card in task_cards.items()}
    to_compute = [name for name, path in paths.items() if not path.exists()]
    bar = progress(total=sum(task_cards[n].num_classes * len(task_cards[n].templates) for n in to_compute),
                   desc="zero-shot heads", unit="prompt")
    for name, card in task_cards.items():
        path = paths[name]
        if path.exists():
            heads[name] = load_file(path)["head"]
        else:
            log(f"zero-shot head for {name}: {plural(card.num_classes, 'class', 'classes')} x "
                f"{plural(len(card.templates), 'template')}")
            bar.set_postfix_str(name, refresh=False)
            heads[name] = zero_shot_heads(clip, card, cfg["text_cfg"].get("context_length", 77), dev, bar=bar)
            atomic_save_tensors({"head": heads[name]}, path)
        if heads[name].shape != (card.num_classes, cfg["embed_dim"]):
            raise CheckpointError(f"head of {name} has shape {tuple(heads[name].shape)}, expected "
                                  f"{(card.num_classes, cfg['embed_dim'])} (a stale file in {path.parent}?)")
    bar.close()
    clip.cpu()
    del clip

    notes: list[str] = []

    def load_expert(task: str) -> Weights:
        state, _, n = zoo.load_expert(m, expert_name[task], reference, pretrained, trust_pickle)
        notes.extend(n)
        return Weights(state)

    # LoRA experts (PEFT adapter folders): their factors too, when every expert is one
    lora_experts = all(zoo.is_lora(m.experts[expert_name[t]]) for t in task_cards)

    def load_lora(task: str) -> dict:
        return zoo.load_lora_factors(m, expert_name[task], reference)

    @lru_cache(maxsize=None)
    def task_data(task: str, split: str):  # one split at a time: a run caches only the splits it reads
        return imagecache.load_or_build(task_cards[task], root, enc_cfg["image_size"], workers, verbose,
                                        splits=(split,))[split]

    data = {s: imagecache.LazyTasks(s, list(task_cards), task_data) for s in SPLITS}
    data_id = {name: imagecache.cache_key(card, root, enc_cfg["image_size"]) for name, card in task_cards.items()}
    # What the expert accuracies depend on beyond the weights (the data) joins the checkpoint ids, so the
    # cached reference accuracies are keyed by both.
    checkpoints["data"] = hashlib.sha256(json.dumps(data_id, sort_keys=True).encode()).hexdigest()[:16]
    suite_id = hashlib.sha256(json.dumps({"ck": checkpoints, "cfg": enc_cfg}, sort_keys=True).encode()).hexdigest()[:16]

    return Suite(
        name=f"real-{m.name}", tasks=list(task_cards), encoder_config=enc_cfg, pretrained=pretrained,
        heads=heads, data=data, load_expert=load_expert, mean=tuple(OPENAI_DATASET_MEAN), std=tuple(OPENAI_DATASET_STD),
        info={"suite": f"real-{m.name}", "backbone": f"open_clip {m.model or 'custom'} "
              f"({'QuickGELU' if cfg['quick_gelu'] else 'GELU'}) " + json.dumps(enc_cfg, sort_keys=True),
              "model": m.model_info(),
              "cache_key": suite_id, "checkpoints": checkpoints, "manifest": str(m.path), "data_root": str(root),
              "cards": {n: {"digest": c.digest(), "templates": c.template_set} for n, c in task_cards.items()},
              "notes": notes, **({"experts": "LoRA (PEFT adapters)"} if lora_experts else {}),
              "data": provenance, "data_complete": not short, **({"data_short": short} if short else {})},
        load_lora=load_lora if lora_experts else None,
    )


# ------------------------------------------------------------------ what the real suite knows about its results
def reference_results() -> dict:
    """``datasets/reference_results.yaml``: the published averages, the task set and backbone they were measured on."""
    path = Path(__file__).resolve().parents[3] / "datasets" / "reference_results.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def record_model(rec: dict) -> tuple[str | None, bool | None]:
    """(open_clip architecture without the -quickgelu suffix, QuickGELU?) of a real-suite record, else (None, None)."""
    info = rec.get("suite") or {}
    model = info.get("model")
    if isinstance(model, dict):
        return model.get("name"), model.get("quick_gelu")
    m = re.match(r"open_clip (\S+) \((QuickGELU|GELU)\)", str(info.get("backbone", "")))  # records before "model"
    if m and m.group(1) != "custom":
        return re.sub(r"-quickgelu$", "", m.group(1)), m.group(2) == "QuickGELU"
    return None, None


def published(model: str | None, tasks, quick_gelu: bool | None = True) -> list[dict]:
    """Published averages for runs of ``model`` (an open_clip architecture such as ``ViT-B-32``) over ``tasks``.

    They apply only to the backbone and task set they were measured on (OpenAI's QuickGELU weights, the eight
    tasks): whatever the suite or manifest is called, a GELU backbone or another task set gets none."""
    ref = reference_results()
    if not model or not ref:
        return []
    if set(tasks or ()) != set(ref.get("tasks", ())) or bool(quick_gelu) != (ref.get("activation") == "quick_gelu"):
        return []
    return ref.get("backbones", {}).get(model, [])


def published_references(records: list[dict]):
    """The published numbers beside a leaderboard's main table, whose rows are ``records``: they must all come
    from one model (and the published task set, which ``published`` checks)."""
    models = {record_model(r) for r in records}
    if len(models) != 1 or any((r.get("suite") or {}).get("data_complete") is False for r in records):
        return None  # rows run on data that differ from the cards are never shown beside published numbers
    (model, quick_gelu), = models
    tasks = next(iter(records))["suite"].get("tasks") or list(next(iter(records))["metrics"]["accuracy"])
    rows = published(model, tasks, quick_gelu)
    if not rows:
        return None
    return References(
        f"Published numbers ({model}, task-vectors protocol)",
        "From `datasets/reference_results.yaml`; Measured Avg is the best row of that method in the main table "
        "(the same backbone and the same eight tasks). Verified = checked against the cited paper.", rows)


@register_suite(builds=False, results="real-*", sanity=MergingSanity(), references=published_references, flags={
    "manifest": "the model-zoo manifest (YAML) of backbone and experts",
    "data_root": "the folder holding the datasets (see `mergebench data check`)",
    "trust_pickle": "read pickled checkpoints (task-vectors format) with a restricted unpickler (tensor data only, "
                    "model classes as inert placeholders; docs/reliability.md); converted once to safetensors",
    "tasks": "comma-separated subset of tasks (default: every expert)"})
def real(manifest: str | None = None, data_root: str | None = None, tasks: list[str] | None = None,
         trust_pickle: bool = False, build: bool = True, verbose: bool = True) -> Suite:
    """the published benchmark (open_clip ViT-B/32, B/16, L/14 on the eight datasets) from your files: --manifest, --data-root"""
    return load_real(manifest, data_root, tasks=tasks, trust_pickle=trust_pickle, verbose=verbose)
