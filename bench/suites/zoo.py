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

Formats (``format: auto`` guesses from the path): ``safetensors``; ``torch`` (a state dict read
with ``torch.load(weights_only=True)``, keys ``visual.*``, ``model.visual.*`` or bare
VisionTransformer keys); ``openai_jit`` (OpenAI's TorchScript archive, backbone only); ``hf`` (a
Hugging Face CLIP folder, keys mapped to open_clip); ``task_vectors_pickle`` (the task-vectors
repository's pickled ``ImageEncoder`` objects: only with ``trust_pickle=True``, read by a restricted
unpickler -- see ``_TrustedUnpickler`` for exactly what it allows -- and converted once to safetensors
in the cache); ``peft_lora`` (a PEFT LoRA adapter folder, ``adapter_config.json`` +
``adapter_model.safetensors``, open_clip or HF CLIP module names: the expert is the backbone's
image tower plus ``scale * B @ A``, see ``mergebench.api.lora``). Nothing is ever downloaded.
Every field is described in docs/manifest.md; ``mergebench zoo init`` writes a manifest from a folder or a
Hugging Face cache (``mergebench.suites.zoo_init``).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from torch import Tensor

from mergebench.errors import InputError, MergebenchError, MissingFileError, NotFoundError
from mergebench.engine.io import atomic_save_tensors, atomic_write_text, cache_root, file_sha256, safe_name

FORMATS = ("auto", "safetensors", "torch", "openai_jit", "hf", "task_vectors_pickle", "peft_lora")
_OPENAI_EXTRA = ("input_resolution", "context_length", "vocab_size")


class CheckpointError(MergebenchError, ValueError):
    """A checkpoint file is missing, corrupt, unsafe to read without consent, or does not fit the model."""


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
            import open_clip
            cfg = open_clip.get_model_config(self.model)
            if cfg is None:
                raise ManifestError(f"manifest {self.path}: open_clip has no model config {self.model!r}")
            cfg = json.loads(json.dumps(cfg))
            # a -quickgelu name settles it; a plain name does not (open_clip forces QuickGELU for OpenAI weights)
            said = {f"model {self.model}": True} if cfg.get("quick_gelu") else {}
        if self.quick_gelu is not None:
            said["quick_gelu"] = self.quick_gelu
        from_file = checkpoint_activation(self.backbone)
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


def checkpoint_activation(entry: Entry) -> bool | None:
    """QuickGELU (True) or GELU (False) as a backbone file states it, without running any of its code; None when the
    file does not say (plain state dicts, safetensors)."""
    path = entry.path
    if not path.exists():
        return None
    fmt = _guess_format(path) if entry.format == "auto" else entry.format
    if fmt == "hf":
        cfg_path = path / "config.json"
        if not cfg_path.exists():
            return None
        cfg = json.loads(cfg_path.read_text())
        act = (cfg.get("vision_config") or cfg).get("hidden_act")
        return {"quick_gelu": True, "gelu": False}.get(act)
    if zipfile.is_zipfile(path):  # TorchScript code or a pickle's class references name the activation module
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            code = [n for n in names if "/code/" in n and n.endswith(".py")]
            if code:
                text = "".join(z.read(n).decode("utf-8", "replace") for n in code)
            else:
                pkl = [n for n in names if n.endswith("data.pkl")]
                text = _pickle_globals(z.read(pkl[0])) if pkl else ""
        if "QuickGELU" in text:
            return True
        if re.search(r"\bGELU\b", text):
            return False
    return None


def _pickle_globals(data: bytes) -> str:
    """The ``module.name`` of every class a pickle references (read from its opcodes; nothing is unpickled)."""
    import pickletools

    out, strings = [], []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("GLOBAL", "INST"):
                out.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                out.append(f"{strings[-2]}.{strings[-1]}")
            if isinstance(arg, str):
                strings.append(arg)
    except Exception:  # noqa: BLE001 - a truncated or odd pickle says nothing about the activation
        pass
    return "\n".join(out)


