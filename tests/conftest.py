"""Shared fixtures: the micro suite (seconds to build), cached per test session in a temp folder."""

from __future__ import annotations

import os

import pytest


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
