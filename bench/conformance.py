"""The plugin conformance kit: ``mergebench check-plugin NAME`` (or ``check_method(NAME)`` in a test).

It runs a method on the micro suite (seconds) and checks what the harness relies on:

1. it is registered and listed, with complete metadata (display name, paper, docstring, data
   needs, typed hyperparameters whose defaults parse back from the command line);
2. it does not modify its inputs: the suite's pretrained weights, experts, heads, LoRA factors and data
   (fingerprints before/after, :mod:`mergebench.integrity`), nor the context's theta_0, which every stage of
   a pipeline shares;
3. it only uses the data kinds it declared (the context raises ``DataNotDeclaredError``), and
   uses some data if it declared any;
4. the parameters it declares as added match what the merged model stores
   (``adds_params=False`` => nothing beyond one backbone; ``True`` => something);
5. it returns a ``MergedModel`` with finite weights and finite outputs;
6. two runs under the same seed give identical weights and outputs;
7. it runs on CPU and, where present, on CUDA (outputs close to the CPU ones);
8. all of that within a time limit (``time_limit_s``, default 600 s; ``--time-limit``): the checks that run
   the method run in a child process that is killed at the deadline (:mod:`mergebench.limits`).

A sequential method (``needs="sequential"``) runs over the suite's task order; its final model is checked.

Every failed check says what to fix.
"""

from __future__ import annotations

import functools
import hashlib
import time
import typing
from dataclasses import dataclass, field

import torch

from mergebench import integrity, limits

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


def _merge(spec_name, suite, device, seed, budget="smoke"):
    from mergebench.context import MergeContext
    from mergebench.pipeline import MethodCall
    from mergebench.registry import get_method
    from mergebench.run import execute, seed_everything

    call = MethodCall(spec_name).with_budget(budget).resolve()
    seed_everything(seed)
    start = time.perf_counter()
    if get_method(call.name).needs == "sequential":
        # a sequential method runs over one task order (the suite's); its final model is checked
        from mergebench.sequential import run_order

        _, model, ctx = run_order(call, suite, list(suite.tasks), device, seed, "test", 1.0, False,
                                  lambda m, tasks: dict.fromkeys(tasks, 0.0), lambda m: None)
        return model, ctx, time.perf_counter() - start
    ctx = MergeContext(suite, call.needs(), device, seed, show_progress=False)
    model = execute(call, ctx)
    return model, ctx, time.perf_counter() - start


def _metadata(spec, report: Report):
    from mergebench.registry import NEEDS, Hyperparameter

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
    from mergebench.registry import discover_plugins, get_method, list_methods

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
        from mergebench.suites import get_suite
        suite = get_suite("micro-lora" if "lora" in spec.requires else "micro", verbose=False)
    devices = devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    work = functools.partial(_running_checks, name, suite, seed, devices, budget)
    if not time_limit_s:
        report.checks += work(lambda: None)
        return report
    start = "spawn" if "cuda" in devices else "fork"
    try:
        if start == "spawn":  # CUDA cannot run in a forked child: a fresh interpreter loads the suite and method
            if suite.reload is None:
                raise limits.ChildFailed(f"suite {suite.name!r} was not made by get_suite, so a fresh process "
                                         f"cannot load it; pass devices=['cpu']", "ValueError")
            work = functools.partial(_spawned_checks, name, spec.fn.__module__, suite.reload, seed, devices, budget)
        report.checks += limits.run_limited(work, time_limit_s, f"the checks of {name}", start)
    except limits.MethodTimeout as e:
        report.add("within the time limit", FAIL,
                   f"{e} (the process was killed): its merge on the {suite.name} suite did not finish; look for a "
                   f"loop that never ends or that swallows exceptions (`mergebench run {name} --suite micro "
                   f"--time-limit 60` shows where it is), or pass a longer --time-limit")
    except limits.ChildFailed as e:
        report.add("runs on cpu", FAIL, f"{e.type_name}: {e}")
    return report


def _spawned_checks(name, module, reload, seed, devices, budget, release) -> list[Check]:
    import importlib

    from mergebench.registry import discover_plugins

    discover_plugins()
    if module not in ("__main__", "__mp_main__"):
        importlib.import_module(module)
    return _running_checks(name, reload(), seed, devices, budget, release)


