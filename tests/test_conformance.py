"""Plugin authors: the scaffold installs and passes the conformance kit, the kit catches each
kind of non-conforming method with a message that says what to fix, and the example plugin
(Model Breadcrumbs) shows up in a leaderboard beside the built-ins."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mergebench import PerTaskModel, leaderboard

from mergebench.api import registry
from mergebench.api.conformance import FAIL, check_method
from mergebench.engine.run import run_many
from mergebench.api.scaffold import new_method
from mergebench.suites import get_suite

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "mergebench-example-plugin"
PAPER = registry.Paper("A probe", 2026, "0000.00000")


def _pip_install(package: Path, target: Path):
    """A real install of the package (built by pip) into a folder of its own, not the shared venv."""
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--target", str(target), str(package)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr


def _activate(target: Path, monkeypatch, module: str):
    monkeypatch.syspath_prepend(str(target))
    sys.modules.pop(module, None)
    importlib.invalidate_caches()
    registry.discover_plugins(force=True)


def test_scaffolded_plugin_installs_and_passes(tmp_path, monkeypatch, micro):
    root = new_method("probe_scaffolded", tmp_path)
    assert (root / "pyproject.toml").read_text().count('probe_scaffolded = "mergebench_probe_scaffolded.method"') == 1
    assert (root / "tests" / "test_conformance.py").exists()
    with pytest.raises(ValueError, match="already registered"):
        new_method("task_arithmetic", tmp_path)
    with pytest.raises(ValueError, match="lower-case"):
        new_method("Bad-Name", tmp_path)
    with pytest.raises(FileExistsError):
        new_method("probe_scaffolded", tmp_path)

    _pip_install(root, tmp_path / "site")
    _activate(tmp_path / "site", monkeypatch, "mergebench_probe_scaffolded.method")
    try:
        report = check_method("probe_scaffolded", suite=micro)
        assert report.ok, report.render()
        statuses = {c.name: c.status for c in report.checks}
        assert statuses["paper"] == "warn", "the placeholder paper is pointed out"
        assert registry.get_method("probe_scaffolded").source.startswith("plugin")
    finally:
        registry.unregister_method("probe_scaffolded")


def _failed(report, check):
    found = [c for c in report.checks if c.name == check]
    assert found and found[0].status == FAIL, report.render()
    return found[0].detail


def test_kit_catches_non_conforming_methods(micro):
    fresh = get_suite("micro", verbose=False)  # a probe below edits weights in place: keep the shared suite clean

    @registry.register_method("probe_inplace", display_name="In place", paper=PAPER)
    def inplace(ctx):
        """Edits theta_0 in place."""
        w = ctx.pretrained_weights
        next(iter(w.values())).add_(1.0)
        return ctx.shared_model(w)

    @registry.register_method("probe_undeclared", display_name="Undeclared", paper=PAPER)
    def undeclared(ctx):
        """Reads unlabeled data without declaring it."""
        ctx.exemplars(ctx.tasks[0], 4)
        return ctx.shared_model(ctx.pretrained_weights)

    @registry.register_method("probe_hidden_params", display_name="Hidden params", paper=PAPER)
    def hidden(ctx):
        """Keeps every expert but says it adds nothing."""
        return PerTaskModel({t: ctx.expert_encoder(t) for t in ctx.tasks})

    @registry.register_method("probe_random", display_name="Random", paper=PAPER)
    def random_noise(ctx, scale: float = 1e-3):
        """Unseeded noise."""
        g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
        return ctx.shared_model(ctx.pretrained_weights.map(lambda k, v: v + scale * torch.randn(v.shape, generator=g)))

    @registry.register_method("probe_no_metadata")
    def bare(ctx, scaling=0.3):
        return ctx.shared_model(ctx.pretrained_weights)

    try:
        assert "modified pretrained" in _failed(check_method("probe_inplace", suite=fresh), "inputs untouched")
        assert "declare needs='unlabeled'" in _failed(check_method("probe_undeclared", suite=micro), "declared data only")
        msg = _failed(check_method("probe_hidden_params", suite=micro), "added parameters")
        assert "adds_params=True" in msg and f"{(len(micro.tasks) - 1) * micro.pretrained.numel():,}" in msg
        assert "seed" in _failed(check_method("probe_random", suite=micro), "deterministic under a seed")
        msg = _failed(check_method("probe_no_metadata", suite=micro), "complete metadata")
        assert "display name" in msg and "cite the paper" in msg and "docstring" in msg and "annotate" in msg
        missing = check_method("probe_not_installed", suite=micro)
        assert not missing.ok and "entry point" in _failed(missing, "registered")
    finally:
        for name in ["probe_inplace", "probe_undeclared", "probe_hidden_params", "probe_random", "probe_no_metadata"]:
            registry.unregister_method(name)


@pytest.fixture
def example_plugin(tmp_path, monkeypatch):
    """The example plugin: installed by `make test` (pip install -e); installed here into a temp folder if not."""
    registry.discover_plugins()
    if "model_breadcrumbs" not in registry.list_methods():
        _pip_install(EXAMPLE, tmp_path / "site")
        _activate(tmp_path / "site", monkeypatch, "mergebench_breadcrumbs.method")
    return registry.get_method("model_breadcrumbs")


def test_example_plugin_in_a_leaderboard_beside_builtins(example_plugin, micro, results_dir):
    assert example_plugin.source == "plugin (mergebench_breadcrumbs)"
    report = check_method("model_breadcrumbs", suite=micro)
    assert report.ok, report.render()

    from mergebench_breadcrumbs.method import breadcrumb_mask
    tau = torch.arange(1, 201, dtype=torch.float32).reshape(2, 100) * torch.tensor([[1.0], [-1.0]])
    mask = breadcrumb_mask(tau, top_remove=0.01, keep=0.1)
    # per row: the largest entry (|200|, |100|) is masked as an outlier, then the next 10 are kept
    assert mask.sum(1).tolist() == [10, 10]
    assert mask[0, 89:99].all() and not mask[0, 99] and not mask[0, :89].any()

    recs = run_many(["task_arithmetic", "model_breadcrumbs"], micro, results_dir=results_dir, show_progress=False)
    assert [r["status"] for r in recs] == ["ok", "ok"]
    assert recs[1]["method"]["source"].startswith("plugin") and recs[1]["params"]["added"] == 0
    df = leaderboard.table(results_dir, micro.name)[0]
    assert {"Task Arithmetic", "Model Breadcrumbs"} <= set(df["Method"])
    md = leaderboard.render(results_dir, micro.name)
    assert "| Model Breadcrumbs" in md and "| Task Arithmetic" in md
