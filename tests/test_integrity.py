"""Nothing lost, nothing let in: read-only inputs, records that are never destroyed, names checked before they
become paths, the results folder checked before any work, the umask, the --trust-pickle allow-list,
hyperparameter ranges and bad experts, messages that name the file, and time limits a method cannot catch."""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import shutil
import stat
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import save_file

from mergebench import leaderboard

from mergebench.api import conformance, registry
from mergebench.cli import build_parser, main
from mergebench.engine.io import cache_root
from mergebench.api.models import SharedModel
from mergebench.api.pipeline import MethodCall
from mergebench.engine.records import load_records, record_path, write_record
from mergebench.engine.run import run_many, run_one
from mergebench.suites import checkpoints, get_suite
from mergebench.suites.real import zoo
from mergebench.suites.base import Suite
from mergebench.sweeps.sweep import Sweep, job_status, run_sweep
from mergebench.api.weights import Weights

# (what this change adds is imported inside the tests, so each test fails on its own on code without it)

PAPER = registry.Paper("A probe", 2024, "0000.00000")


def _numbers(rec):
    m = rec["metrics"]
    return m["accuracy"], m["normalized_accuracy"], m["reference_accuracy"]


def _same_inputs(a, b) -> bool:
    """Whether two suites hold equal weights, heads and data."""
    pairs = [(a.pretrained, b.pretrained), (a.heads, b.heads)] + \
        [(a.expert_weights(t), b.expert_weights(t)) for t in a.tasks]
    same = all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in pairs)
    return same and all(torch.equal(a.split(s, t).images, b.split(s, t).images) for s in a.data for t in a.tasks)


# ------------------------------------------------------------------ 1. inputs are read-only to methods
def test_an_expert_zeroed_in_place_changes_no_other_run_and_no_cache(fresh, micro, results_dir, tmp_path, probe):
    """The repro: a method zeroes ctx.expert_weights(t) in place, then Task Arithmetic runs in the same run_many
    on a fresh reference cache; its record (and the cached expert accuracies) equal a clean run's."""
    @probe("probe_zero_experts")
    def zero(ctx):
        for t in ctx.tasks:
            for v in ctx.expert_weights(t).values():
                v.zero_()
        return ctx.shared_model(ctx.pretrained_weights)

    shutil.rmtree(cache_root() / "reference", ignore_errors=True)  # the experts' accuracies are computed anew
    mutated, ta = run_many(["probe_zero_experts", "task_arithmetic"], fresh, results_dir=results_dir,
                           count_flops=False)
    assert ta["status"] == "ok"
    clean = run_one("task_arithmetic", get_suite("micro", verbose=False), results_dir=tmp_path / "clean",
                    count_flops=False)
    assert _numbers(ta) == _numbers(clean)
    assert ta["config_hash"] == clean["config_hash"]
    cached = [json.loads(p.read_text()) for p in (cache_root() / "reference").glob("*.json")]
    assert cached == [clean["metrics"]["reference_accuracy"]]
    assert _same_inputs(fresh, micro)


@pytest.mark.parametrize("what", ["pretrained", "expert", "head", "data"])
def test_a_method_that_changes_its_inputs_in_place_fails_and_the_suite_is_untouched(fresh, micro, results_dir,
                                                                                    tmp_path, probe, what):
    """A write to the tensors a method's worker holds (reached behind the context's back) fails that method,
    naming them; the harness's suite never held them, and the next method is a clean run."""
    task = micro.tasks[1]

    @probe("probe_edit_suite", needs="unlabeled" if what == "data" else "nothing")
    def edit(ctx):
        inputs = ctx._source  # the worker's own (copy-on-write) view of the suite
        if what == "pretrained":
            next(iter(inputs.pretrained.values())).add_(1.0)
        elif what == "expert":
            next(iter(inputs.expert_weights(task).values())).zero_()
        elif what == "head":
            inputs.heads[task].zero_()
        else:
            inputs.split("test", task).images.zero_()
        return ctx.shared_model(ctx.pretrained_weights)

    edited, ta = run_many(["probe_edit_suite", "task_arithmetic"], fresh, results_dir=results_dir, count_flops=False)
    assert edited["status"] == "failed" and edited["error"].startswith("InputsModifiedError: probe_edit_suite")
    named = {"pretrained": "pretrained 'class_embedding'", "expert": f"expert {task!r} 'class_embedding'",
             "head": f"head {task!r}", "data": f"data test/{task} images"}[what]
    assert named in edited["error"]
    assert json.loads(open(edited["_path"]).read())["status"] == "failed"
    clean = run_one("task_arithmetic", micro, results_dir=tmp_path / "clean", count_flops=False)
    assert ta["status"] == "ok" and _numbers(ta) == _numbers(clean)
    assert _same_inputs(fresh, micro)