# ------------------------------------------------------------------ hashing (cached by size and mtime)
def sha256_of(path: Path) -> str:
    import hashlib

    if path.is_dir():  # an HF folder: hash of its files' hashes
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f.relative_to(path).as_posix().encode() + b"\0" + sha256_of(f).encode())
        return h.hexdigest()
    st = path.stat()
    ident = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:24]
    memo = cache_root() / "real" / "sha256" / f"{ident}.json"
    if memo.exists():
        saved = json.loads(memo.read_text())
        if saved["path"] == str(path.resolve()) and saved["size"] == st.st_size and saved["mtime_ns"] == st.st_mtime_ns:
            return saved["sha256"]
    digest = file_sha256(path)
    atomic_write_text(memo, json.dumps({"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                        "sha256": digest}))
    return digest


def verify(entry: Entry, what: str) -> str:
    if not entry.path.exists():
        raise CheckpointError(f"{what}: file {entry.path} does not exist")
    digest = sha256_of(entry.path)
    if entry.sha256 and entry.sha256.lower() != digest:
        raise CheckpointError(f"{what}: sha256 mismatch for {entry.path}: the manifest says {entry.sha256}, "
                              f"the file has {digest} (corrupt or a different checkpoint)")
    return digest


# ------------------------------------------------------------------ reading files
def _guess_format(path: Path) -> str:
    if path.is_dir():
        return "peft_lora" if (path / "adapter_config.json").exists() else "hf"
    if path.suffix == ".safetensors":
        return "safetensors"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
            return "openai_jit"
    return "torch"


class _Opaque(torch.nn.Module):
    """Stands in for a model class of a trusted pickle (``_PLACEHOLDER_MODULES``): an empty ``nn.Module`` that keeps
    the attributes stored with it (its submodules, parameters and buffers, so ``state_dict()`` works) and runs none
    of the class's code: calling it, or building it from arguments, only makes another placeholder."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def __setstate__(self, state):
        if isinstance(state, dict):
            torch.nn.Module.__setstate__(self, state)


# What --trust-pickle lets a pickle name, exactly. (1) These globals are the real objects: the data
# constructors that rebuild tensors, parameters and their containers, and nothing else callable.
_STORAGES = ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool")
_DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")
_ALLOWED_GLOBALS = frozenset(
    {("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
     ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
     ("torch._utils", "_rebuild_parameter_with_state"), ("torch", "Size"), ("torch", "device"),
     ("torch.storage", "UntypedStorage"), ("torch.storage", "TypedStorage")}
    | {("torch", f"{kind}Storage") for kind in _STORAGES} | {("torch", dtype) for dtype in _DTYPES})
# (2) Any global of these modules becomes an inert placeholder (_Opaque): the task-vectors repository's classes
# (src.modeling.ImageEncoder), open_clip's and torch.nn's modules of any version, and the torchvision transforms
# the checkpoints keep as their preprocessing. Every other global is refused.
_PLACEHOLDER_MODULES = ("src", "open_clip", "torch.nn.modules", "torchvision.transforms")


class UnsafePickleError(pickle.UnpicklingError):
    """A trusted pickle asked for a global outside the allow-list."""

    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.module, self.name = module, name


class _TrustedUnpickler(pickle.Unpickler):
    """The unpickler of ``--trust-pickle``: real objects for ``_ALLOWED_GLOBALS``, placeholders for the model
    classes of ``_PLACEHOLDER_MODULES``, and :class:`UnsafePickleError` for any other global (``os.system``,
    ``builtins.exec``/``eval``/``getattr``/``__import__``, ``subprocess``, ``torch.load``, ...)."""

    def find_class(self, module, name):
        key = ("builtins" if module == "__builtin__" else module, name)  # protocol 2 names Python 2's module
        if key in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if any(module == m or module.startswith(m + ".") for m in _PLACEHOLDER_MODULES):
            return _Opaque
        raise UnsafePickleError(*key)


class _TrustedPickleModule:
    Unpickler = _TrustedUnpickler
    load = staticmethod(lambda f, **kw: _TrustedUnpickler(f, **kw).load())
    __name__ = "mergebench_trusted_pickle"


def trusted_torch_load(path: Path):
    """``torch.load`` of ``path`` through :class:`_TrustedUnpickler`; a refused global is a
    :class:`CheckpointError` naming the file and the global."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False, pickle_module=_TrustedPickleModule)
    except UnsafePickleError as e:
        raise CheckpointError(
            f"{path}: refused to unpickle the global {e.module}.{e.name}: --trust-pickle admits only tensor data "
            f"(torch's tensor and parameter rebuild functions, storages, dtypes, collections.OrderedDict, set) and "
            f"reads the model classes of {', '.join(m + '.*' for m in _PLACEHOLDER_MODULES)} as inert placeholders; "
            f"this file asks for something else, so it is not a task-vectors checkpoint, or it is a malicious one. "
            f"Convert it to safetensors where you trust its code, or replace it.") from None


def _as_state_dict(obj, path: Path) -> dict[str, Tensor]:
    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], (dict, torch.nn.Module)) and not isinstance(obj.get(key), Tensor):
                return _as_state_dict(obj[key], path)
        tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
        if tensors:
            return tensors
    raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict or a model")


def read_state_dict(path: Path, fmt: str = "auto", trust_pickle: bool = False) -> dict[str, Tensor]:
    """A file's tensors as stored (keys not yet mapped), never running untrusted pickle code."""
    fmt = _guess_format(path) if fmt == "auto" else fmt
    try:
        if fmt == "hf":  # a CLIPVisionModel (image tower) or a CLIPModel (both towers: usable as the backbone)
            from mergebench.suites.hf_convert import hf_text_to_open_clip, hf_to_open_clip, read_hf_folder
            raw = read_hf_folder(path, trust_pickle)
            return {**{f"visual.{k}": v for k, v in hf_to_open_clip(raw, str(path)).items()},
                    **hf_text_to_open_clip(raw, str(path))}
        if fmt == "safetensors":
            from safetensors.torch import load_file
            return load_file(path)
        if fmt == "openai_jit":
            return {k: v for k, v in torch.jit.load(str(path), map_location="cpu").state_dict().items()
                    if k not in _OPENAI_EXTRA and not k.endswith("attn_mask")}  # attn_mask: a non-persistent buffer
        if fmt == "task_vectors_pickle":
            return _converted_pickle(path, trust_pickle)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if trust_pickle:
                return _converted_pickle(path, trust_pickle)
            raise CheckpointError(
                f"{path} is a pickled Python object (e.g. the task-vectors repository's checkpoints), not a plain "
                f"state dict, so torch.load(weights_only=True) refuses it ({str(e).splitlines()[0][:160]}). If you "
                f"trust the file, pass --trust-pickle (trust_pickle=True): it is read once and converted to "
                f"safetensors in the cache.") from None
        return _as_state_dict(obj, path)
    except CheckpointError:
        raise
    except MergebenchError as e:  # ConversionError, LoraError: they name the file already
        raise CheckpointError(str(e)) from None
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, SafetensorError,
            pickle.UnpicklingError) as e:
        raise CheckpointError(f"{path}: cannot read it as {fmt} ({type(e).__name__}: {str(e)[:300]}); "
                              f"the file may be corrupt or truncated") from e


