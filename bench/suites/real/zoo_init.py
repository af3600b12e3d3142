"""Writing a model-zoo manifest from the files a user has: ``mergebench zoo init`` and ``mergebench zoo hash``.

``init_folder(DIR)`` scans a folder of checkpoints: each file (``.safetensors``, ``.pt``, ``.pth``, ``.bin``,
``.ckpt``) or model folder (a Hugging Face ``config.json`` folder, a PEFT ``adapter_config.json`` folder) is a
candidate; its task comes from its name (the nearest path component naming one of the dataset cards or their
aliases: ``finetuned/SUN397.safetensors``, ``task_vectors/DTD/finetuned.pt``, ``clip-vit-base-patch32_stanford-cars``),
its format from its content (read without running any pickled code); the backbone is the one full CLIP (image
and text towers) that names no task (or whose name says zeroshot / pretrained / backbone / openai). The
architecture is matched against open_clip's model configs by tensor shapes (``--model`` / ``--model-config`` to
say it), the activation is read from the backbone file when it says (never guessed). Every file's sha256 is computed
as the manifest expects it (``sha256_of``) and the manifest is written and loaded back.

``init_hf_cache(DIR)`` does the same for a Hugging Face cache (``models--org--name/snapshots/<commit>/``):
the backbones ``openai/clip-vit-{base-patch32,base-patch16,large-patch14}`` and, for each, the experts named
``<org>/<backbone>_<task>`` (fusion_bench's ``tanganke/clip-vit-base-patch32_<task>``).
"""

from __future__ import annotations

import json
import mmap
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import open_clip
import yaml

from mergebench.errors import MergebenchError, MissingFileError
from mergebench.suites import checkpoints
from mergebench.suites.real import cards as cardlib
from mergebench.suites.real import zoo
from mergebench.engine.io import atomic_write_text
from mergebench.suites.checkpoints import hf_cache

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
# a file whose name says this is a pretrained model, never a task's expert (task_vectors keeps <Task>/zeroshot.pt)
BACKBONE_WORDS = ("zeroshot", "zero_shot", "pretrained", "backbone", "openai", "base_model")
HF_BACKBONES = {"openai/clip-vit-base-patch32": "ViT-B-32", "openai/clip-vit-base-patch16": "ViT-B-16",
                "openai/clip-vit-large-patch14": "ViT-L-14", "openai/clip-vit-large-patch14-336": "ViT-L-14-336"}
# modules of a plain state-dict pickle; a pickle naming any other class is a pickled model (task_vectors)
_PLAIN_PICKLE = ("torch", "collections", "builtins", "_codecs", "copyreg", "numpy")


class InitError(MergebenchError, ValueError):
    """The folder does not say enough to write a manifest; the message says what to pass."""


@dataclass
class Candidate:
    path: Path
    format: str
    task: str | None        # card name, from the file name
    text_tower: bool        # a full CLIP (usable as the backbone)
    backbone_named: bool    # its name says zeroshot / pretrained / backbone / openai


# ------------------------------------------------------------------ what a file is
def _norm(text: str) -> str:
    return re.sub(r"[\s\-.]+", "_", text.lower())


def task_of(rel: Path, all_cards: dict) -> str | None:
    """The card named by the nearest path component of ``rel`` (file name first), or None."""
    keys = {card.name: {_norm(n) for n in [card.name, *card.aliases]} for card in all_cards.values()}
    for part in reversed(rel.parts):
        text = _norm(Path(part).stem if part == rel.name else part)
        hits = {name for name, ks in keys.items() if any(re.search(rf"(?<![a-z0-9]){re.escape(k)}(?![a-z0-9])", text)
                                                        for k in ks)}
        if len(hits) > 1:
            raise InitError(f"{rel}: the name {part!r} matches several tasks ({', '.join(sorted(hits))}); rename it or "
                            f"write the manifest's experts by hand (docs/manifest.md)")
        if hits:
            return hits.pop()
    return None


