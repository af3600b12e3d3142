"""The model zoo manifest: backbone and expert files with their sha256, and how to read each.

A manifest (YAML) names an open_clip architecture and local files::

    model: ViT-B-32               # an open_clip model config name (read from the installed package)
    quick_gelu: true              # OpenAI weights use QuickGELU; never guessed (see ``Manifest.clip_config``)
    backbone:                     # the full CLIP (image and text towers: the text tower makes the heads)
      path: ViT-B-32.pt           # relative to the manifest's folder
      sha256: 1a2b...             # checked; a mismatch is an error naming the file
    experts:
      SUN397: {path: finetuned/SUN397.safetensors, sha256: ...}
      Cars:   {path: hf/cars, format: hf}                       # a CLIPVisionModel folder
      DTD:    {path: task_vectors/DTD/finetuned.pt, format: task_vectors_pickle}

``format`` (default ``auto``, guessed from the path) is one of :data:`mergebench.suites.checkpoints.FORMATS`; the
files are read there, pickled ones only with ``trust_pickle=True`` and through its restricted unpickler. A
``peft_lora`` expert (a PEFT adapter folder) is the backbone's image tower plus ``scale * B @ A``
(``mergebench.api.lora``). Nothing is ever downloaded.
Every field is described in docs/manifest.md; ``mergebench zoo init`` writes a manifest from a folder or a
Hugging Face cache (``mergebench.suites.real.zoo_init``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import yaml
from torch import Tensor

from mergebench.errors import InputError, MissingFileError, NotFoundError
from mergebench.engine.io import safe_name
from mergebench.api.lora import LoraError, apply_lora, read_peft
from mergebench.suites.checkpoints import (
    FORMATS, CheckpointError, checkpoint_activation, guess_format, read_state_dict, sha256_of, strip_wrappers,
    visual_state,
)


class ManifestError(InputError):
    """A model-zoo manifest is not valid (the message names the file and the field)."""


@dataclass
class Entry:
    path: Path
    sha256: str | None = None
    format: str = "auto"


@dataclass
class Manifest:
    path: Path
    model: str | None
    model_config: dict | None
    quick_gelu: bool | None       # None: taken from the model name or the backbone file, else an error
    backbone: Entry
    experts: dict[str, Entry]
    name: str
    data_root: Path | None = None
    raw: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Manifest":
        path = Path(path)
        if not path.exists():
            raise MissingFileError(f"manifest {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ManifestError(f"manifest {path} is not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ManifestError(f"manifest {path} is a YAML {type(raw).__name__}, not a mapping: write 'model:', "
                                f"'backbone:' and 'experts:' at its top level (docs/manifest.md; `mergebench zoo init` "
                                f"writes one)")
        base = path.parent

        def entry(value, what) -> Entry:
            if isinstance(value, str):
                value = {"path": value}
            if not isinstance(value, dict) or "path" not in value:
                raise ManifestError(f"manifest {path}: {what} needs a 'path'")
            fmt = value.get("format", "auto")
            if fmt not in FORMATS:
                raise ManifestError(f"manifest {path}: {what} has format {fmt!r}; formats: {', '.join(FORMATS)}")
            p = Path(os.path.expanduser(str(value["path"])))
            return Entry(p if p.is_absolute() else base / p, value.get("sha256"), fmt)

        if not raw.get("model") and not raw.get("model_config"):
            raise ManifestError(f"manifest {path}: give 'model' (an open_clip name such as ViT-B-32) or 'model_config'")
        if "backbone" not in raw:
            raise ManifestError(f"manifest {path}: no 'backbone' entry")
        experts = raw.get("experts") or {}
        if not experts:
            raise ManifestError(f"manifest {path}: no 'experts'")
        if not isinstance(experts, dict):
            raise ManifestError(f"manifest {path}: 'experts' is a {type(experts).__name__}; write one 'TASK: path' "
                                f"line per expert under it (docs/manifest.md)")
        data_root = raw.get("data_root")
        quick_gelu = raw.get("quick_gelu")
        if quick_gelu is not None and not isinstance(quick_gelu, bool):
            raise ManifestError(f"manifest {path}: quick_gelu is {quick_gelu!r}; write true (OpenAI's weights) or "
                                f"false (GELU weights such as LAION's)")
        name = str(raw.get("name") or raw.get("model") or "custom")
        try:  # it names the results folder results/real-NAME/
            safe_name(name, "name")
        except InputError as e:
            raise ManifestError(f"manifest {path}: {e}") from None
        return cls(path=path, model=raw.get("model"), model_config=raw.get("model_config"),
                   quick_gelu=quick_gelu, backbone=entry(raw["backbone"], "backbone"),
                   experts={str(t): entry(v, f"expert {t!r}") for t, v in experts.items()},
                   name=name,
                   data_root=(base / Path(os.path.expanduser(str(data_root)))) if data_root else None, raw=raw)

    def clip_config(self) -> dict:
        """``open_clip.CLIP`` keyword arguments (embed_dim, vision_cfg, text_cfg, quick_gelu).

        The activation is never guessed: it comes from the manifest's ``quick_gelu``, from the model
        (``ViT-B-32-quickgelu``, or a ``model_config`` that says ``quick_gelu``) or from the backbone file (an HF
        config's ``hidden_act``, the modules named in a TorchScript or pickled model). Sources that disagree, or
        none at all, are an error that says what to write in the manifest."""
        if self.model_config:
            cfg = json.loads(json.dumps(self.model_config))
            said = {"model_config": cfg["quick_gelu"]} if "quick_gelu" in cfg else {}
        else:
            cfg = open_clip.get_model_config(self.model)
            if cfg is None:
                raise ManifestError(f"manifest {self.path}: open_clip has no model config {self.model!r}")
            cfg = json.loads(json.dumps(cfg))
            # a -quickgelu name settles it; a plain name does not (open_clip forces QuickGELU for OpenAI weights)
            said = {f"model {self.model}": True} if cfg.get("quick_gelu") else {}
        if self.quick_gelu is not None:
            said["quick_gelu"] = self.quick_gelu
        from_file = checkpoint_activation(self.backbone.path, self.backbone.format)
        if from_file is not None:
            said[f"backbone {self.backbone.path.name}"] = from_file
        if len(set(said.values())) > 1:
            raise ManifestError(f"manifest {self.path}: the backbone's activation is ambiguous: " +
                                ", ".join(f"{k} says {'QuickGELU' if v else 'GELU'}" for k, v in said.items()) +
                                "; make them agree (quick_gelu: true for OpenAI's weights, false for GELU weights)")
        if not said:
            arch = self.model or "model_config"
            raise ManifestError(
                f"manifest {self.path}: cannot tell whether the backbone {self.backbone.path} uses QuickGELU (OpenAI's "
                f"CLIP weights, from which the task-vectors and fusion_bench experts are fine-tuned) or GELU (LAION, "
                f"DataComp weights): {arch} exists with both and the file does not say. Add `quick_gelu: true` or "
                f"`quick_gelu: false` to the manifest" + (f" (or write model: {self.model}-quickgelu)"
                                                          if self.model else ""))
        cfg["quick_gelu"] = next(iter(said.values()))
        return cfg

    def model_info(self) -> dict:
        """What the record says about the architecture: open_clip name without the -quickgelu suffix (None for a
        model_config), the name as written, and the activation."""
        name = self.model[: -len("-quickgelu")] if self.model and self.model.endswith("-quickgelu") else self.model
        return {"name": name, "open_clip": self.model, "quick_gelu": self.clip_config()["quick_gelu"]}


def verify(entry: Entry, what: str) -> str:
    if not entry.path.exists():
        raise CheckpointError(f"{what}: file {entry.path} does not exist")
    digest = sha256_of(entry.path)
    if entry.sha256 and entry.sha256.lower() != digest:
        raise CheckpointError(f"{what}: sha256 mismatch for {entry.path}: the manifest says {entry.sha256}, "
                              f"the file has {digest} (corrupt or a different checkpoint)")
    return digest


def check_fits(state: dict[str, Tensor], reference: dict[str, Tensor], source: str, allow_missing=()) -> None:
    """Missing key, unexpected key or wrong shape -> CheckpointError naming the file and the key."""
    for key, ref in reference.items():
        if key not in state:
            if key in allow_missing:
                continue
            raise CheckpointError(f"{source}: missing key {key!r} (expected shape {tuple(ref.shape)})")
        if tuple(state[key].shape) != tuple(ref.shape):
            raise CheckpointError(f"{source}: key {key!r} has shape {tuple(state[key].shape)}, the model expects "
                                  f"{tuple(ref.shape)} (a checkpoint of another architecture?)")
    extra = sorted(set(state) - set(reference))
    if extra:
        raise CheckpointError(f"{source}: unexpected key {extra[0]!r} ({len(extra)} unexpected in all) for this model")


# ------------------------------------------------------------------ models
def encoder_config(clip_cfg: dict) -> dict:
    """``build_encoder`` config of the image tower of an open_clip CLIP config."""
    v = dict(clip_cfg["vision_cfg"])
    unsupported = {k: v[k] for k in ("ls_init_value", "attentional_pool", "no_ln_pre", "final_ln_after_pool",
                                     "output_tokens", "timm_model_name") if v.get(k)}
    if v.get("pool_type", "tok") != "tok" or unsupported:
        raise ManifestError(f"image tower options not supported by mergebench's encoder: "
                            f"{unsupported or v.get('pool_type')}")
    if not isinstance(v.get("layers"), int):
        raise ManifestError(f"image tower layers must be an int, got {v.get('layers')!r}")
    width = v["width"]
    return {"image_size": v["image_size"], "patch_size": v["patch_size"], "width": width, "layers": v["layers"],
            "heads": width // v.get("head_width", 64), "mlp_ratio": v.get("mlp_ratio", 4.0),
            "output_dim": clip_cfg["embed_dim"], "act": "quick_gelu" if clip_cfg.get("quick_gelu") else "gelu"}


def build_clip(manifest: Manifest, trust_pickle: bool = False):
    """The full open_clip CLIP of the manifest holding its backbone file (strict), and the file's sha256."""
    digest = verify(manifest.backbone, "backbone")
    cfg = manifest.clip_config()
    model = open_clip.CLIP(**cfg)
    state = {strip_wrappers(k): v for k, v in read_state_dict(manifest.backbone.path, manifest.backbone.format, trust_pickle).items()}
    reference = model.state_dict()
    check_fits(state, reference, f"backbone {manifest.backbone.path}")
    model.load_state_dict({k: v.to(reference[k].dtype) for k, v in state.items()})
    return model.eval(), digest


def load_expert(manifest: Manifest, task: str, reference: dict[str, Tensor], pretrained: dict[str, Tensor],
                trust_pickle: bool = False) -> tuple[dict[str, Tensor], str, list[str]]:
    """(image-tower weights, sha256, notes) of the expert of ``task``, checked against ``reference`` shapes."""
    if task not in manifest.experts:
        raise NotFoundError(f"manifest {manifest.path} has no expert for task {task!r} (it has "
                            f"{', '.join(manifest.experts)})")
    entry = manifest.experts[task]
    digest = verify(entry, f"expert {task}")
    fmt = guess_format(entry.path) if entry.format == "auto" else entry.format
    if fmt == "peft_lora":
        state = apply_lora({k: v.float() for k, v in pretrained.items()}, load_lora_factors(manifest, task, reference))
        return dict(state), digest, []
    state = visual_state(read_state_dict(entry.path, fmt, trust_pickle))
    notes = []
    allow = ("proj",) if fmt == "hf" else ()
    check_fits(state, reference, f"expert {task} ({entry.path})", allow_missing=allow)
    if "proj" not in state:  # a plain CLIPVisionModel has no projection: the backbone's is used
        state["proj"] = pretrained["proj"].clone()
        notes.append(f"{task}: {entry.path} has no visual projection; the backbone's proj is used")
    return {k: v.float() for k, v in state.items()}, digest, notes


def is_lora(entry: Entry) -> bool:
    return (guess_format(entry.path) if entry.format == "auto" else entry.format) == "peft_lora"


def load_lora_factors(manifest: Manifest, task: str, reference: dict[str, Tensor]) -> dict:
    """The LoRA factors of ``task``'s PEFT adapter folder (``mergebench.api.lora.read_peft``), errors naming it."""
    entry = manifest.experts[task]
    if not is_lora(entry):
        raise CheckpointError(f"expert {task} ({entry.path}) is not a PEFT LoRA adapter folder")
    try:
        return read_peft(entry.path, reference)
    except LoraError as e:
        raise CheckpointError(f"expert {task}: {e}") from None
