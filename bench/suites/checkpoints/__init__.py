"""Reading checkpoint files: the one place where mergebench opens a user's weights.

Formats (``guess_format`` guesses from the path): ``safetensors``; ``torch`` (a state dict read with
``torch.load(weights_only=True)``); ``openai_jit`` (OpenAI's TorchScript archive, read without unpickling Python
objects); ``hf`` (a Hugging Face CLIP folder, keys mapped to open_clip's: :mod:`.hf`); ``task_vectors_pickle`` (the
task-vectors repository's pickled objects: only with ``trust_pickle=True``, through the restricted unpickler of
:mod:`.trusted_pickle`, and converted once to safetensors in the cache); ``peft_lora`` (a PEFT adapter folder,
read by ``mergebench.api.lora``). Nothing is ever downloaded; :mod:`.hf_cache` finds files in a Hugging Face cache.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from mergebench.errors import MergebenchError
from mergebench.engine.io import atomic_save_tensors, atomic_write_text, cache_root, file_sha256
from mergebench.suites.checkpoints import hf
from mergebench.suites.checkpoints.trusted_pickle import (
    CheckpointError, as_state_dict, pickle_globals, trusted_torch_load,
)

FORMATS = ("auto", "safetensors", "torch", "openai_jit", "hf", "task_vectors_pickle", "peft_lora")
_OPENAI_EXTRA = ("input_resolution", "context_length", "vocab_size")


def guess_format(path: Path) -> str:
    """The format of ``path`` from its name and layout (a torch zip of TorchScript code: ``openai_jit``)."""
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


def checkpoint_activation(path: Path, fmt: str = "auto") -> bool | None:
    """QuickGELU (True) or GELU (False) as a backbone file states it, without running any of its code; None when the
    file does not say (plain state dicts, safetensors)."""
    if not path.exists():
        return None
    fmt = guess_format(path) if fmt == "auto" else fmt
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
                text = pickle_globals(z.read(pkl[0])) if pkl else ""
        if "QuickGELU" in text:
            return True
        if re.search(r"\bGELU\b", text):
            return False
    return None


# ------------------------------------------------------------------ hashing (cached by size and mtime)
def sha256_of(path: Path) -> str:
    """The sha256 of a file (memoised by path, size and mtime in the cache), or of an HF folder: the hash of its
    files' hashes."""
    if path.is_dir():
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


# ------------------------------------------------------------------ reading
def read_state_dict(path: Path, fmt: str = "auto", trust_pickle: bool = False) -> dict[str, Tensor]:
    """A file's tensors as stored (an HF folder's mapped to open_clip ``CLIP`` keys), never running untrusted pickle
    code."""
    fmt = guess_format(path) if fmt == "auto" else fmt
    try:
        if fmt == "hf":  # a CLIPVisionModel (image tower) or a CLIPModel (both towers: usable as the backbone)
            raw = hf.read_hf_folder(path, trust_pickle)
            return {**{f"visual.{k}": v for k, v in hf.hf_to_open_clip(raw, str(path)).items()},
                    **hf.hf_to_open_clip(raw, str(path), tower="text")}
        if fmt == "safetensors":
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
        return as_state_dict(obj, path)
    except CheckpointError:
        raise
    except MergebenchError as e:  # ConversionError, LoraError: they name the file already
        raise CheckpointError(str(e)) from None
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, SafetensorError,
            pickle.UnpicklingError) as e:
        raise CheckpointError(f"{path}: cannot read it as {fmt} ({type(e).__name__}: {str(e)[:300]}); "
                              f"the file may be corrupt or truncated") from e


def _converted_pickle(path: Path, trust_pickle: bool) -> dict[str, Tensor]:
    digest = sha256_of(path)
    out = cache_root() / "real" / "converted" / f"{digest}.safetensors"
    if out.exists():
        return load_file(out)
    if not trust_pickle:
        raise CheckpointError(f"{path} is a pickled checkpoint; reading it runs pickle, so it needs --trust-pickle "
                              f"(trust_pickle=True). It is then converted once to {out}.")
    obj = trusted_torch_load(path)
    state = {k: v.detach().clone() for k, v in as_state_dict(obj, path).items() if isinstance(v, Tensor)}
    atomic_save_tensors(state, out)
    return state


def strip_wrappers(key: str) -> str:
    """A key without the wrappers training code adds (``module.``, ``model.``, ``image_encoder.``,
    ``clip_model.``)."""
    for prefix in ("module.", "model.", "image_encoder.", "clip_model."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def visual_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The image tower's tensors with open_clip VisionTransformer keys."""
    state = {strip_wrappers(k): v for k, v in state.items()}
    if any(k.startswith("visual.") for k in state):
        return {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    return state


__all__ = ["FORMATS", "CheckpointError", "guess_format", "checkpoint_activation", "sha256_of", "read_state_dict",
           "strip_wrappers", "visual_state", "trusted_torch_load", "as_state_dict", "pickle_globals"]