def _mentions(path: Path, needle: bytes) -> bool:
    """Whether a file (or an HF/PEFT folder's weight files) contains ``needle``: key names are stored as text in
    safetensors headers, pickles and TorchScript code, so this reads no object."""
    files = [path] if path.is_file() else [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin")]
    for f in files:
        if f.stat().st_size == 0:
            continue
        with open(f, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
            if m.find(needle) != -1:
                return True
    return False


def guess_format(path: Path) -> str:
    """``zoo``'s format guess, plus pickled models (a torch zip whose pickle names classes beyond torch's)."""
    fmt = checkpoints.guess_format(path)
    if fmt == "torch" and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            pkl = [n for n in z.namelist() if n.endswith("data.pkl")]
            names = checkpoints.pickle_globals(z.read(pkl[0])).split() if pkl else []
        if any(n.split(".")[0] not in _PLAIN_PICKLE for n in names):
            return "task_vectors_pickle"
    return fmt


def has_text_tower(path: Path, fmt: str) -> bool:
    if fmt == "peft_lora":
        return False
    if fmt == "hf":
        cfg = json.loads((path / "config.json").read_text())
        return "text_config" in cfg or cfg.get("model_type") == "clip"
    return _mentions(path, b"token_embedding")


def scan_folder(folder: Path, all_cards: dict) -> list[Candidate]:
    out = []

    def visit(directory: Path):
        for p in sorted(directory.iterdir()):
            if p.name.startswith("."):
                continue
            if p.is_dir():
                if (p / "config.json").exists() or (p / "adapter_config.json").exists():
                    out.append(p)  # a model folder: one checkpoint
                else:
                    visit(p)
            elif p.suffix.lower() in CHECKPOINT_SUFFIXES:
                out.append(p)

    visit(folder)
    candidates = []
    for p in out:
        fmt = guess_format(p)
        rel = p.relative_to(folder)
        named = any(w in _norm(p.stem if p.is_file() else p.name) for w in BACKBONE_WORDS)
        task = None if named else task_of(rel, all_cards)
        # only a file that names no task can be the backbone: the others are not read beyond their format
        candidates.append(Candidate(p, fmt, task, task is None and has_text_tower(p, fmt), named))
    return candidates


# ------------------------------------------------------------------ which architecture
def _signature(cfg: dict) -> dict:
    """The shape-relevant fields of an open_clip CLIP config (with open_clip's defaults filled in)."""
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    return {"embed_dim": cfg["embed_dim"], "image_size": v["image_size"], "patch_size": v["patch_size"],
            "width": v["width"], "layers": v["layers"], "mlp_ratio": float(v.get("mlp_ratio", 4.0)),
            "context_length": t.get("context_length", 77), "vocab_size": t.get("vocab_size", 49408),
            "text_width": t.get("width", 512), "text_layers": t.get("layers", 12),
            "text_mlp_ratio": float(t.get("mlp_ratio", 4.0))}


def _heads(cfg: dict) -> tuple[int, int]:
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    return v["width"] // v.get("head_width", 64), t.get("heads", 8)


def signature_of_state(shapes: dict[str, tuple]) -> dict:
    """The same fields read off a full CLIP state dict's tensor shapes (open_clip keys)."""
    def count(prefix):
        return len({k[len(prefix):].split(".")[0] for k in shapes if k.startswith(prefix)})
    try:
        width, _, patch, _ = shapes["visual.conv1.weight"]
        grid = round((shapes["visual.positional_embedding"][0] - 1) ** 0.5)
        vocab, text_width = shapes["token_embedding.weight"]
        return {"embed_dim": shapes["visual.proj"][1], "image_size": grid * patch, "patch_size": patch, "width": width,
                "layers": count("visual.transformer.resblocks."),
                "mlp_ratio": shapes["visual.transformer.resblocks.0.mlp.c_fc.weight"][0] / width,
                "context_length": shapes["positional_embedding"][0], "vocab_size": vocab, "text_width": text_width,
                "text_layers": count("transformer.resblocks."),
                "text_mlp_ratio": shapes["transformer.resblocks.0.mlp.c_fc.weight"][0] / text_width}
    except KeyError as e:
        raise InitError(f"the backbone has no tensor {e.args[0]!r}: not an open_clip CLIP image+text model") from None


def matching_models(signature: dict, heads: tuple[int, int] | None = None) -> list[str]:
    """open_clip model config names whose architecture has these shapes (and heads, when known), best first."""
    found = []
    for name in open_clip.list_models():
        cfg = open_clip.get_model_config(name)
        if not cfg or "vision_cfg" not in cfg or "text_cfg" not in cfg:
            continue
        if any(cfg["vision_cfg"].get(k) for k in ("timm_model_name",)) or cfg["text_cfg"].get("hf_model_name"):
            continue
        try:
            zoo.encoder_config({**cfg, "quick_gelu": False})
        except (ValueError, KeyError):  # an image tower mergebench's encoder does not build
            continue
        if _signature(cfg) == signature and (heads is None or _heads(cfg) == heads):
            found.append(name)
    # one name per architecture: -quickgelu twins last (the activation is written separately), shorter names first
    return sorted(found, key=lambda n: (n.endswith("-quickgelu"), len(n), n))


def config_from_hf(cfg: dict) -> tuple[dict, bool | None]:
    """(open_clip CLIP config, QuickGELU?) of a Hugging Face ``CLIPModel`` config.json."""
    v, t = cfg["vision_config"], cfg["text_config"]
    clip = {"embed_dim": cfg.get("projection_dim", 512),
            "vision_cfg": {"image_size": v["image_size"], "patch_size": v["patch_size"], "width": v["hidden_size"],
                           "layers": v["num_hidden_layers"], "head_width": v["hidden_size"] // v["num_attention_heads"],
                           "mlp_ratio": v["intermediate_size"] / v["hidden_size"]},
            "text_cfg": {"context_length": t.get("max_position_embeddings", 77), "vocab_size": t.get("vocab_size", 49408),
                         "width": t["hidden_size"], "heads": t["num_attention_heads"], "layers": t["num_hidden_layers"],
                         "mlp_ratio": t["intermediate_size"] / t["hidden_size"]}}
    act = {"quick_gelu": True, "gelu": False}.get(v.get("hidden_act"))
    return clip, act


def _model_of(backbone: Candidate, model: str | None, model_config: dict | None, trust_pickle: bool):
    """(model name or None, model_config or None, how it was decided)."""
    if model or model_config:
        return model, model_config, "given"
    if backbone.format == "hf":
        cfg, _ = config_from_hf(json.loads((backbone.path / "config.json").read_text()))
        names = matching_models(_signature(cfg), _heads(cfg))
        if names:
            return names[0], None, f"the HF config matches open_clip {names[0]}"
        return None, cfg, "from the HF config (no open_clip config has this architecture)"
    state = checkpoints.read_state_dict(backbone.path, backbone.format, trust_pickle)
    shapes = {checkpoints.strip_wrappers(k): tuple(v.shape) for k, v in state.items()}
    names = matching_models(signature_of_state(shapes))
    if not names:
        raise InitError(f"the backbone {backbone.path} matches no open_clip model config by its tensor shapes; pass "
                        f"--model NAME (an open_clip config) or --model-config FILE.json (open_clip.CLIP arguments)")
    return names[0], None, f"its tensor shapes match open_clip {names[0]}"


# ------------------------------------------------------------------ writing
def _rel(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path.resolve())


def _activation(backbone: Candidate, model: str | None, model_config: dict | None, quick_gelu: bool | None):
    said = {}
    if quick_gelu is not None:
        said["--quick-gelu/--gelu"] = quick_gelu
    if model and model.endswith("-quickgelu"):
        said[model] = True
    if model_config and "quick_gelu" in model_config:
        said["model_config"] = bool(model_config["quick_gelu"])
    from_file = checkpoints.checkpoint_activation(backbone.path, backbone.format)
    if from_file is not None:
        said[backbone.path.name] = from_file
    if len(set(said.values())) > 1:
        raise InitError("the backbone's activation is ambiguous: " + ", ".join(
            f"{k} says {'QuickGELU' if v else 'GELU'}" for k, v in said.items()))
    return next(iter(said.values()), None), ", ".join(said)


def write_manifest(out: Path, backbone: Candidate, experts: dict[str, Candidate], model, model_config, quick_gelu,
                   how: list[str], data_root: Path | None = None, name: str | None = None) -> tuple[Path, list[str]]:
    """Hash every file, write the manifest YAML (with comments saying what was inferred from what) and load it back.
    Returns (path, messages); a message starting with 'INCOMPLETE' means a field still has to be written."""
    out = Path(out)
    base = out.parent
    messages = []
    qg, qg_from = _activation(backbone, model, model_config, quick_gelu)
    raw: dict = {}
    if name:
        raw["name"] = name
    if model:
        raw["model"] = model
    if model_config:
        raw["model_config"] = {k: v for k, v in model_config.items() if k != "quick_gelu"}
    raw["quick_gelu"] = qg
    raw["backbone"] = {"path": _rel(backbone.path, base), "sha256": checkpoints.sha256_of(backbone.path),
                       "format": backbone.format}
    raw["experts"] = {}
    for task in [t for t in cardlib.REAL_TASKS if t in experts] + sorted(t for t in experts if t not in cardlib.REAL_TASKS):
        c = experts[task]
        raw["experts"][task] = {"path": _rel(c.path, base), "sha256": checkpoints.sha256_of(c.path), "format": c.format}
    if data_root is not None:
        raw["data_root"] = _rel(Path(data_root), base)
    header = ["# model-zoo manifest written by `mergebench zoo init` (fields: docs/manifest.md)"] + \
        [f"# {line}" for line in how]
    if qg is None:
        header.append("# quick_gelu: FILL IN: true for OpenAI's CLIP weights (the task-vectors and fusion_bench experts "
                      "are fine-tuned from them), false for GELU weights (LAION, DataComp)")
        messages.append(f"INCOMPLETE: {out}: the backbone file does not say which activation it uses; set quick_gelu: "
                        f"true (OpenAI weights) or false (GELU weights), or rerun with --quick-gelu / --gelu")
    else:
        header.append(f"# quick_gelu: from {qg_from}")
    text = "\n".join(header) + "\n" + yaml.safe_dump(raw, sort_keys=False, width=120)
    atomic_write_text(out, text)
    m = zoo.Manifest.load(out)  # what `run` will read: it must load (and, when complete, resolve the model)
    if qg is not None:
        zoo.encoder_config(m.clip_config())
    missing = [t for t in cardlib.REAL_TASKS if t not in experts]
    if missing:
        messages.append(f"no expert found for {', '.join(missing)} (runs use the tasks that have one)")
    return out, messages


def init_folder(folder, out=None, model: str | None = None, model_config: dict | None = None,
                backbone: str | os.PathLike | None = None, quick_gelu: bool | None = None, data_root=None,
                trust_pickle: bool = False, name: str | None = None) -> tuple[Path, list[str]]:
    """Scan ``folder`` and write its manifest (default ``folder/manifest.yaml``, paths relative to it)."""
    folder = Path(folder)
    if not folder.exists():
        raise InitError(f"{folder} does not exist: give the folder that holds the backbone and expert checkpoints "
                        f"(or --hf-cache DIR for a Hugging Face cache)")
    if not folder.is_dir():
        raise InitError(f"{folder} is not a folder: give the folder that holds the checkpoints, not a file")
    out = Path(out) if out else folder / "manifest.yaml"
    all_cards = cardlib.load_cards()
    cands = scan_folder(folder, all_cards)
    if not cands:
        raise InitError(f"no checkpoints in {folder} (files {', '.join(CHECKPOINT_SUFFIXES)}, HF or PEFT folders)")
    if backbone is not None:
        bpath = Path(backbone) if Path(backbone).is_absolute() else (Path.cwd() / backbone)
        chosen = next((c for c in cands if c.path.resolve() == bpath.resolve()), None)
        if chosen is None:
            fmt = guess_format(bpath)
            chosen = Candidate(bpath, fmt, None, has_text_tower(bpath, fmt), True)
    else:
        # task-vectors pickles (zeroshot.pt too) hold the image encoder only: never the backbone
        full = [c for c in cands if c.text_tower and (c.task is None or c.backbone_named)
                and c.format != "task_vectors_pickle"]
        named = [c for c in full if c.backbone_named]
        pick = named if len(named) == 1 else full
        if len(pick) != 1:
            listed = ", ".join(str(c.path.relative_to(folder)) for c in (pick or cands))
            raise InitError(f"{folder}: {'several' if pick else 'no'} full CLIP checkpoints (image and text towers; the "
                            f"text tower makes the zero-shot heads) that name no task: {listed}; pass --backbone FILE")
        chosen = pick[0]
    experts: dict[str, Candidate] = {}
    for c in cands:
        if c.task is None or c.path == chosen.path or c.backbone_named:
            continue
        if c.task in experts:
            raise InitError(f"two checkpoints for {c.task}: {experts[c.task].path} and {c.path}; keep one (or write "
                            f"the manifest's experts by hand, docs/manifest.md)")
        experts[c.task] = c
    if not experts:
        raise InitError(f"{folder}: no checkpoint names a task ({', '.join(cardlib.REAL_TASKS)} or their aliases)")
    model, model_config, how_model = _model_of(chosen, model, model_config, trust_pickle)
    how = [f"backbone: {_rel(chosen.path, out.parent)} ({chosen.format}); architecture: {how_model}",
           "experts: task from each file's name, format from its content"]
    return write_manifest(out, chosen, experts, model, model_config, quick_gelu, how, data_root, name)


def init_hf_cache(cache, out=None, model: str | None = None, quick_gelu: bool | None = None, data_root=None,
                  name: str | None = None) -> list[tuple[Path, list[str]]]:
    """One manifest per backbone in the HF cache that has experts (``--model`` picks one): default
    ``./<model>.yaml`` (lower case); paths are absolute (the cache's snapshot folders)."""
    all_cards = cardlib.load_cards()
    if not Path(cache).is_dir():
        raise InitError(f"{cache} does not exist (or is not a folder): give the Hugging Face home (~/.cache/huggingface)"
                        f" or its hub/ folder")
    repos = hf_cache.list_repos(cache, "model")
    if not repos:
        raise InitError(f"{cache}: no Hugging Face model repositories (models--ORG--NAME/) here, in {cache}/hub or "
                        f"{cache}/huggingface/hub")
    backbones = {r: m for r, m in HF_BACKBONES.items() if r in repos}
    if model:
        backbones = {r: m for r, m in backbones.items() if m == model or r == model}
    if not backbones:
        raise InitError(f"{cache}: none of the backbones {', '.join(HF_BACKBONES)} is cached"
                        + (f" for --model {model}" if model else ""))
    written = []
    for repo, arch in backbones.items():
        stem = repo.split("/", 1)[1]
        found: dict[str, list[str]] = {}
        for other in repos:
            suffix = other.split("/", 1)[1]
            task = task_of(Path(suffix[len(stem) + 1:]), all_cards) if suffix.startswith(stem + "_") else None
            if task is not None:
                found.setdefault(task, []).append(other)
        experts: dict[str, Candidate] = {}
        chosen_ids = []
        for task, ids in found.items():
            if len(ids) > 1:  # the same task from several organisations: fusion_bench's, else ask
                ids = [i for i in ids if i.startswith("tanganke/")] or ids
            if len(ids) > 1:
                raise InitError(f"several experts for {task} in {cache}: {', '.join(ids)}; remove all but one")
            experts[task] = Candidate(hf_cache.snapshot(repos[ids[0]]), "hf", task, False, False)
            chosen_ids.append(ids[0])
        if not experts:
            continue
        snap = hf_cache.snapshot(repos[repo])
        backbone = Candidate(snap, "hf", None, True, True)
        mdl, mcfg, how_model = _model_of(backbone, None, None, False)
        if out and not (Path(out).is_dir() or str(out).endswith(("/", os.sep))) and len(backbones) == 1:
            target = Path(out)
        else:
            target = (Path(out) if out else Path.cwd()) / f"{arch.lower()}.yaml"
        how = [f"Hugging Face cache {Path(cache).resolve()}: backbone {repo} (snapshot {snap.name}); architecture: "
               f"{how_model}", f"experts: {', '.join(sorted(chosen_ids))}"]
        written.append(write_manifest(target, backbone, experts, mdl, mcfg, quick_gelu, how, data_root, name))
    if not written:
        raise InitError(f"{cache}: no experts named {' or '.join(r.split('/')[1] + '_<task>' for r in backbones)} "
                        f"(fusion_bench's tanganke/clip-vit-base-patch32_<task>)")
    return written


def describe_hash(path) -> str:
    """``zoo hash``: the sha256 a manifest entry expects for ``path``, and how it is made for a folder."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{path} does not exist")
    digest = checkpoints.sha256_of(path)
    if path.is_dir():
        n = sum(1 for p in path.rglob("*") if p.is_file())
        return f"{digest}  {path}  (folder: sha256 over its {n} files' relative paths and sha256s, docs/manifest.md)"
    return f"{digest}  {path}"


def init(path=None, hf_cache=None, out=None, model: str | None = None, model_config=None,
         backbone: str | os.PathLike | None = None, quick_gelu: bool | None = None, data_root=None,
         trust_pickle: bool = False, name: str | None = None) -> list[tuple[Path, list[str]]]:
    """``zoo init``: the manifests written (path, messages) from a folder of checkpoints (``path``, ``init_folder``)
    or a Hugging Face cache (``hf_cache``, ``init_hf_cache``), one of the two; ``model_config`` is a JSON file of
    ``open_clip.CLIP`` arguments. A message starting with INCOMPLETE names a field the user must fill in."""
    if (path is None) == (hf_cache is None):
        raise InitError("zoo init takes a folder (zoo init DIR) or --hf-cache DIR")
    if hf_cache is not None:
        return init_hf_cache(hf_cache, out, model, quick_gelu, data_root, name)
    config = json.loads(Path(model_config).read_text()) if model_config else None
    return [init_folder(path, out, model, config, backbone, quick_gelu, data_root, trust_pickle, name)]
