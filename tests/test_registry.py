import pytest

import mergebench as mb
from mergebench.api.pipeline import MethodCall
from mergebench.api.registry import (
    HyperparameterError, UnknownMethodError, get_method, list_methods, register_method, unregister_method,
)


def test_builtins_are_listed_with_metadata():
    names = list_methods()
    for name in ["pretrained", "individual", "weight_averaging", "task_arithmetic", "ties_merging"]:
        assert name in names
        spec = get_method(name)
        assert spec.display_name and spec.paper is not None and spec.needs in mb.NEEDS
    assert get_method("task_arithmetic").hyperparameters["scaling"].default == 0.3
    assert get_method("individual").adds_params


def test_wildcards_like_timm():
    assert list_methods("task_*") == ["task_arithmetic"]
    assert "ties_merging" in list_methods(["t*", "nothing_matches*"])
    assert list_methods("zzz*") == []


def test_unknown_method_suggests_close_matches():
    with pytest.raises(UnknownMethodError, match="did you mean: task_arithmetic"):
        get_method("task_arithmetc")


def test_unknown_and_mistyped_hyperparameters():
    with pytest.raises(HyperparameterError, match="did you mean: scaling"):
        MethodCall.parse("task_arithmetic(scalng=0.4)").resolve()
    with pytest.raises(HyperparameterError, match="expects float"):
        MethodCall.parse("task_arithmetic").with_hparams(scaling="lots").resolve()
    with pytest.raises(HyperparameterError, match="one of"):
        MethodCall.parse("ties_merging(merge='median')").resolve()


def test_spec_parsing_and_canonical_form():
    call = MethodCall.parse("ties_merging(k=10)").resolve()
    assert call.hparams == {"k": 10.0, "scaling": 0.3, "merge": "sum"}
    # int and float spellings are one configuration; the canonical string names every hyperparameter
    assert str(call) == str(MethodCall.parse("ties_merging(k=10.0, scaling=0.3)").resolve())
    assert str(call) == "ties_merging(k=10.0, merge='sum', scaling=0.3)"
    with pytest.raises(HyperparameterError, match="cannot parse"):
        MethodCall.parse("ties_merging(10")


def test_register_requires_defaults_and_valid_needs():
    with pytest.raises(ValueError, match="needs"):
        register_method("bad_needs", needs="everything")
    with pytest.raises(TypeError, match="default"):
        @register_method("no_default")
        def no_default(ctx, alpha):  # pragma: no cover - never called
            return None


def test_duplicate_name_from_another_function_is_an_error():
    @register_method("dup_probe")
    def first(ctx):  # pragma: no cover
        return None

    with pytest.raises(ValueError, match="already registered"):
        @register_method("dup_probe")
        def second(ctx):  # pragma: no cover
            return None
    unregister_method("dup_probe")


def test_run_all_adds_the_suites_showcase_specs(monkeypatch, tmp_path):
    """`mergebench run --all` runs every method's defaults and the suite's showcase (mini8: Surgery and IntervMerge on
    layer-wise AdaMerging, their papers' headline configurations)."""
    import dataclasses

    import mergebench.engine.run as engine_run
    import mergebench.suites.registry as suite_registry
    from mergebench.cli import main
    from mergebench.suites.registry import get_suite_spec

    assert "surgery(base=adamerging_layerwise)" in get_suite_spec("mini8").showcase
    ran = {}

    def fake_run_many(specs, suite, **kwargs):
        ran["specs"] = list(specs)
        return []

    monkeypatch.setattr(engine_run, "run_many", fake_run_many)
    micro = dataclasses.replace(get_suite_spec("micro"), showcase=("task_arithmetic(scaling=0.5)",))
    monkeypatch.setattr(suite_registry, "get_suite_spec", lambda name: micro if name == "micro" else get_suite_spec(name))
    assert main(["run", "--suite", "micro", "--all", "--results", str(tmp_path), "-q"]) == 0
    assert "task_arithmetic(scaling=0.5)" in ran["specs"] and "task_arithmetic" in ran["specs"]