class SuiteEditingModel(SharedModel):
    """A returned module whose forward (run in the harness to evaluate it) edits every suite it finds."""

    def forward(self, images, task):
        import gc
        for suite in [o for o in gc.get_objects() if isinstance(o, Suite)]:
            suite.heads[suite.tasks[0]].mul_(-1)
        return self.encoder(images)


def test_a_suite_that_cannot_be_loaded_again_refuses_later_runs(micro, results_dir, probe):
    """What the process boundary does not cover, a returned module's forward, is still checked: the run fails,
    and a suite that cannot be loaded again refuses later runs."""
    handmade = Suite(name="micro-handmade", tasks=micro.tasks, encoder_config=micro.encoder_config,
                     pretrained=Weights({k: v.clone() for k, v in micro.pretrained.items()}),
                     heads={t: h.clone() for t, h in micro.heads.items()}, data=micro.data,
                     load_expert=micro.expert_weights, info=dict(micro.info))

    @probe("probe_edit_head")
    def edit(ctx):
        return SuiteEditingModel(ctx.encoder())

    try:
        edited, ta = run_many(["probe_edit_head", "task_arithmetic"], handmade, results_dir=results_dir,
                              count_flops=False)
    finally:
        for suite in (micro,):  # the forward ran in this process: undo its edit of the session's suite
            suite.__dict__.update(get_suite("micro", verbose=False).__dict__)
    assert edited["status"] == "failed" and "cannot be loaded again" in edited["error"]
    assert ta["status"] == "failed" and "SuiteModifiedError" in ta["error"] and "probe_edit_head" in ta["error"]


def test_check_plugin_catches_head_and_data_mutation(fresh, probe):
    @probe("probe_head_edit", display_name="Head edit", paper=PAPER)
    def head_edit(ctx):
        """Zeroes a head it holds."""
        ctx._source.heads[ctx.tasks[0]].zero_()
        return ctx.shared_model(ctx.pretrained_weights)

    @probe("probe_data_edit", display_name="Data edit", paper=PAPER, needs="unlabeled")
    def data_edit(ctx):
        """Overwrites test images it holds."""
        ctx._source.split("test", ctx.tasks[0]).images[:4] = 0
        ctx.exemplars(ctx.tasks[0], 1)
        return ctx.shared_model(ctx.pretrained_weights)

    for name, expected in (("probe_head_edit", f"head {fresh.tasks[0]!r}"),
                           ("probe_data_edit", f"data test/{fresh.tasks[0]} images")):
        report = conformance.check_method(name, suite=fresh)
        check = next(c for c in report.checks if c.name == "inputs untouched")
        assert check.status == conformance.FAIL and expected in check.detail, report.render()


# ------------------------------------------------------------------ 2. records are never destroyed
def _future(rec):
    return json.dumps({**rec, "schema": 99})


def _string_schema(rec):
    return json.dumps({**rec, "schema": "1"})


def _no_metrics(rec):
    return json.dumps({k: v for k, v in rec.items() if k != "metrics"})


def _bad_json(rec):
    return json.dumps(rec)[:-40]


