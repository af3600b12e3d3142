"""How a merged model leaves the process that made it: to the base cache's folder, or from a method's worker
process back to the harness.

A model of one shared encoder (``SharedModel``, and AdaMerging's result with its trained coefficients) travels as
its tensors in a safetensors file plus a few plain fields: the receiver builds the encoder itself from the suite's
own configuration, so nothing but numbers crosses. Any other model (task-specific parts) travels as a saved module
(``torch.save``) that the receiver loads with :class:`ModuleUnpickler`, which accepts classes only from torch,
open_clip, mergebench and the modules of the methods that made it, and rebuilds no other callable: a pickle that
would run ``os.system`` or start a process is refused before anything of it runs.
"""

from __future__ import annotations

import builtins
import pickle
import types
from pathlib import Path

import torch
from safetensors.torch import load_file

from mergebench.errors import MergebenchError
from mergebench.io import atomic_save_tensors
from mergebench.models import AdaMergedModel, MergedModel, MergeState, SharedModel, encoder_from_weights, freeze


class ModelTransferError(MergebenchError, RuntimeError):
    """A returned model could not be saved or loaded back (a class that cannot be imported, a refused global)."""


def kind_of(model: MergedModel) -> str:
    """``shared`` (one encoder: tensors), ``adamerged`` (one encoder and coefficients: tensors), else ``module``."""
    if type(model) is AdaMergedModel:
        return "adamerged"
    if type(model) is SharedModel:
        return "shared"
    return "module"


def tensors_of(model: MergedModel) -> tuple[dict, dict] | None:
    """(tensors, fields) of a model of one shared encoder, else None."""
    kind = kind_of(model)
    if kind == "module":
        return None
    tensors = {f"encoder.{k}": v.detach().cpu().contiguous() for k, v in model.encoder.state_dict().items()}
    fields = {"kind": kind}
    if kind == "adamerged":
        state = model.merge_state
        tensors["merge_state.coefficients"] = state.coefficients.detach().cpu().contiguous()
        fields["merge_state"] = {"granularity": state.granularity, "ties_k": state.ties_k}
    return tensors, fields


def from_tensors(tensors: dict, fields: dict, encoder_config: dict, pretrained, device) -> MergedModel:
    """The model :func:`tensors_of` described, built on ``device`` from the receiver's own encoder configuration
    (``pretrained`` fills the tensors an encoder stores that are not floating point)."""
    weights = {k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")}
    encoder = freeze(encoder_from_weights(encoder_config, {**pretrained, **weights}, device))
    if fields["kind"] == "adamerged":
        state = MergeState(fields["merge_state"]["granularity"], tensors["merge_state.coefficients"].to(device),
                           fields["merge_state"]["ties_k"])
        return AdaMergedModel(encoder, state).eval()
    return SharedModel(encoder).eval()


def save(model: MergedModel, folder: Path, name: str) -> dict:
    """Write ``model`` under ``folder`` (``name``.safetensors and its fields, or ``name``.pt); returns the note a
    receiver passes to :func:`load`."""
    folder.mkdir(parents=True, exist_ok=True)
    described = tensors_of(model)
    if described is not None:
        tensors, fields = described
        atomic_save_tensors(tensors, folder / f"{name}.safetensors")
        return {**fields, "file": f"{name}.safetensors"}
    path = folder / f"{name}.pt"
    try:
        torch.save(model.cpu(), path)
    except Exception as e:  # noqa: BLE001 - a lambda, a local class, an open file inside the model
        raise ModelTransferError(
            f"the merged model ({type(model).__name__}) cannot be saved to go back to the harness: "
            f"{type(e).__name__}: {e}; keep it an nn.Module of module-level classes holding tensors") from None
    return {"kind": "module", "file": path.name, "class": f"{type(model).__module__}.{type(model).__qualname__}"}


def load(note: dict, folder: Path, encoder_config: dict, pretrained, device, modules: set[str]) -> MergedModel:
    """The model :func:`save` wrote; a saved module may use classes of ``modules`` (the methods' own)."""
    name = note.get("file")
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise ModelTransferError(f"the returned model's file {name!r} is not a file name in its folder")
    path = folder / name
    if note["kind"] != "module":
        return from_tensors(load_file(path), note, encoder_config, pretrained, device)
    try:
        model = torch.load(path, map_location=device, weights_only=False, pickle_module=_restricted(modules))
    except pickle.UnpicklingError as e:
        raise ModelTransferError(f"the merged model ({note.get('class')}) was refused: {e}") from None
    except (ImportError, AttributeError) as e:
        raise ModelTransferError(
            f"the merged model ({note.get('class')}) cannot be loaded in the harness: {type(e).__name__}: {e}; "
            f"define its class at module level of the method's module") from None
    if not isinstance(model, MergedModel):
        raise ModelTransferError(f"the worker returned {type(model).__name__}, not a MergedModel")
    return model.eval()


# plain builtins a module's pickle holds; never eval, exec, getattr, __import__, open
_BUILTINS = {"set", "frozenset", "slice", "range", "complex", "int", "float", "bool", "str", "bytes", "bytearray",
             "tuple", "list", "dict", "object"}
_PREFIXES = ("torch", "open_clip", "mergebench", "collections", "timm", "numpy")
_ALSO = {("functools", "partial")}  # its callable is unpickled through find_class too
# functions torch's own pickles call to rebuild tensors and parameters
_REBUILD = ("torch._utils", "torch._tensor", "torch.serialization", "torch.nn.parameter")


class ModuleUnpickler(pickle.Unpickler):
    """Unpickles a saved merged model: classes from torch, open_clip, mergebench, numpy and ``modules`` (the
    methods'); callables that are not classes only from torch's tensor-rebuilding modules, ``functools.partial``
    and the methods of modules (a forward hook is a bound method)."""

    modules: frozenset = frozenset()

    def find_class(self, module: str, name: str):
        if module in ("builtins", "__builtin__"):  # torch saves with pickle protocol 2 (Python 2 names)
            if name in _BUILTINS:
                return getattr(builtins, name)
            if name == "getattr":  # a bound method (a forward hook): only of a module, never a dunder
                return _module_attribute
        elif (module, name) in _ALSO:
            return super().find_class(module, name)
        elif module in self.modules or module.split(".")[0] in _PREFIXES:
            obj = super().find_class(module, name)
            if isinstance(obj, type) or module in _REBUILD or module.startswith("torch._utils") or \
                    (module.split(".")[0] == "torch" and name.startswith("_rebuild")) or \
                    (module.split(".")[0] == "numpy" and name in ("dtype", "_reconstruct", "scalar")):
                return obj
            if module == "torch" and isinstance(obj, torch.dtype):
                return obj
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a returned model")


def _module_attribute(obj, name: str):
    if not isinstance(obj, torch.nn.Module) or name.startswith("__"):
        raise pickle.UnpicklingError(f"attribute {name!r} of {type(obj).__name__} is not allowed in a returned model")
    return getattr(obj, name)


def _restricted(modules: set[str]) -> types.ModuleType:
    """A stand-in for the pickle module (``torch.load(pickle_module=...)``) whose Unpickler is restricted."""
    unpickler = type("MethodModuleUnpickler", (ModuleUnpickler,), {"modules": frozenset(modules)})
    return types.SimpleNamespace(Unpickler=unpickler, load=pickle.load, __name__="pickle")
