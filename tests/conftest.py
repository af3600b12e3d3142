"""Shared fixtures: the micro suites (seconds to build), cached per test session in a temp folder; probe methods;
the method registry as this repository defines it."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest

EXAMPLE_PLUGIN = Path(__file__).resolve().parents[1] / "examples" / "mergebench-example-plugin"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Every test session builds into its own cache, so tests never touch the user's cache."""
    if not os.environ.get("MERGEBENCH_TEST_CACHE"):
        os.environ["MERGEBENCH_CACHE"] = str(tmp_path_factory.mktemp("mergebench_cache"))
    else:
        os.environ["MERGEBENCH_CACHE"] = os.environ["MERGEBENCH_TEST_CACHE"]
    os.environ["MERGEBENCH_QUIET"] = "1"
    # micro models are tiny: one thread is faster and does not fight other processes for cores
    import torch
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def micro(_isolated_cache):
    from mergebench.suites import get_suite

    return get_suite("micro", verbose=False)


@pytest.fixture
def results_dir(tmp_path):
    return tmp_path / "results"


@pytest.fixture(scope="session")
def micro_lora(_isolated_cache):
    from mergebench.suites import get_suite

    return get_suite("micro-lora", verbose=False)


@pytest.fixture
def fresh(micro):
    """A micro suite of this test's own (loaded again from the cache), for probes that change it."""
    from mergebench.suites import get_suite

    return get_suite("micro", verbose=False)


@pytest.fixture
def probe():
    """``probe(name, **register_method keywords)``: register probe methods for one test, removed afterwards."""
    from mergebench import registry

    names = []

    def register(name, **kw):
        names.append(name)
        return registry.register_method(name, **kw)
    yield register
    for name in names:
        registry.unregister_method(name)


@pytest.fixture
def repository_methods(monkeypatch):
    """The method registry as this repository defines it, whatever else is installed: the built-ins and the
    example plugin imported from its source (examples/), and no other entry point's methods."""
    from mergebench.registry import METHODS

    METHODS.discover()
    monkeypatch.syspath_prepend(str(EXAMPLE_PLUGIN))
    importlib.import_module("mergebench_breadcrumbs.method")   # registers model_breadcrumbs (again: a no-op)
    ours = {name: e for name, e in METHODS._entries.items() if e.module.startswith(("mergebench.", "mergebench_breadcrumbs"))}
    monkeypatch.setattr(METHODS, "_entries", ours)
    monkeypatch.setattr(METHODS, "_aliases", {old: new for old, new in METHODS._aliases.items() if new in ours})
    monkeypatch.setattr(METHODS, "plugin_errors", {})
    return METHODS