@pytest.mark.parametrize("damage", [_future, _string_schema, _no_metrics, _bad_json])
def test_a_record_that_cannot_be_read_is_left_alone_named_and_skipped(micro, results_dir, damage):
    first = run_one("task_arithmetic", micro, results_dir=results_dir, count_flops=False)
    path = first["_path"]
    saved = {k: v for k, v in json.loads(open(path).read()).items()}
    text = damage(saved)
    with open(path, "w") as f:
        f.write(text)
    with pytest.warns(UserWarning, match=f"{os.path.basename(path)}"):
        recs = run_many(["task_arithmetic", "weight_averaging"], micro, results_dir=results_dir, count_flops=False)
    assert [r["status"] for r in recs] == ["ok", "ok"] and not recs[0].get("skipped")
    assert open(path).read() == text, "the unreadable file is untouched"
    assert recs[0]["_path"] != path and recs[0]["_path"].endswith(".1.json")
    with pytest.warns(UserWarning):
        loaded = load_records(results_dir, micro.name)
        md = leaderboard.render(results_dir, micro.name)
    assert [str(p) for p, _ in loaded.unreadable] == [path] and len(loaded.records) == 2
    assert os.path.basename(path) in md and "Task Arithmetic" in md


def test_write_record_goes_beside_an_unreadable_file(tmp_path):
    path = tmp_path / "micro" / "x-0123456789abcdef.json"
    path.parent.mkdir()
    path.write_text("not json")
    rec = {"status": "failed", "config_hash": "0123456789abcdef", "method": {"pipeline": "x"}}
    with pytest.warns(UserWarning, match="unreadable.*left as it is.*x-0123456789abcdef.1.json"):
        written = write_record(rec, path)
    assert written.name == "x-0123456789abcdef.1.json" and path.read_text() == "not json"
    assert write_record(rec, written) == written  # a readable record of the same configuration is replaced


# ------------------------------------------------------------------ 3. names become paths only after validation
@pytest.mark.parametrize("bad", ["../../x", "a/b", "/tmp/x", "..", ".hidden", "x\\y", ""])
def test_names_that_are_not_one_path_component_are_refused(tmp_path, bad):
    from mergebench.errors import UnsafeNameError

    with pytest.raises(UnsafeNameError, match="sweep name"):
        Sweep(["task_arithmetic"], name=bad or "..", results_dir=str(tmp_path))
    with pytest.raises(UnsafeNameError):
        Sweep.load(bad or "..", tmp_path)
    with pytest.raises(UnsafeNameError, match="suite name"):
        record_path(tmp_path, bad or "..", "task_arithmetic", "0123456789abcdef")
    with pytest.raises(UnsafeNameError):
        load_records(tmp_path, bad or "..")
    assert not (tmp_path.parent / "x").exists() and not list(tmp_path.parent.glob("x*.yaml"))


def test_a_manifest_name_is_checked_before_it_names_a_results_folder(tmp_path):
    raw = {"name": "../../escape", "model": "ViT-B-32", "backbone": "b.pt", "experts": {"MNIST": "m.pt"}}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(zoo.ManifestError, match=r"m\.yaml.*name '\.\./\.\./escape' cannot be used as a file name"):
        zoo.Manifest.load(tmp_path / "m.yaml")


def test_cli_refuses_a_traversing_sweep_name(tmp_path, capsys):
    assert main(["status", "../../etc", "--results", str(tmp_path)]) == 2
    assert "sweep name '../../etc' cannot be used as a file name" in capsys.readouterr().err
    code = main(["sweep", "task_arithmetic", "--suite", "micro", "--name", "../x", "--results", str(tmp_path),
                 "--dry-run"])
    assert code == 2 and not (tmp_path / "x.yaml").exists()


