"""Suites: ``get_suite('mini8' | 'micro' | 'mini8-lora' | 'micro-lora' | 'real' | 'synthetic-vitb32' | ...)`` returns
the Suite every method runs on."""

from __future__ import annotations

import functools

from mergebench.errors import MissingFileError, NotFoundError
from mergebench.suites.base import Suite, TaskData

SUITES = ("mini8", "micro", "mini8-lora", "micro-lora", "real", "synthetic-vitb32", "synthetic-vitb16",
          "synthetic-vitl14", "synthetic-tiny")


def get_suite(name: str, build: bool = True, verbose: bool = True, **kwargs) -> Suite:
    from mergebench.registry import close_matches

    if name not in SUITES:
        raise NotFoundError(f"unknown suite {name!r}{close_matches(name, SUITES)} (suites: {', '.join(SUITES)})")
    try:
        if name in ("mini8", "micro"):
            from mergebench.suites.mini8 import load_mini8
            suite = load_mini8(name, build=build, verbose=verbose, **kwargs)
        elif name in ("mini8-lora", "micro-lora"):  # the same suites with LoRA experts
            from mergebench.suites.mini8_lora import load_mini8_lora
            suite = load_mini8_lora(name, build=build, verbose=verbose, **kwargs)
        elif name.startswith("synthetic-"):  # get_suite("synthetic-vitb32", fraction=0.01, device="cuda")
            from mergebench.suites.synthetic import load_synthetic
            suite = load_synthetic(name, verbose=verbose, **kwargs)
        else:  # get_suite("real", manifest=..., data_root=..., trust_pickle=False, tasks=None)
            from mergebench.suites.real import load_real
            suite = load_real(verbose=verbose, **kwargs)
    except FileNotFoundError as e:  # not built, no manifest, no data root: the user's to fix
        if isinstance(e, MissingFileError):
            raise
        raise MissingFileError(str(e)) from None
    # the same files, loaded again (built by now, so never a build)
    suite.reload = functools.partial(get_suite, name, build=False, verbose=False, **kwargs)
    return suite


__all__ = ["Suite", "TaskData", "get_suite", "SUITES"]
