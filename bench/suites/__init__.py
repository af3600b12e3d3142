"""Suites: ``get_suite('mini8' | 'micro' | 'mini8-lora' | 'micro-lora' | 'real')`` returns the Suite every method runs on."""

from __future__ import annotations

from mergebench.suites.base import Suite, TaskData

SUITES = ("mini8", "micro", "mini8-lora", "micro-lora", "real")


def get_suite(name: str, build: bool = True, verbose: bool = True, **kwargs) -> Suite:
    from mergebench.registry import close_matches

    if name in ("mini8", "micro"):
        from mergebench.suites.mini8 import load_mini8
        return load_mini8(name, build=build, verbose=verbose, **kwargs)
    if name in ("mini8-lora", "micro-lora"):  # the same suites with LoRA experts
        from mergebench.suites.mini8_lora import load_mini8_lora
        return load_mini8_lora(name, build=build, verbose=verbose, **kwargs)
    if name == "real":  # get_suite("real", manifest=..., data_root=..., trust_pickle=False, tasks=None)
        from mergebench.suites.real import load_real
        return load_real(verbose=verbose, **kwargs)
    raise KeyError(f"unknown suite {name!r}{close_matches(name, SUITES)} (suites: {', '.join(SUITES)})")


__all__ = ["Suite", "TaskData", "get_suite", "SUITES"]