def _converted_pickle(path: Path, trust_pickle: bool) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    digest = sha256_of(path)
    out = cache_root() / "real" / "converted" / f"{digest}.safetensors"
    if out.exists():
        return load_file(out)
    if not trust_pickle:
        raise CheckpointError(f"{path} is a pickled checkpoint; reading it runs pickle, so it needs --trust-pickle "
                              f"(trust_pickle=True). It is then converted once to {out}.")
    obj = trusted_torch_load(path)
    state = {k: v.detach().clone() for k, v in _as_state_dict(obj, path).items() if isinstance(v, Tensor)}
    atomic_save_tensors(state, out)
    return state


def _strip(key: str) -> str:
    for prefix in ("module.", "model.", "image_encoder.", "clip_model."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def visual_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The image tower's tensors with open_clip VisionTransformer keys."""
    state = {_strip(k): v for k, v in state.items()}
    if any(k.startswith("visual.") for k in state):
        return {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    return state


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
    import open_clip

    digest = verify(manifest.backbone, "backbone")
    cfg = manifest.clip_config()
    model = open_clip.CLIP(**cfg)
    state = {_strip(k): v for k, v in read_state_dict(manifest.backbone.path, manifest.backbone.format, trust_pickle).items()}
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
    fmt = _guess_format(entry.path) if entry.format == "auto" else entry.format
    if fmt == "peft_lora":
        from mergebench.api.lora import apply_lora
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
    return (_guess_format(entry.path) if entry.format == "auto" else entry.format) == "peft_lora"


def load_lora_factors(manifest: Manifest, task: str, reference: dict[str, Tensor]) -> dict:
    """The LoRA factors of ``task``'s PEFT adapter folder (``mergebench.api.lora.read_peft``), errors naming it."""
    from mergebench.api.lora import LoraError, read_peft

    entry = manifest.experts[task]
    if not is_lora(entry):
        raise CheckpointError(f"expert {task} ({entry.path}) is not a PEFT LoRA adapter folder")
    try:
        return read_peft(entry.path, reference)
    except LoraError as e:
        raise CheckpointError(f"expert {task}: {e}") from None
