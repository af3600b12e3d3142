"""The trust boundary of pickled checkpoints: what ``--trust-pickle`` lets a pickle name, and nothing more.

A checkpoint that a weights-only ``torch.load`` refuses (the task-vectors repository's pickled ``ImageEncoder``
objects) is read only with the user's consent, by :class:`TrustedUnpickler`: real objects for the tensor data
constructors of ``ALLOWED_GLOBALS``, inert placeholders for the model classes of ``PLACEHOLDER_MODULES``, and
:class:`UnsafePickleError` for any other global. ``pickle_globals`` lists what a pickle names without unpickling
it.
"""

from __future__ import annotations

import io
import pickle
import pickletools
from pathlib import Path

import torch
from torch import Tensor

from mergebench.errors import MergebenchError


class CheckpointError(MergebenchError, ValueError):
    """A checkpoint file is missing, corrupt, unsafe to read without consent, or does not fit the model."""


class _Opaque(torch.nn.Module):
    """Stands in for a model class of a trusted pickle (``PLACEHOLDER_MODULES``): an empty ``nn.Module`` that keeps
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
ALLOWED_GLOBALS = frozenset(
    {("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
     ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
     ("torch._utils", "_rebuild_parameter_with_state"), ("torch", "Size"), ("torch", "device"),
     ("torch.storage", "UntypedStorage"), ("torch.storage", "TypedStorage")}
    | {("torch", f"{kind}Storage") for kind in _STORAGES} | {("torch", dtype) for dtype in _DTYPES})
# (2) Any global of these modules becomes an inert placeholder (_Opaque): the task-vectors repository's classes
# (src.modeling.ImageEncoder), open_clip's and torch.nn's modules of any version, and the torchvision transforms
# the checkpoints keep as their preprocessing. Every other global is refused.
PLACEHOLDER_MODULES = ("src", "open_clip", "torch.nn.modules", "torchvision.transforms")


class UnsafePickleError(pickle.UnpicklingError):
    """A trusted pickle asked for a global outside the allow-list."""

    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.module, self.name = module, name


class TrustedUnpickler(pickle.Unpickler):
    """The unpickler of ``--trust-pickle``: real objects for ``ALLOWED_GLOBALS``, placeholders for the model
    classes of ``PLACEHOLDER_MODULES``, and :class:`UnsafePickleError` for any other global (``os.system``,
    ``builtins.exec``/``eval``/``getattr``/``__import__``, ``subprocess``, ``torch.load``, ...)."""

    def find_class(self, module, name):
        key = ("builtins" if module == "__builtin__" else module, name)  # protocol 2 names Python 2's module
        if key in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if any(module == m or module.startswith(m + ".") for m in PLACEHOLDER_MODULES):
            return _Opaque
        raise UnsafePickleError(*key)


class _TrustedPickleModule:
    Unpickler = TrustedUnpickler
    load = staticmethod(lambda f, **kw: TrustedUnpickler(f, **kw).load())
    __name__ = "mergebench_trusted_pickle"


def trusted_torch_load(path: Path):
    """``torch.load`` of ``path`` through :class:`TrustedUnpickler`; a refused global is a
    :class:`CheckpointError` naming the file and the global."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False, pickle_module=_TrustedPickleModule)
    except UnsafePickleError as e:
        raise CheckpointError(
            f"{path}: refused to unpickle the global {e.module}.{e.name}: --trust-pickle admits only tensor data "
            f"(torch's tensor and parameter rebuild functions, storages, dtypes, collections.OrderedDict, set) and "
            f"reads the model classes of {', '.join(m + '.*' for m in PLACEHOLDER_MODULES)} as inert placeholders; "
            f"this file asks for something else, so it is not a task-vectors checkpoint, or it is a malicious one. "
            f"Convert it to safetensors where you trust its code, or replace it.") from None


def as_state_dict(obj, path: Path) -> dict[str, Tensor]:
    """The tensors of a loaded checkpoint object: a module's state dict, or a dict's (under ``state_dict``,
    ``model_state_dict`` or ``model`` if it has one)."""
    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], (dict, torch.nn.Module)) and not isinstance(obj.get(key), Tensor):
                return as_state_dict(obj[key], path)
        tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
        if tensors:
            return tensors
    raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict or a model")


def pickle_globals(data: bytes) -> str:
    """The ``module.name`` of every class a pickle references (read from its opcodes; nothing is unpickled)."""
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
