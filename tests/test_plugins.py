"""External plugins register through the `mergebench.methods` entry-point group."""

import subprocess
import sys
import textwrap

from mergebench.api import registry

PLUGIN = '''
from mergebench import register_method, Paper

@register_method("halfway_probe", display_name="Halfway (plugin)", paper=Paper("A plugin", 2026), needs="nothing")
def halfway(ctx, scaling: float = 0.5):
    """theta_0 + scaling * mean_t tau_t."""
    tvs = list(ctx.task_vectors().values())
    return ctx.shared_model(ctx.pretrained_weights + scaling * sum(tvs) / len(tvs))
'''


def test_entry_point_plugin_is_discovered(install_plugin, micro, results_dir):
    install_plugin("mb_probe_plugin", {"mb_probe_plugin": PLUGIN}, {"halfway_probe": "mb_probe_plugin"})
    registry.discover_plugins(force=True)
    try:
        spec = registry.get_method("halfway_probe")
        assert spec.source.startswith("plugin") and spec.display_name == "Halfway (plugin)"
        assert "halfway_probe" in registry.list_methods("halfway*")
        from mergebench.engine.run import run_one
        rec = run_one("halfway_probe", micro, results_dir=results_dir)
        assert rec["status"] == "ok" and rec["method"]["source"].startswith("plugin")
    finally:
        registry.unregister_method("halfway_probe")


def test_broken_plugin_is_reported_not_fatal(install_plugin):
    install_plugin("broken_probe", {}, {"broken": "no_such_module_xyz"})
    errors = registry.discover_plugins(force=True)
    assert "broken" in errors and "no_such_module_xyz" in errors["broken"]
    assert "task_arithmetic" in registry.list_methods()


def test_cli_lists_plugin_methods(install_plugin):
    root = install_plugin("mb_probe_plugin", {"mb_probe_plugin": PLUGIN}, {"halfway_probe": "mb_probe_plugin"})
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(root)!r})
        from mergebench.cli import main
        sys.exit(main(["list-methods", "halfway*"]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "halfway_probe" in out.stdout and "plugin" in out.stdout