# ------------------------------------------------------------------ 4. the results folder, before any work
def test_an_unwritable_or_full_results_folder_fails_before_any_merge(micro, tmp_path, probe, monkeypatch):
    from mergebench.engine.io import ResultsFolderError

    merges = []

    @probe("probe_counted")
    def counted(ctx):
        merges.append(1)
        return ctx.shared_model(ctx.pretrained_weights)

    not_a_folder = tmp_path / "results"
    not_a_folder.write_text("a file where the results folder should be")
    with pytest.raises(ResultsFolderError, match=f"results folder {not_a_folder}.* not writable"):
        run_many(["probe_counted"], micro, results_dir=not_a_folder)
    with pytest.raises(ResultsFolderError, match="not writable"):
        run_one("probe_counted", micro, results_dir=not_a_folder)
    import shutil as _shutil
    monkeypatch.setattr(_shutil, "disk_usage", lambda p: _shutil._ntuple_diskusage(10 << 30, 10 << 30, 0))
    with pytest.raises(ResultsFolderError, match=r"results folder .*full.* has 0 bytes free"):
        run_many(["probe_counted"], micro, results_dir=tmp_path / "full")
    assert main(["run", "probe_counted", "--suite", "micro", "--results", str(tmp_path / "full2"), "-q"]) == 2
    assert not merges, "no merge ran"


# ------------------------------------------------------------------ 5. records honour the umask
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_records_are_created_with_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = write_record({"status": "failed", "config_hash": "0" * 16, "method": {"pipeline": "x"}},
                            tmp_path / "micro" / "x.json")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == mode


# ------------------------------------------------------------------ 6. what --trust-pickle trusts
class _Reduce:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _legacy_torch_file(path, payload: bytes):
    """A torch.save file of the legacy format whose object pickle is ``payload`` (hand-written opcodes)."""
    from torch.serialization import MAGIC_NUMBER, PROTOCOL_VERSION

    sys_info = {"protocol_version": PROTOCOL_VERSION, "little_endian": True,
                "type_sizes": {"short": 2, "int": 4, "long": 4}}
    path.write_bytes(b"".join(pickle.dumps(x, protocol=2) for x in (MAGIC_NUMBER, PROTOCOL_VERSION, sys_info))
                     + payload + pickle.dumps([], protocol=2))


def _malicious(tmp_path, marker):
    files = {}
    for name, fn, arg in (("system", os.system, f"touch {marker}"),
                          ("exec", builtins.exec, f"open({str(marker)!r}, 'w').close()"),
                          ("eval", builtins.eval, f"open({str(marker)!r}, 'w').close()")):
        files[name] = tmp_path / f"{name}.pt"
        torch.save({"state_dict": {"w": torch.zeros(2)}, "x": _Reduce(fn, arg)}, files[name])
    files["getattr"] = tmp_path / "getattr.pt"  # getattr(__import__('os'), 'system')('touch marker')
    _legacy_torch_file(files["getattr"], b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vos\ntRVsystem\ntR(V"
                       + f"touch {marker}".encode() + b"\ntR.")
    files["__import__"] = tmp_path / "import.pt"
    _legacy_torch_file(files["__import__"], b"cbuiltins\n__import__\n(Vsubprocess\ntR.")
    return files


@pytest.mark.parametrize("fmt", ["task_vectors_pickle", "torch"])
def test_trust_pickle_refuses_every_global_outside_its_allow_list(tmp_path, monkeypatch, fmt):
    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "cache"))
    marker = tmp_path / "pwned"
    expected = {"system": r"(posix|os)\.system", "exec": r"builtins\.exec", "eval": r"builtins\.eval",
                "getattr": r"builtins\.getattr", "__import__": r"builtins\.__import__"}
    for name, path in _malicious(tmp_path, marker).items():
        with pytest.raises(checkpoints.CheckpointError, match=rf"{path.name}: refused to unpickle the global "
                                                      rf"{expected[name]}") as err:
            checkpoints.read_state_dict(path, fmt, trust_pickle=True)
        assert "inert placeholders" in str(err.value)
        assert not marker.exists(), f"{name}: the payload ran"
    assert not list((tmp_path / "cache").rglob("*.safetensors")), "nothing was converted"