def _running_checks(name, suite, seed, devices, budget, release) -> list[Check]:
    """The checks that run the method (3-7 of the module docstring); in a child process under a time limit."""
    from mergebench.metrics import parameter_counts, tensor_bytes
    from mergebench.models import MergedModel
    from mergebench.registry import get_method

    spec = get_method(name)
    report = Report(name)
    before = integrity.fingerprints(suite)

    from mergebench.context import DataNotDeclaredError
    try:
        model, ctx, seconds = _merge(name, suite, "cpu", seed, budget)
    except DataNotDeclaredError as e:
        report.add("declared data only", FAIL, f"{e}")
        return report.checks
    except Exception as e:  # noqa: BLE001 - the method's own error, reported
        report.add("runs on cpu", FAIL, f"{type(e).__name__}: {e} (run it with `mergebench run {name} --suite micro` "
                                        f"to see the traceback)")
        return report.checks
    report.add("runs on cpu", PASS, f"merged in {seconds:.2f} s on the {suite.name} suite ({budget} budget)")

    after = integrity.fingerprints(suite)
    changed = [k for k, v in before.items() if after.get(k, v) != v]
    if ctx._pretrained is not None:  # the context's theta_0: what the next stage of a pipeline reads
        theta_0 = {k: v for k, v in suite.pretrained.items() if k in ctx._pretrained}
        changed += [f"pretrained {k!r} (ctx.pretrained_weights)" for k, v in ctx._pretrained.items()
                    if integrity.fingerprint(v) != integrity.fingerprint(theta_0[k])]
    report.add("inputs untouched", FAIL if changed else PASS,
               f"it modified {', '.join(changed[:5])} in place; work on copies (tau = ctx.task_vector(t) returns a "
               f"new tensor; avoid add_/mul_/copy_ on ctx.pretrained_weights, and on anything reached through "
               f"ctx.suite: its weights, heads and data are the harness's)" if changed else "")

    used = sorted({u["kind"] for u in ctx.data_used.values()})
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

    again, _, _ = _merge(name, suite, "cpu", seed, budget)
    same_weights = _hash_tensors(dict(model.state_dict())) == _hash_tensors(dict(again.state_dict()))
    same_out = all(torch.equal(o, p) for o, p in zip(outputs.values(), _probe_outputs(again, suite, "cpu").values()))
    report.add("deterministic under a seed", PASS if same_weights and same_out else FAIL,
               "" if same_weights and same_out else
               "two runs with the same seed differ; draw randomness from torch's seeded generator (the harness seeds "
               "it with ctx.seed) or torch.Generator().manual_seed(ctx.seed), not from time, os.urandom or "
               "unseeded generators")

    if "cuda" in devices:
        try:
            gpu_model, _, seconds = _merge(name, suite, "cuda", seed, budget)
            gpu_out = _probe_outputs(gpu_model, suite, "cuda")
            close = all(torch.allclose(o, g, atol=1e-2, rtol=1e-2) for o, g in zip(outputs.values(), gpu_out.values()))
            report.add("runs on cuda", PASS if close else WARN,
                       f"merged in {seconds:.2f} s" + ("" if close else "; outputs differ from CPU beyond 1e-2"))
        except Exception as e:  # noqa: BLE001
            report.add("runs on cuda", FAIL, f"{type(e).__name__}: {e}; create tensors on ctx.device "
                                             f"(torch.zeros(..., device=ctx.device)), not on the default device")
    else:
        report.add("runs on cuda", SKIP, "no CUDA device here")
    return report.checks


def check_plugin(name: str, **kwargs) -> list[Report]:
    """Check a method by name, or every method a plugin distribution / entry point registers."""
    from importlib.metadata import entry_points

    from mergebench.registry import ENTRY_POINT_GROUP, METHODS, discover_plugins, list_methods

    discover_plugins()
    if name in METHODS or any(ch in name for ch in "*?["):
        names = list_methods(name) or [name]
    else:
        modules = {ep.value.split(":")[0] for ep in entry_points(group=ENTRY_POINT_GROUP)
                   if ep.name == name or (ep.dist and ep.dist.name.replace("_", "-") == name.replace("_", "-"))}
        names = sorted(n for n in METHODS.names() if METHODS.module_of(n) in modules) or [name]
    return [check_method(n, **kwargs) for n in names]
