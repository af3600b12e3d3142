"""One registry idea: a suite, a leaderboard format and a method are each one definition plus one registration,
found by the command line (choices, help) and the leaderboard; external suites come through an entry point."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest

from mergebench import leaderboard
from mergebench.api.catalog import Registry, UnknownNameError
from mergebench.cli import main
from mergebench.leaderboard import FORMATS, Format, register_format
from mergebench.suites import REGISTRY as SUITES, get_suite, list_suites, register_suite


def test_registry_names_aliases_lazy_entries_wildcards_and_close_matches():
    reg: Registry = Registry("widget")

    @reg.register
    def round_widget():
        return "round"

    reg.register("square-widget", aliases=("box",))(lambda: "square")
    reg.register_lazy("json-widget", "json:dumps")
    assert reg.names() == ["round_widget", "square-widget", "json-widget"]  # the name defaults to the function's
    assert reg.module_of("round_widget") == __name__ and reg.module_of("json-widget") == "json"
    assert reg.get("box")() == "square" and "box" in reg  # a former name keeps resolving
    assert reg.get("json-widget") is json.dumps          # imported on first use
    assert reg.names("*-widget") == ["square-widget", "json-widget"]
    with pytest.raises(UnknownNameError, match="unknown widget 'round_widgt'; did you mean: round_widget"):
        reg.get("round_widgt")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("round_widget")(lambda: "another")
    reg.unregister("square-widget")
    assert "box" not in reg and "square-widget" not in reg


@pytest.fixture
def probe_suite(micro):
    """A throwaway suite registered through the public API: micro's files under another name, with a sanity check
    of its own and an option."""
    seen = {}

    def sanity(rows):
        return [f"(probe) {len(rows)} rows, best {rows['Avg'].max():.1f}"]

    @register_suite("probe-suite", results="probe-*", sanity=sanity)
    def probe(build: bool = True, verbose: bool = True, label: str = "one") -> "Suite":  # noqa: F821
        """micro under another name (a test)"""
        seen["label"] = label
        base = get_suite("micro", build=build, verbose=False)
        return dataclasses.replace(base, name=f"probe-{label}", info={**base.info, "suite": f"probe-{label}"})

    yield seen
    SUITES.unregister("probe-suite")


@pytest.fixture
def probe_format():
    @register_format("probe-json")
    class ProbeJson(Format):
        filename = "leaderboard.json"

        def render(self, page):
            return json.dumps({"suite": page.suite, "methods": list(page.df["Method"])}) + "\n"

    yield ProbeJson
    FORMATS.unregister("probe-json")


def test_a_registered_suite_and_format_work_from_the_command_line(probe_suite, probe_format, tmp_path, capsys):
    assert "probe-suite" in list_suites() and "probe-suite" in list_suites(builds=True)
    results = tmp_path / "results"
    rc = main(["run", "task_arithmetic", "weight_averaging", "--suite", "probe-suite", "--suite-option", "label=two",
               "--results", str(results), "-q"])
    assert rc == 0 and probe_suite["label"] == "two"
    assert sorted(p.name.split("-")[0] for p in (results / "probe-two").glob("*.json")) == \
        ["task_arithmetic", "weight_averaging"]
    capsys.readouterr()
    assert main(["leaderboard", "--suite", "probe-two", "--results", str(results), "--format", "probe-json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["suite"] == "probe-two" and set(printed["methods"]) == {"Task Arithmetic", "Weight Averaging"}
    md = leaderboard.render(results, "probe-two")
    assert "## Benchmark sanity" in md and "(probe) 2 rows" in md  # the suite's own check, displayed
    paths = leaderboard.write(results, "probe-two", plots=False)
    assert json.loads(paths["probe-json"].read_text())["suite"] == "probe-two"
    # a suite option it does not take, and a format nobody registered: errors that say what exists
    assert main(["run", "task_arithmetic", "--suite", "probe-suite", "--suite-option", "colour=red",
                 "--results", str(results), "-q"]) == 2
    assert "takes no option 'colour'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["leaderboard", "--suite", "probe-two", "--results", str(results), "--format", "probe-xml"])


def test_a_sweep_passes_the_suite_options_to_its_jobs(probe_suite, tmp_path):
    from mergebench.sweeps.sweep import Sweep, job_status, run_job

    sweep = Sweep(methods=["task_arithmetic"], suites=[{"name": "probe-suite", "label": "three"}],
                  results_dir=str(tmp_path / "results"), name="probe-options")
    jobs = sweep.jobs()
    assert [(j.suite, j.suite_spec, j.suite_options) for j in jobs] == [("probe-three", "probe-suite",
                                                                        {"label": "three"})]
    probe_suite.clear()
    assert run_job(jobs[0].to_dict())["status"] == "ok"  # the worker loads the suite with the same options
    assert probe_suite["label"] == "three" and job_status(jobs)[0]["state"] == "done"


def test_cli_choices_and_help_come_from_the_registries(probe_suite, probe_format, capsys):
    from mergebench.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    build_choices = next(a for a in sub["build"]._actions if a.dest == "suite").choices
    assert "probe-suite" in build_choices and "real" not in build_choices  # real is read from your files
    formats = next(a for a in sub["leaderboard"]._actions if a.dest == "format").choices
    assert "probe-json" in formats and "figures" not in formats  # figures are files, not printable
    assert "probe-suite" in next(a for a in sub["run"]._actions if a.dest == "suite").help
    assert main(["list-suites", "probe*"]) == 0
    assert "micro under another name" in capsys.readouterr().out


def test_check_plugin_on_the_real_suite_asks_for_its_manifest(capsys):
    assert main(["check-plugin", "task_arithmetic", "--suite", "real"]) == 2
    assert "manifest" in capsys.readouterr().err


PLUGIN_SUITE = '''
import dataclasses

from mergebench.suites import get_suite, register_suite


@register_suite("probe-plugin-suite")
def probe_plugin_suite(build: bool = True, verbose: bool = True):
    """micro, registered by an installed package"""
    base = get_suite("micro", build=build, verbose=False)
    return dataclasses.replace(base, name="probe-plugin-suite", info={**base.info, "suite": "probe-plugin-suite"})
'''


def test_entry_point_suite_is_discovered_and_runs(tmp_path, install_plugin, micro, capsys):
    install_plugin("mb_probe_suite", {"mb_probe_suite": PLUGIN_SUITE}, {"probe": "mb_probe_suite"},
                   group="mergebench.suites")
    SUITES.discover(force=True)
    try:
        assert "probe-plugin-suite" in list_suites()
        assert SUITES.module_of("probe-plugin-suite") == "mb_probe_suite"
        results = tmp_path / "results"
        assert main(["run", "task_arithmetic", "--suite", "probe-plugin-suite", "--results", str(results), "-q"]) == 0
        assert "Task Arithmetic" in leaderboard.render(results, "probe-plugin-suite")
    finally:
        SUITES.unregister("probe-plugin-suite")


def _documented_suite_file() -> str:
    """The new suite file docs/extending.md shows (the Python block after "noisy_micro.py` (new file):")."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "extending.md").read_text()
    after = text.split("`bench/suites/noisy_micro.py` (new file):", 1)[1]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


