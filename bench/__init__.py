"""mergebench: a benchmark harness for model-merging methods on CLIP ViT image encoders.

The public names below are imported on first use, so that the command line answers ``--help`` and ``--version``
without importing torch.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "register_method": "mergebench.api.registry", "get_method": "mergebench.api.registry",
    "list_methods": "mergebench.api.registry", "Paper": "mergebench.api.registry", "NEEDS": "mergebench.api.registry",
    "UnknownMethodError": "mergebench.api.registry",
    "MergeContext": "mergebench.api.context", "DataNotDeclaredError": "mergebench.api.context",
    "MergedModel": "mergebench.api.models", "SharedModel": "mergebench.api.models", "PerTaskModel": "mergebench.api.models",
    "Weights": "mergebench.api.weights", "MethodCall": "mergebench.api.pipeline",
    "check_method": "mergebench.api.conformance",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
