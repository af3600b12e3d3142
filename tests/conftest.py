"""Shared fixtures: the micro suites (seconds to build), cached per test session in a temp folder; probe methods;
the method registry as this repository defines it."""

from __future__ import annotations

import importlib
import os
import sys
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
    from mergebench.api import registry

    names = []

    def register(name, **kw):
        names.append(name)
        return registry.register_method(name, **kw)
    yield register
    for name in names:
        registry.unregister_method(name)


@pytest.fixture
def install_plugin(tmp_path, monkeypatch):
    """``install_plugin(name, modules, entries=None, group="mergebench.methods")``: an installed distribution
    ``name`` in a folder of this test's own (returned): the ``modules`` (module name -> source) and a dist-info whose
    entry points in ``group`` are ``entries`` (entry name -> target; by default each module under its own name).
    The folder is on this process's path and, through PYTHONPATH, on every process started from here (a sweep's
    workers, a command line); the modules are imported afresh by the next discovery."""
    root = tmp_path / "plugin"

    def install(name: str, modules: dict[str, str], entries: dict[str, str] | None = None,
                group: str = "mergebench.methods") -> Path:
        root.mkdir(exist_ok=True)
        for module, source in modules.items():
            (root / f"{module}.py").write_text(source)
            monkeypatch.delitem(sys.modules, module, raising=False)
        dist = root / f"{name}-0.1.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: 0.1\n")
        lines = [f"{entry} = {target}" for entry, target in (entries or {m: m for m in modules}).items()]
        (dist / "entry_points.txt").write_text("\n".join([f"[{group}]", *lines, ""]))
        monkeypatch.syspath_prepend(str(root))
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
        return root
    return install


@pytest.fixture
def repository_methods(monkeypatch):
    """The method registry as this repository defines it, whatever else is installed: the built-ins and the
    example plugin imported from its source (examples/), and no other entry point's methods."""
    from mergebench.api.registry import METHODS

    METHODS.discover()
    monkeypatch.syspath_prepend(str(EXAMPLE_PLUGIN))
    importlib.import_module("mergebench_breadcrumbs.method")   # registers model_breadcrumbs (again: a no-op)
    ours = {name: e for name, e in METHODS._entries.items() if e.module.startswith(("mergebench.", "mergebench_breadcrumbs"))}
    monkeypatch.setattr(METHODS, "_entries", ours)
    monkeypatch.setattr(METHODS, "_aliases", {old: new for old, new in METHODS._aliases.items() if new in ours})
    monkeypatch.setattr(METHODS, "plugin_errors", {})
    return METHODS
