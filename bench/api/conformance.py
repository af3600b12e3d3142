"""The plugin conformance kit: ``mergebench check-plugin NAME`` (or ``check_method(NAME)`` in a test).

It runs a method on the micro suite (seconds) and checks what the harness relies on:

1. it is registered and listed, with complete metadata (display name, paper, docstring, data
   needs, typed hyperparameters whose defaults parse back from the command line);
2. it does not modify its inputs: the pretrained weights, experts, heads, LoRA factors and data its worker
   holds (fingerprints before/after, :mod:`mergebench.engine.integrity`), nor the context's theta_0, which every stage
   of a pipeline shares;
3. it only uses the data kinds it declared (the context raises ``DataNotDeclaredError``), and
   uses some data if it declared any;
4. the parameters it declares as added match what the merged model stores
   (``adds_params=False`` => nothing beyond one backbone; ``True`` => something);
5. it returns a ``MergedModel`` with finite weights and finite outputs;
6. two runs under the same seed give identical weights and outputs;
7. it runs on CPU and, where present, on CUDA (outputs close to the CPU ones);
8. all of that within a time limit (``time_limit_s``, default 600 s; ``--time-limit``);
9. it ends normally (no exit, signal or crash of its process), leaves global torch state as it found it and
   leaves no thread or process running.

Each merge runs as in ``mergebench run``: in a worker process of its own that holds only what the method
declared (:mod:`mergebench.engine.worker`), killed at the deadline; whatever ended it is reported as the check it fails.

A sequential method (``needs="sequential"``) runs over the suite's task order; its final model is checked.

Every failed check says what to fix.
"""

from __future__ import annotations

import hashlib
import time
import typing
from dataclasses import dataclass, field
from importlib.metadata import entry_points

import torch

from mergebench.engine import limits
from mergebench.api.models import MergedModel
from mergebench.api.registry import (
    ENTRY_POINT_GROUP, Hyperparameter, METHODS, NEEDS, discover_plugins, get_method, list_methods,
)
from mergebench.engine.metrics import parameter_counts, tensor_bytes
from mergebench.engine.run import merge_in_worker, sequential_in_worker
from mergebench.engine.runspec import RunSpec
from mergebench.engine.worker import Limits, WorkerFailed
from mergebench.suites import get_suite

DEFAULT_TIME_LIMIT_S = 600.0

PASS, FAIL, WARN, SKIP = "pass", "FAIL", "warn", "skip"


@dataclass
class Check:
    name: str
    status: str
    detail: str = ""  # on failure: what to fix


@dataclass
class Report:
    method: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.status != FAIL for c in self.checks)

    def add(self, name, status, detail=""):
        self.checks.append(Check(name, status, detail))

    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == FAIL]

    def render(self) -> str:
        lines = [f"check-plugin {self.method}: {'PASSED' if self.ok else 'FAILED'}"]
        for c in self.checks:
            lines.append(f"  [{c.status:4}] {c.name}" + (f": {c.detail}" if c.detail else ""))
        return "\n".join(lines)


