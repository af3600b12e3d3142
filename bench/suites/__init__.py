"""Suites: ``get_suite(name, **options)`` returns the Suite every method runs on.

Suites are registered (``register_suite``, :mod:`mergebench.suites.registry`): the built-ins (mini8, micro,
mini8-lora, micro-lora, real, the synthetic ones; :mod:`mergebench.suites.builtin`) and those of external packages (entry-point
group ``mergebench.suites``). ``list_suites()`` names them.
"""

from __future__ import annotations

from mergebench.suites.base import Suite, TaskData
from mergebench.suites.registry import (
    SUITES as REGISTRY, MergingSanity, References, SuiteSpec, UnknownSuiteError, get_suite, get_suite_spec,
    list_suites, register_suite, suite_for_results,
)


def __getattr__(name: str):
    if name == "SUITES":  # the registered names (a tuple, as before the registry)
        return tuple(list_suites())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Suite", "TaskData", "get_suite", "get_suite_spec", "list_suites", "register_suite", "SuiteSpec",
           "MergingSanity", "References", "UnknownSuiteError", "suite_for_results", "REGISTRY", "SUITES"]