def test_a_task_vectors_checkpoint_with_its_preprocessing_still_loads(tmp_path, monkeypatch):
    """What the task-vectors repository pickles: ImageEncoder(model=open_clip CLIP, train/val_preprocess)."""
    import open_clip
    from open_clip.transform import image_transform

    sys.path.insert(0, os.path.dirname(__file__))
    try:
        from test_real_suite import TINY, write_task_vectors_pickle
    finally:
        sys.path.pop(0)
    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    clip = open_clip.CLIP(**TINY).eval()
    clip.train_preprocess = image_transform(32, is_train=True)  # torchvision transforms and open_clip's own
    clip.val_preprocess = image_transform(32, is_train=False)
    path = tmp_path / "finetuned.pt"
    write_task_vectors_pickle(path, clip)
    state = checkpoints.visual_state(checkpoints.read_state_dict(path, "task_vectors_pickle", trust_pickle=True))
    for k, v in clip.visual.state_dict().items():
        assert torch.equal(state[k], v), k


# ------------------------------------------------------------------ 7. hyperparameter ranges and bad experts
def test_out_of_range_hyperparameters_are_refused_when_parsed(micro, results_dir):
    from mergebench.api.registry import HyperparameterError

    for spec, msg in (("ties_merging(k=0)", r"ties_merging: k=0.0 is outside its range \(0, 100\]"),
                      ("ties_merging(k=150)", r"k=150.0 is outside its range \(0, 100\]"),
                      ("task_arithmetic(scaling=-0.3)", r"task_arithmetic: scaling=-0.3 is outside its range \[0, inf\)"),
                      ("adamerging_taskwise(steps=0)", r"steps=0 is outside its range \[1, inf\)"),
                      ("surgery(base=ties_merging(k=-1))", r"ties_merging: k=-1.0")):
        with pytest.raises(HyperparameterError, match=msg):
            MethodCall.parse(spec).resolve()
    with pytest.raises(HyperparameterError, match=r"k=0.0 is outside"):
        run_one("ties_merging", micro, results_dir=results_dir, tune={"k": ["10", "0"]})
    with pytest.raises(HyperparameterError, match=r"k=0.0 is outside"):
        Sweep(["ties_merging"], suites=["micro"], grid={"k": [20, 0]}).calls()
    assert not results_dir.exists() or not list(results_dir.rglob("*.json"))
    MethodCall.parse("ties_merging(k=100)").resolve()  # the closed end is in the range
    assert MethodCall.parse("consensus_ta(scaling=None)").resolve().hparams["scaling"] is None


def test_ranges_are_declared_in_interval_notation(probe):
    @probe("probe_ranged", ranges={"k": "(0, 100]", "steps": "[1, inf)"})
    def ranged(ctx, k: float = 20.0, steps: int = 5, mode: str = "a"):
        return ctx.shared_model(ctx.pretrained_weights)

    spec = registry.get_method("probe_ranged")
    assert str(spec.hyperparameters["k"].range) == "(0, 100]" and spec.summary()["ranges"]["steps"] == "[1, inf)"
    with pytest.raises(ValueError, match="not an interval"):
        probe("probe_bad_range", ranges={"k": "0..100"})(ranged)
    with pytest.raises(ValueError, match="default.*k=200.0 is outside"):
        registry.register_method("probe_bad_default", ranges={"k": "(0, 100]"})(
            lambda ctx, k=200.0: ctx.shared_model(ctx.pretrained_weights))
    with pytest.raises(ValueError, match="'mode' is not a number"):
        probe("probe_str_range", ranges={"mode": "[0, 1]"})(ranged)
    with pytest.raises(ValueError, match="'nope', which is not one of its hyperparameters"):
        probe("probe_unknown_range", ranges={"nope": "[0, 1]"})(ranged)