def test_a_suite_with_an_option_in_one_file_runs_through_the_command_line(tmp_path, monkeypatch, micro, capsys):
    """docs/extending.md's suite file, as written there, is all a suite with an option needs: its flag appears on
    `run` and `sweep` and reaches the loader, with no command-line code naming it."""
    (tmp_path / "noisy_micro.py").write_text(_documented_suite_file())
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    module = importlib.import_module("noisy_micro")  # the registration line: importing the file registers the suite
    try:
        with pytest.raises(SystemExit):
            main(["run", "--help"])
        assert "noisy-micro: the factor on each expert's task vector" in capsys.readouterr().out
        results = tmp_path / "results"
        assert main(["run", "task_arithmetic", "--suite", "noisy-micro", "--strength", "3", "--results", str(results),
                     "--device", "cpu", "-q"]) == 0
        (record,) = [json.loads(p.read_text()) for p in (results / "noisy-micro-3").glob("*.json")]
        assert record["status"] == "ok" and record["suite"]["cache_key"].endswith("-x3")
        assert main(["sweep", "task_arithmetic", "--suite", "noisy-micro", "--strength", "2.5", "--dry-run",
                     "--results", str(results), "--name", "noisy"]) == 0
        assert "noisy-micro-2.5" in capsys.readouterr().out
        assert main(["run", "task_arithmetic", "--suite", "micro", "--strength", "3", "--results", str(results)]) == 2
        assert "suite 'micro' takes no option 'strength'" in capsys.readouterr().err
    finally:
        SUITES.unregister("noisy-micro")
        sys.modules.pop(module.__name__)


def test_a_suite_flag_never_takes_a_commands_own_flag_and_names_an_option(micro):
    from mergebench.cli import build_parser

    @register_suite("probe-seeded", flags={"seed": "the suite's seed"})
    def probe_seeded(build: bool = True, verbose: bool = True, seed: int = 0):
        """micro (a test)"""
        return get_suite("micro", build=build, verbose=False)

    try:
        with pytest.warns(UserWarning, match="option seed has no flag of its own.*--suite-option seed=VALUE"):
            args = build_parser(["run"]).parse_args(["run", "task_arithmetic", "--seed", "4"])
        assert args.seed == 4 and not hasattr(args, "suite_flag_seed")  # run's --seed stays run's
    finally:
        SUITES.unregister("probe-seeded")
    with pytest.raises(TypeError, match="flags name 'sead', which is not one of its options"):
        register_suite("probe-misflagged", flags={"sead": "a typo"})(probe_seeded)