def _hash_tensors(tensors: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()




def _probe_outputs(model, suite, device) -> dict[str, torch.Tensor]:
    out = {}
    with torch.no_grad():
        for task in suite.tasks:
            x = suite.normalize(suite.split("test", task).images[:8].to(device))
            out[task] = model.to(device).eval()(x, task).float().cpu()
    return out


def _merge(spec_name, suite, device, seed, budget="smoke", limits=None):
    """The method's merge in its own worker, as ``mergebench run`` does it: (model, worker fields, seconds)."""
    start = time.perf_counter()
    # a sequential method runs over one task order (the suite's); its final model is checked
    spec = RunSpec.build(spec_name, suite, seed=seed, device=device, budget=budget, orders=[list(suite.tasks)])
    if spec.sequential:
        last = {}

        def keep(i, model, seen):
            last["model"] = model
            return dict.fromkeys(seen, 0.0)

        out = sequential_in_worker(spec, suite, limits=limits, on_step=keep, what=f"the checks of {spec_name}")
        out["data_used"] = [u for o in out["orders"] for u in o["data_used"].values()]
        return last.get("model"), out, time.perf_counter() - start
    model, out = merge_in_worker(spec, suite, limits=limits, reuse_bases=False, what=f"the checks of {spec_name}")
    return model, out, time.perf_counter() - start


def _metadata(spec, report: Report):
    problems = []
    if not spec.display_name or spec.display_name == spec.name:
        problems.append("give it a display name: register_method(..., display_name='My Method')")
    if spec.paper is None or not spec.paper.title:
        problems.append("cite the paper: register_method(..., paper=Paper(title, year, arxiv, venue))")
    elif not spec.paper.year or not (spec.paper.arxiv or spec.paper.venue or spec.paper.code):
        problems.append("complete the Paper: a year and an arXiv id, venue or code URL")
    if not spec.doc.strip():
        problems.append("write a docstring on the method function (one line: the update rule)")
    if spec.needs not in NEEDS:
        problems.append(f"needs must be one of {list(NEEDS)}")
    hints = typing.get_type_hints(spec.fn) if hasattr(spec.fn, "__annotations__") else {}
    for name, hp in spec.hyperparameters.items():
        if name == "base":
            continue
        if name not in hints:
            problems.append(f"annotate hyperparameter {name!r} with its type (e.g. {name}: float = ...) so the CLI "
                            f"can parse it")
            continue
        try:
            if isinstance(hp, Hyperparameter) and hp.default is not None and hp.parse(str(hp.default)) != hp.default:
                problems.append(f"the default of {name!r} ({hp.default!r}) does not parse back from the command line "
                                f"as {hp.type}")
        except Exception as e:  # noqa: BLE001 - report whatever parsing raised
            problems.append(f"the default of {name!r} does not parse back from the command line: {e}")
    report.add("complete metadata", FAIL if problems else PASS, "; ".join(problems))
    if spec.paper and spec.paper.title.upper().startswith("TODO"):
        report.add("paper", WARN, "replace the scaffold's placeholder Paper(...) with the method's paper")
    differ = {k: (spec.hyperparameters[k].default, v) for k, v in spec.paper_budget.items()
              if spec.hyperparameters[k].default != v}
    report.add("defaults are the paper's budget", FAIL if differ else PASS,
               "; ".join(f"{k} defaults to {d!r} but the declared paper budget is {v!r}: make the default the "
                         f"paper's and use register_method(..., smoke={{{k!r}: ...}}) for quick runs"
                         for k, (d, v) in differ.items()))
    if not spec.defaults_source:
        report.add("defaults source", WARN, "say where the default hyperparameters come from "
                                            "(register_method(..., defaults_source='...'))")


def check_method(name: str, suite=None, seed: int = 0, devices: list[str] | None = None,
                 budget: str = "smoke", time_limit_s: float | None = DEFAULT_TIME_LIMIT_S) -> Report:
    """Run the conformance checks on method ``name`` (the micro suite by default) under ``budget`` (the method's
    declared smoke budget by default, so that a method with a long paper schedule is checked in seconds).

    The checks that run the method do so in a child process killed after ``time_limit_s`` seconds (``None``: in
    this process, without a limit)."""
    time_limit_s = limits.check_seconds(time_limit_s)

    report = Report(name)
    errors = discover_plugins()
    try:
        spec = get_method(name)
    except KeyError as e:
        hint = f" Plugin load errors: {errors}" if errors else ""
        report.add("registered", FAIL, f"{e}. Install the plugin (pip install -e .) and declare the entry point "
                                       f"[project.entry-points.\"mergebench.methods\"] in its pyproject.toml.{hint}")
        return report
    report.add("registered", PASS, f"{spec.source}")
    report.add("listed", PASS if name in list_methods() else FAIL,
               "" if name in list_methods() else "list_methods() does not return it")
    _metadata(spec, report)

    if suite is None:
        suite = get_suite("micro-lora" if "lora" in spec.requires else "micro", verbose=False)
    devices = devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    report.checks += _running_checks(name, suite, seed, devices, budget, time_limit_s)
    return report


# what ended a worker without a model, as check-plugin names it: (check, what to fix)
_ENDINGS = {
    "DataNotDeclaredError": ("declared data only", "declare the data it uses in register_method(needs=...)"),
    "InputsModifiedError": ("inputs untouched", "work on copies (tau = ctx.task_vector(t) returns a new tensor; avoid "
                                                "add_/mul_/copy_ on ctx.pretrained_weights and on the experts "
                                                "ctx.per_tensor streams)"),
    "GlobalStateChangedError": ("leaves global state as it found it", ""),
    "WorkerExited": ("ends normally", "a method returns its model: no sys.exit, os._exit or argparse parsing of "
                                      "the command line inside it, no signal to its own process"),
    "MethodTimeout": ("within the time limit", ""),
    "MemoryLimitExceeded": ("within the memory limit", ""),
}


def _running_checks(name, suite, seed, devices, budget, time_limit_s) -> list[Check]:
    """The checks that run the method (3-8 of the module docstring), each merge in a worker process of its own
    (:mod:`mergebench.engine.worker`), as a run does it."""
    spec = get_method(name)
    report = Report(name)
    deadline = None if time_limit_s is None else time.monotonic() + time_limit_s

    def limits():
        left = None if deadline is None else max(0.01, deadline - time.monotonic())
        return Limits(left, stated_seconds=time_limit_s)

    try:
        model, out, seconds = _merge(name, suite, "cpu", seed, budget, limits())
    except WorkerFailed as e:
        check, fix = _ENDINGS.get(e.type_name, ("runs on cpu", f"run it with `mergebench run {name} --suite micro` "
                                                               f"to see the traceback"))
        if "must return a MergedModel" in str(e):
            check, fix = "returns a MergedModel", "return ctx.shared_model(weights) or a MergedModel subclass"
        if e.type_name == "MethodTimeout":
            fix = (f"its merge on the {suite.name} suite did not finish; look for a loop that never ends or that "
                   f"swallows exceptions, or pass a longer --time-limit")
        report.add(check, FAIL, f"{e.type_name}: {e}" + (f" ({fix})" if fix else ""))
        return report.checks
    report.add("runs on cpu", PASS, f"merged in {seconds:.2f} s on the {suite.name} suite ({budget} budget)")
    report.add("inputs untouched", FAIL if out.get("pretrained_modified") else PASS,
               f"it modified {', '.join(out.get('pretrained_modified', [])[:5])} in place, which the next stage of "
               f"a pipeline reads; {_ENDINGS['InputsModifiedError'][1]}" if out.get("pretrained_modified") else "")
    left = out.get("left_running", [])
    report.add("leaves nothing running", FAIL if left else PASS,
               f"it left {', '.join(left[:5])} running when it returned (they were ended with its process); join "
               f"the threads and wait for the processes it starts before returning" if left else "")
    report.add("leaves global state as it found it", PASS)

    used = sorted({u["kind"] for u in out["data_used"]})
    if spec.needs in ("unlabeled", "labeled") and not used:
        report.add("declared data only", WARN, f"declares needs={spec.needs!r} but used no data; "
                                               f"declare needs='nothing' so budgets list it as data-free")
    else:
        report.add("declared data only", PASS, f"used: {', '.join(used) or 'no data'}")

    if not isinstance(model, MergedModel):
        report.add("returns a MergedModel", FAIL, f"got {type(model).__name__}; return ctx.shared_model(weights) or a "
                                                  f"MergedModel subclass")
        return report.checks
    nonfinite = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
                 if t.is_floating_point() and not torch.isfinite(t).all()]
    outputs = _probe_outputs(model, suite, "cpu")
    bad_out = [t for t, o in outputs.items() if not torch.isfinite(o).all()]
    report.add("finite", FAIL if nonfinite or bad_out else PASS,
               (f"non-finite weights in {nonfinite[:3]}" if nonfinite else "")
               + (f" non-finite outputs on {bad_out}" if bad_out else ""))

    backbone = list(suite.pretrained.values())
    params = parameter_counts(model, sum(v.numel() for v in backbone), sum(tensor_bytes(v) for v in backbone))
    if not spec.adds_params and params["added"] > 0:  # fewer (RMM skipping blocks) adds nothing
        report.add("added parameters", FAIL, f"declares adds_params=False but the merged model stores "
                                             f"{params['added']:,} parameters beyond one backbone; declare "
                                             f"adds_params=True, or return one encoder (ctx.shared_model)")
    elif spec.adds_params and params["added"] <= 0:
        report.add("added parameters", FAIL, "declares adds_params=True but stores nothing beyond one backbone; "
                                             "declare adds_params=False")
    else:
        report.add("added parameters", PASS, f"{params['added']:,} added ({params['added_pct']:.2f}% of the backbone)")

    try:
        again, _, _ = _merge(name, suite, "cpu", seed, budget, limits())
    except WorkerFailed as e:
        report.add("deterministic under a seed", FAIL, f"the second run failed: {e.type_name}: {e}")
        return report.checks
    same_weights = _hash_tensors(dict(model.state_dict())) == _hash_tensors(dict(again.state_dict()))
    same_out = all(torch.equal(o, p) for o, p in zip(outputs.values(), _probe_outputs(again, suite, "cpu").values()))
    report.add("deterministic under a seed", PASS if same_weights and same_out else FAIL,
               "" if same_weights and same_out else
               "two runs with the same seed differ; draw randomness from torch's seeded generator (the harness seeds "
               "it with ctx.seed) or torch.Generator().manual_seed(ctx.seed), not from time, os.urandom or "
               "unseeded generators")

    if "cuda" in devices:
        try:
            gpu_model, _, seconds = _merge(name, suite, "cuda", seed, budget, limits())
            gpu_out = _probe_outputs(gpu_model, suite, "cuda")
            close = all(torch.allclose(o, g, atol=1e-2, rtol=1e-2) for o, g in zip(outputs.values(), gpu_out.values()))
            report.add("runs on cuda", PASS if close else WARN,
                       f"merged in {seconds:.2f} s" + ("" if close else "; outputs differ from CPU beyond 1e-2"))
        except Exception as e:  # noqa: BLE001
            e = f"{e.type_name}: {e}" if isinstance(e, WorkerFailed) else f"{type(e).__name__}: {e}"
            report.add("runs on cuda", FAIL, f"{e}; create tensors on ctx.device "
                                             f"(torch.zeros(..., device=ctx.device)), not on the default device")
    else:
        report.add("runs on cuda", SKIP, "no CUDA device here")
    return report.checks


def check_plugin(name: str, **kwargs) -> list[Report]:
    """Check a method by name, or every method a plugin distribution / entry point registers."""
    discover_plugins()
    if name in METHODS or any(ch in name for ch in "*?["):
        names = list_methods(name) or [name]
    else:
        modules = {ep.value.split(":")[0] for ep in entry_points(group=ENTRY_POINT_GROUP)
                   if ep.name == name or (ep.dist and ep.dist.name.replace("_", "-") == name.replace("_", "-"))}
        names = sorted(n for n in METHODS.names() if METHODS.module_of(n) in modules) or [name]
    return [check_method(n, **kwargs) for n in names]