@pytest.mark.parametrize("bad", ["int64", "nan"])
def test_an_expert_with_integer_or_non_finite_tensors_is_refused_at_load(micro, results_dir, bad):
    from mergebench.engine.run import InvalidExpertError

    task, key = micro.tasks[2], "transformer.resblocks.0.mlp.c_fc.weight"

    def load(t):
        w = Weights(micro.expert_weights(t))
        if t == task:
            w[key] = w[key].long() if bad == "int64" else w[key].clone().index_fill_(0, torch.tensor([0]), float("nan"))
        return w

    suite = Suite(name="micro-badexpert", tasks=micro.tasks, encoder_config=micro.encoder_config,
                  pretrained=micro.pretrained, heads=micro.heads, data=micro.data, load_expert=load,
                  info=dict(micro.info))
    msg = "torch.int64, not floating point" if bad == "int64" else "non-finite values"
    with pytest.raises(InvalidExpertError, match=rf"expert {task!r} of suite 'micro-badexpert': tensor {key!r}.*{msg}"):
        run_one("task_arithmetic", suite, results_dir=results_dir)
    rec, = run_many(["task_arithmetic"], suite, results_dir=results_dir)
    assert rec["status"] == "failed" and "InvalidExpertError" in rec["error"]
    assert not list(results_dir.rglob("*.json")), "no record blames the method"


# ------------------------------------------------------------------ 8. messages that name the file
def test_garbage_checkpoints_and_malicious_hf_bins_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "cache"))
    garbage = tmp_path / "expert.safetensors"
    garbage.write_bytes(os.urandom(512))
    with pytest.raises(checkpoints.CheckpointError, match=r"expert\.safetensors: cannot read it as safetensors"):
        checkpoints.read_state_dict(garbage)
    folder = tmp_path / "hf_expert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    marker = tmp_path / "pwned"
    torch.save({"vision_model.x": torch.zeros(2), "evil": _Reduce(os.system, f"touch {marker}")},
               folder / "pytorch_model.bin")
    with pytest.raises(checkpoints.CheckpointError) as err:
        checkpoints.read_state_dict(folder, "hf")
    msg = str(err.value)
    assert "pytorch_model.bin is not a plain state dict" in msg and "--trust-pickle only if you trust" in msg
    assert "convert it to model.safetensors" in msg and "weights_only=False" not in msg
    with pytest.raises(checkpoints.CheckpointError, match=r"pytorch_model\.bin: refused to unpickle the global (posix|os)\.system"):
        checkpoints.read_state_dict(folder, "hf", trust_pickle=True)
    assert not marker.exists()


def test_sweep_files_and_unknown_sweeps_are_one_line_errors(tmp_path, capsys):
    from mergebench.sweeps.sweep import SweepFileError

    bad = tmp_path / "sweep.yaml"
    bad.write_text("methods: [task_arithmetic\nseeds: {")
    with pytest.raises(SweepFileError, match=r"sweep config .*sweep\.yaml is not valid YAML"):
        Sweep.from_config(bad)
    assert main(["sweep", "--config", str(bad), "--results", str(tmp_path)]) == 2
    assert "sweep.yaml is not valid YAML" in capsys.readouterr().err
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "broken.yaml").write_text("- just\n- a list\n")
    assert main(["status", "broken", "--results", str(tmp_path)]) == 2
    assert "broken.yaml holds a list" in capsys.readouterr().err
    assert main(["status", "nope", "--results", str(tmp_path / "nowhere")]) == 2
    assert "no sweep 'nope'" in capsys.readouterr().err


def test_data_check_of_a_missing_root_says_so(tmp_path, capsys):
    assert main(["data", "check", "--root", str(tmp_path / "missing")]) == 2
    captured = capsys.readouterr()
    assert f"data root {tmp_path / 'missing'} does not exist" in captured.err and "MISSING" not in captured.out


