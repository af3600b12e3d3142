"""mergebench: a benchmark harness for model-merging methods on CLIP ViT image encoders."""

__version__ = "0.1.0"

from mergebench.context import DataNotDeclaredError, MergeContext  # noqa: E402
from mergebench.models import MergedModel, PerTaskModel, SharedModel  # noqa: E402
from mergebench.pipeline import MethodCall  # noqa: E402
from mergebench.registry import (  # noqa: E402
    NEEDS, Paper, UnknownMethodError, get_method, list_methods, register_method,
)
from mergebench.weights import Weights  # noqa: E402

__all__ = [
    "register_method", "get_method", "list_methods", "Paper", "NEEDS", "UnknownMethodError",
    "MergeContext", "DataNotDeclaredError", "MergedModel", "SharedModel", "PerTaskModel", "Weights", "MethodCall",
]