def test_cli_reports_user_errors_by_type_and_keeps_tracebacks_for_bugs(monkeypatch, capsys):
    from mergebench.cli import status

    def buggy(args):
        raise KeyError("metrics")
    monkeypatch.setattr(status, "main", buggy)
    with pytest.raises(KeyError):  # a bug is not disguised as "error: 'metrics'"
        main(["status", "x"])

    def user_error(args):
        raise zoo.ManifestError("manifest m.yaml: no 'experts'")
    monkeypatch.setattr(status, "main", user_error)
    assert main(["status", "x"]) == 2 and capsys.readouterr().err == "error: manifest m.yaml: no 'experts'\n"


# ------------------------------------------------------------------ 9. time limits enforced from outside
SWALLOW = '''
import time
from mergebench import Paper, register_method

@register_method("probe_swallows", display_name="Swallows", paper=Paper("A probe", 2024, "0000.00000"))
def probe_swallows(ctx):
    """Loops forever and swallows every exception, the time limit's included."""
    while True:
        try:
            time.sleep(0.01)
            sum(range(1000))
        except Exception:
            pass
'''


@pytest.fixture
def swallow(install_plugin):
    """The looping method, as an entry-point plugin (so a sweep's worker processes have it too)."""
    install_plugin("swallow_probe", {"swallow_probe": SWALLOW})
    registry.discover_plugins(force=True)
    yield "probe_swallows"
    registry.unregister_method("probe_swallows")


def test_a_method_that_swallows_exceptions_is_stopped_at_its_time_limit(swallow, micro, results_dir):
    stuck, ta = run_many([swallow, "task_arithmetic"], micro, results_dir=results_dir, time_limit_s=1.0,
                         count_flops=False)
    assert stuck["status"] == "failed"
    assert stuck["error"] == "MethodTimeout: probe_swallows (merge and selection) exceeded its time limit of 1 s"
    assert json.loads(open(stuck["_path"]).read())["status"] == "failed"
    assert ta["status"] == "ok" and ta["time_limit_s"] == 1.0


def test_check_plugin_and_local_sweeps_enforce_the_limit(swallow, micro, results_dir):
    report = conformance.check_method(swallow, suite=micro, time_limit_s=1.0)
    check = next(c for c in report.checks if c.name == "within the time limit")
    assert check.status == conformance.FAIL and "exceeded its time limit of 1 s" in check.detail
    from mergebench.sweeps.executors import LocalExecutor

    sweep = Sweep([swallow, "task_arithmetic"], suites=["micro"], results_dir=str(results_dir), name="limited",
                  time_limit_s=1.0)
    run_sweep(sweep, LocalExecutor(jobs=1), log=lambda *a: None)
    states = {e["job"].pipeline: (e["state"], e.get("error", "")) for e in job_status(sweep.jobs())}
    assert states[swallow][0] == "failed" and "exceeded its time limit of 1 s" in states[swallow][1]
    assert states["task_arithmetic(scaling=0.3)"][0] == "done"


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "soon"])
def test_time_limits_that_are_not_positive_numbers_are_refused_when_parsed(value, capsys):
    for argv in (["run", "task_arithmetic", "--time-limit", value], ["sweep", "task_arithmetic", "--time-limit", value],
                 ["check-plugin", "task_arithmetic", "--time-limit", value]):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(argv)
        assert e.value.code == 2 and "--time-limit" in capsys.readouterr().err
    from mergebench.errors import InputError

    with pytest.raises(InputError, match="positive number of seconds"):
        Sweep(["task_arithmetic"], time_limit_s=float(value) if value != "soon" else value)


def test_a_time_limited_run_gives_the_numbers_of_one_without(micro, results_dir):
    """A limit changes who watches the worker, not what it computes."""
    rec = run_one("task_arithmetic", micro, results_dir=results_dir, time_limit_s=300, count_flops=False)
    clean = run_one("task_arithmetic", micro, results_dir=results_dir / "clean", count_flops=False)
    assert rec["status"] == "ok", rec.get("error")
    assert _numbers(rec) == _numbers(clean)
