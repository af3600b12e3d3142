"""The runner: one method spec on one suite -> one record. Failures are records too.

The harness does devices, seeds, data, timing, counting and the record; the method only merges.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import random
import sys
import time
import traceback
from pathlib import Path

import torch

from mergebench import basecache, integrity, limits, memory
from mergebench.context import PRECISIONS, MergeContext, resolve_precision
from mergebench.errors import InputError, MergebenchError
from mergebench.evaluate import evaluate
from mergebench.io import atomic_write_text, cache_root, check_writable
from mergebench.limits import MethodTimeout  # noqa: F401  (re-exported: the error of a run past its time limit)
from mergebench.metrics import model_macs, parameter_counts, tensor_bytes
from mergebench.models import MergedModel
from mergebench.pipeline import MethodCall
from mergebench.records import config_hash, environment, find_ok, load_records, now, record_path, write_record
from mergebench.registry import get_method
from mergebench.sequential import (DEFAULT_ORDERS, check_sequential, merge_data_used, run_order, summarize,
                                   task_orders)
from mergebench.suites.base import Suite

DEFAULT_RESULTS = Path("results")


class MethodFailed(RuntimeError):
    pass


class ArchitectureMismatchError(MergebenchError, ValueError):
    """An expert does not have the pretrained model's architecture (keys or shapes differ)."""


class InvalidExpertError(MergebenchError, ValueError):
    """An expert's tensor is not floating point, or holds NaN or inf: a bad checkpoint, not a method's fault."""


def check_architectures(suite: Suite) -> None:
    """Every expert must have the pretrained encoder's tensors (same names, same shapes).

    Raises :class:`ArchitectureMismatchError` naming the expert and the first differences, and
    :class:`InvalidExpertError` naming the expert (or the pretrained encoder) and the tensor when a tensor is
    not floating point where the pretrained one is, or is not finite. Checked once per suite object; then the
    suite's fingerprints are taken (:mod:`mergebench.integrity`), against which every method is checked.
    """
    integrity.check_unmodified(suite)
    if getattr(suite, "_architectures_checked", False):
        return
    _check_values(suite, "the pretrained encoder", suite.pretrained)
    reference = {k: tuple(v.shape) for k, v in suite.pretrained.items()}
    for task in suite.tasks:
        expert = suite.expert_weights(task)
        missing = sorted(set(reference) - set(expert))
        extra = sorted(set(expert) - set(reference))
        shapes = [f"{k}: {tuple(expert[k].shape)} vs pretrained {reference[k]}"
                  for k in reference if k in expert and tuple(expert[k].shape) != reference[k]]
        if missing or extra or shapes:
            bits = ([f"missing {missing[:3]}"] if missing else []) + ([f"unexpected {extra[:3]}"] if extra else []) \
                + ([f"shape {'; '.join(shapes[:3])}"] if shapes else [])
            raise ArchitectureMismatchError(
                f"expert {task!r} of suite {suite.name!r} does not match the pretrained encoder ({', '.join(bits)}); "
                f"every expert must be fine-tuned from the same pretrained backbone: rebuild the suite "
                f"(`mergebench build {suite.name}`) or replace that checkpoint")
        _check_values(suite, f"expert {task!r}", expert)
    integrity.record_baseline(suite)
    suite._architectures_checked = True


def _check_values(suite: Suite, what: str, weights) -> None:
    for key, t in weights.items():
        ref = suite.pretrained[key]
        if ref.is_floating_point() and not t.is_floating_point():
            raise InvalidExpertError(
                f"{what} of suite {suite.name!r}: tensor {key!r} is {t.dtype}, not floating point like the "
                f"pretrained encoder's ({ref.dtype}); save the checkpoint with its floating-point weights")
        if t.is_floating_point():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise InvalidExpertError(
                    f"{what} of suite {suite.name!r}: tensor {key!r} has {bad:,} non-finite values (NaN or inf); the "
                    f"checkpoint is damaged: replace it (every merge on it would fail, whatever the method)")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def seed_everything(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed)
    except ImportError:  # numpy is optional
        pass


def execute(call: MethodCall, ctx: MergeContext, timings: dict | None = None, reuse_bases: bool = True) -> MergedModel:
    """Run a resolved pipeline: bases first, then each add-on on the model its base returned.

    Every stage starts from the run's seed, so an add-on draws the same randomness whether its base ran or came
    from the base cache (:mod:`mergebench.basecache`, used unless ``reuse_bases=False``).
    """
    spec = get_method(call.name)
    kwargs = dict(call.hparams)
    if "base" in kwargs:
        kwargs["base"] = _execute_base(kwargs["base"], ctx, timings, reuse_bases)
    seed_everything(ctx.seed)
    start = time.perf_counter()
    model = spec.fn(ctx, **kwargs)
    if timings is not None:
        timings[str(call.name)] = round(time.perf_counter() - start, 4)
    if not isinstance(model, MergedModel):
        raise MethodFailed(f"{call.name} returned {type(model).__name__}; a method must return a MergedModel "
                           f"(e.g. ctx.shared_model(weights))")
    return model


def _execute_base(call: MethodCall, ctx: MergeContext, timings: dict | None, reuse: bool) -> MergedModel:
    """The base of an add-on: from the base cache, or run (and then cached) with what it used and logged."""
    if reuse:
        hit = basecache.lookup(call, ctx)
        if hit is not None:
            ctx.add_usage(hit.data_used, hit.logs)
            ctx.cached_bases.append({"pipeline": str(call), "seconds": round(hit.seconds, 4)})
            if timings is not None:
                timings[str(call.name)] = round(hit.seconds, 4)
            return hit.model
    used, logged = ctx.usage_snapshot()
    start = time.perf_counter()
    model = execute(call, ctx, timings, reuse)
    seconds = time.perf_counter() - start
    if reuse:
        data, logs = ctx.usage_since(used, logged)
        basecache.store(call, ctx, basecache.CachedBase(model, seconds, data, logs))
    return model


def _check_finite(model: MergedModel):
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise MethodFailed(f"the merged model has non-finite values in {name!r}")


def reference_accuracy(suite: Suite, device="cpu", split: str = "test") -> dict[str, float]:
    """Each expert's accuracy on its own task (the denominator of normalized accuracy), cached."""
    key = config_hash({"suite": suite.info.get("checkpoints"), "split": split, "name": suite.name})
    path = cache_root() / "reference" / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    from mergebench.models import SharedModel

    acc = {}
    for task in suite.tasks:
        expert = SharedModel(suite.build_encoder({**suite.pretrained, **suite.expert_weights(task)}))
        acc[task] = evaluate(expert, suite, split, device, tasks=[task])["accuracy"][task]
    atomic_write_text(path, json.dumps(acc))
    return acc


def loop_rates(ctx: MergeContext) -> dict:
    """{loop: {"steps", "seconds", "steps_per_s"}} of the method's progress loops (optimisation steps, episodes)."""
    return {desc: {"steps": v["steps"], "seconds": round(v["seconds"], 3),
                   "steps_per_s": round(v["steps"] / v["seconds"], 3) if v["seconds"] > 0 else None}
            for desc, v in ctx.loops.items()}


def _peak_memory_mb(device: torch.device) -> dict:
    """The run's peak memory: the CUDA allocator's, or on the CPU the process's resident high-water mark since
    the run's measurement started (Linux), else over the process's lifetime."""
    if device.type == "cuda":
        return {"peak_gpu_mb": round(memory.peak_cuda_bytes(device) / 2**20, 1)}
    return memory.host_peak_mb()


def run_config(call: MethodCall, suite: Suite, seed: int = 0, unlabeled_split: str = "test",
               data_fraction: float = 1.0, tune: dict[str, list] | None = None,
               orders: list[list[str]] | None = None, precision: str = "auto") -> dict:
    """What determines a run's result; its hash (``config_hash``) names the record (sweeps use it too).

    ``orders`` (the task orders of a sequential run) is added only for that protocol, so one-shot hashes are stable;
    a method declared ``needs="sequential"`` gets the default orders when none are given (as ``run_method`` does).
    ``precision`` (of the test-time adaptation loops, ``MergeContext.autocast``) is added only for pipelines with a
    stage of that family, the only ones it can change; "auto" is resolved for this machine's default device
    (:func:`mergebench.context.resolve_precision`).
    """
    if orders is None and get_method(call.name).needs == "sequential":
        orders = task_orders(suite.tasks, DEFAULT_ORDERS, seed)
    config = {"pipeline": str(call), "suite": suite.info.get("cache_key") or suite.info.get("checkpoints"),
              "checkpoints": suite.info.get("checkpoints"), "seed": seed,
              "data": {"unlabeled_split": unlabeled_split, "fraction": data_fraction},
              "tune": {k: list(v) for k, v in (tune or {}).items()}}
    if uses_precision(call):
        config["precision"] = resolve_precision(precision, resolve_device("auto"))
    if orders is not None:
        config.update({"protocol": "sequential", "orders": [list(o) for o in orders]})
    return config


def reusable_hashes(config: dict, requested_precision: str = "auto") -> list[str]:
    """The configuration hashes whose ok record a run may reuse, its own first. Under ``--precision auto`` a
    test-time adaptation run also reuses the record of the other precision: auto picks whichever the hardware
    multiplies fastest, so records made on a machine with bfloat16 hardware serve one without it and the other
    way round (each record says which it ran at); an explicit precision asks for that one alone."""
    own = config_hash(config)
    if requested_precision != "auto" or "precision" not in config:
        return [own]
    return [own] + [config_hash({**config, "precision": p}) for p in PRECISIONS
                    if p not in ("auto", config["precision"])]


def uses_precision(call: MethodCall) -> bool:
    """Whether the run's ``precision`` can change ``call``'s result: a stage is a test-time adaptation method."""
    return any(get_method(s.name).family == "test-time adaptation" for s in call.stages())


def resolve_protocol(call: MethodCall, protocol: str | None) -> str:
    """``None``: a method declared ``needs='sequential'`` runs sequentially, every other one-shot."""
    native = get_method(call.name).needs == "sequential"
    if protocol is None:
        return "sequential" if native else "one-shot"
    if protocol not in ("one-shot", "sequential"):
        raise InputError(f"unknown protocol {protocol!r}; use 'one-shot' or 'sequential'")
    if protocol == "one-shot" and native:
        raise InputError(f"{call.name} is a sequential method (experts arrive one at a time); run it with "
                         f"--protocol sequential")
    return protocol


def run_method(method: str | MethodCall, suite: Suite, results_dir=DEFAULT_RESULTS, seed: int = 0,
               device="auto", force: bool = False, unlabeled_split: str = "test", data_fraction: float = 1.0,
               tune: dict[str, list] | None = None, show_progress: bool = True, count_flops: bool = True,
               write: bool = True, time_limit_s: float | None = None, protocol: str | None = None,
               orders: int | list[list[str]] = DEFAULT_ORDERS, budget: str = "paper",
               precision: str = "auto") -> dict:
    """Merge with ``method`` on ``suite``, evaluate, measure and write one record.

    ``protocol="sequential"`` (the default for methods declared ``needs="sequential"``) runs the continual
    protocol of :mod:`mergebench.sequential` over ``orders`` task orders (a count of seeded random
    permutations, or the orders themselves); see :func:`_sequential`.

    ``tune`` ({hyperparameter: [values]}) selects those values on the validation split (the
    task-vectors protocol) before the test evaluation; otherwise hyperparameters are fixed.
    A configuration that already has an ok record is returned as is unless ``force``.
    Exceptions inside the method become a record with ``status: failed``; so does a method that changed
    the suite's weights, heads or data in place (the suite is then loaded again, :mod:`mergebench.integrity`).

    ``precision``: of the test-time adaptation loops' forward and backward passes, "bf16" (bfloat16 autocast),
    "fp32" (:meth:`MergeContext.autocast`) or "auto" (the default: bf16 where the device multiplies bfloat16
    natively, else fp32; :func:`mergebench.context.resolve_precision`); the resolved value is stored in the record
    (and, for the pipelines it can change, in its configuration).

    ``time_limit_s``: the merge (validation selection included; for the sequential protocol every order with
    its evaluations) runs in a child process that is killed at the deadline (:mod:`mergebench.limits`); the run
    is recorded as failed with "exceeded its time limit of N s".
    """
    device = resolve_device(device)
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; use one of {list(PRECISIONS)}")
    requested_precision, precision = precision, resolve_precision(precision, device)
    time_limit_s = limits.check_seconds(time_limit_s)
    check_architectures(suite)
    call = MethodCall.parse(method).with_budget(budget).resolve()
    for name, values in (tune or {}).items():  # unknown names and out-of-range values are errors before any work
        for value in values:
            call.with_hparams(**{name: value}).resolve()
    protocol = resolve_protocol(call, protocol)
    order_list = None
    if protocol == "sequential":
        if tune:
            raise InputError("--tune (validation selection) is not available under the sequential protocol")
        adapter = check_sequential(call)
        order_list = task_orders(suite.tasks, orders, seed)
    config = run_config(call, suite, seed, unlabeled_split, data_fraction, tune, order_list, precision)
    chash = config_hash(config)
    path = record_path(results_dir, suite.name, ("sequential_" if order_list else "") + str(call), chash)
    if not force and write:
        for h in reusable_hashes(config, requested_precision):
            done = find_ok(results_dir, suite.name, h)
            if done is not None:
                done["skipped"] = True
                return done
    if write:  # before any merge work: a record that cannot be written loses the work
        check_writable(path.parent)

    spec = get_method(call.name)
    record = {
        "config_hash": chash, "status": "running", "created": now(),
        "method": {"name": call.name, "display_name": spec.display_name, "pipeline": str(call),
                   "hparams": call.plain_hparams(), "needs": sorted(call.needs()),
                   "adds_params": any(get_method(s.name).adds_params for s in call.stages()),
                   "paper": spec.paper.cite() if spec.paper else None, "source": spec.source,
                   "family": spec.family},
        "budget": {"requested": budget, "below_paper": call.below_paper_budget()},
        "suite": {"name": suite.name, "tasks": suite.tasks, **suite.info}, "seed": seed, "device": str(device),
        "precision": precision, "config": config, "env": environment(),
    }
    if time_limit_s:
        record["time_limit_s"] = time_limit_s
    if order_list is not None:
        record["protocol"] = "sequential"
        record["sequential"] = {"orders": order_list, "adapter": adapter}
    measure = functools.partial(_measure, call=call, suite=suite, device=device, seed=seed,
                                unlabeled_split=unlabeled_split, data_fraction=data_fraction, tune=tune,
                                show_progress=show_progress, count_flops=count_flops, order_list=order_list,
                                precision=precision)
    if time_limit_s:
        what = f"{call.name} ({'all task orders, evaluation included' if order_list else 'merge and selection'})"
        updates = _run_limited(measure, call, suite, device, time_limit_s, what)
    else:
        updates = measure(release=lambda: None)
    modified = updates.pop("_inputs_modified", None)
    record["env"]["threads"] = updates.pop("_threads", record["env"]["threads"])
    record["method"].update(updates.pop("method", {}))
    if "sequential" in updates:
        record["sequential"].update(updates.pop("sequential"))
    record.update(updates)
    if modified and not time_limit_s:  # a child's changes died with it; here the suite itself was changed
        restored = integrity.restore(suite, call.name)
        record["error"] += ("; the suite was loaded again from its files" if restored else
                            "; the suite cannot be loaded again (no reload), so later runs on it refuse to start")
    record["finished"] = now()
    if write:
        record["_path"] = str(write_record(record, path))
    return record


def _run_limited(measure, call: MethodCall, suite: Suite, device, seconds: float, what: str) -> dict:
    """``measure`` in a child process killed at the deadline; a timeout or a dead child is a failed record."""
    start = limits.start_method(device)
    try:
        if start == "spawn":
            measure = _spawnable(measure, call, suite)
        return limits.run_limited(measure, seconds, what, start)
    except MethodTimeout as e:
        return {"status": "failed", "error": f"MethodTimeout: {e}", "traceback": ""}
    except limits.ChildFailed as e:
        return {"status": "failed", "error": f"{e.type_name}: {e}", "traceback": e.child_traceback}
    except MergebenchError as e:  # cannot be run in a fresh process
        return {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": ""}


def _spawnable(measure: functools.partial, call: MethodCall, suite: Suite) -> functools.partial:
    """``measure`` for a fresh interpreter: the suite as its recipe, the method's modules to import."""
    if suite.reload is None:
        raise InputError(f"a time limit on CUDA runs the merge in a fresh process, which loads suite {suite.name!r} "
                         f"again; this suite object was not made by get_suite, so it cannot be")
    modules = []
    for stage in call.stages():
        fn = get_method(stage.name).fn
        if "<locals>" in fn.__qualname__:
            raise InputError(f"a time limit on CUDA runs the merge in a fresh process, which must import "
                             f"{stage.name}; it is defined inside a function ({fn.__module__}.{fn.__qualname__}): "
                             f"define it at module level of an importable module (or an entry-point plugin)")
        modules.append(fn.__module__)
    kwargs = {k: v for k, v in measure.keywords.items() if k != "suite"}
    return functools.partial(_spawned_measure, suite.reload, modules, kwargs)


def _spawned_measure(reload, modules: list[str], kwargs: dict, release) -> dict:
    import importlib

    from mergebench.registry import discover_plugins

    discover_plugins()
    for module in modules:
        if module not in ("__main__", "__mp_main__"):
            importlib.import_module(module)
    suite = reload()
    check_architectures(suite)
    return _measure(release, suite=suite, **kwargs)


def _measure(release, call: MethodCall, suite: Suite, device: torch.device, seed: int, unlabeled_split: str,
             data_fraction: float, tune, show_progress: bool, count_flops: bool, order_list,
             precision: str = "auto") -> dict:
    """The measured part of a run: the record's fields (``status`` ok or failed). Runs in this process, or in the
    child of a time-limited run, which calls ``release()`` when what the limit covers is done."""
    memory.reset_peak(device)
    stored = basecache.stored_count()
    if order_list is None:
        out = _one_shot(release, call, suite, device, seed, unlabeled_split, data_fraction, tune, show_progress,
                        count_flops, precision)
    else:
        out = _sequential(call, suite, order_list, device, seed, unlabeled_split, data_fraction, show_progress,
                          count_flops, precision)
    if out.get("_inputs_modified"):  # what this run cached was computed from inputs that cannot be trusted
        basecache.discard_since(stored)
    out["_threads"] = torch.get_num_threads()
    return out


def _verify_inputs(suite: Suite, call: MethodCall) -> None:
    """Before anything is computed from the suite's inputs after a method (and cached): they are unchanged."""
    changed = integrity.changes(suite)
    if changed:
        raise integrity.InputsModifiedError(str(call.name), changed)


def _failure(e: Exception, suite: Suite, call: MethodCall) -> dict:
    """The record fields of a failed run; a method that also changed its inputs is named for that first."""
    out = {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=8)}
    if isinstance(e, integrity.InputsModifiedError):
        out["_inputs_modified"] = e.changed
    else:
        changed = integrity.changes(suite)
        if changed:
            err = integrity.InputsModifiedError(str(call.name), changed)
            out.update({"error": f"InputsModifiedError: {err} (it also raised {type(e).__name__}: {e})",
                        "_inputs_modified": changed})
    return out


def _checked_accuracy(result: dict, when: str = "") -> dict[str, float]:
    """The per-task accuracy of an evaluation; out-of-range or non-finite values fail the run."""
    acc = result["accuracy"]
    bad = [t for t, a in acc.items() if not (0.0 <= a <= 100.0)]
    if bad:
        why = (f"; the merged model gave non-finite outputs for {result['nonfinite']} images"
               if result.get("nonfinite") else "")
        raise MethodFailed(f"non-finite or out-of-range accuracy on {bad}{when}{why}")
    return acc


def measure_final(model: MergedModel, acc: dict[str, float], suite: Suite, device, count_flops: bool) -> dict:
    """The record's ``metrics``, ``params`` and ``flops`` of a run's final model, whose test accuracy per task is
    ``acc``: one measurement for both protocols (the sequential one measures its last model)."""
    ref = reference_accuracy(suite, device)
    norm = {t: 100.0 * acc[t] / ref[t] if ref[t] > 0 else float("nan") for t in acc}
    backbone = list(suite.pretrained.values())
    params = parameter_counts(model, sum(v.numel() for v in backbone), sum(tensor_bytes(v) for v in backbone))
    image_shape = (3, suite.encoder_config["image_size"], suite.encoder_config["image_size"])
    flops = model_macs(model.cpu(), suite.tasks, image_shape) if count_flops else None
    return {"metrics": {"accuracy": acc, "normalized_accuracy": norm, "avg_accuracy": sum(acc.values()) / len(acc),
                        "avg_normalized_accuracy": sum(norm.values()) / len(norm), "reference_accuracy": ref},
            "params": params, "flops": flops}


def _one_shot(release, call, suite, device, seed, unlabeled_split, data_fraction, tune, show_progress,
              count_flops, precision) -> dict:
    out: dict = {}
    try:
        selection = {"protocol": "fixed"}
        stage_s: dict = {}
        if tune:
            call, selection = _select_on_validation(call, tune, suite, device, seed, unlabeled_split,
                                                    data_fraction, show_progress, precision)
            out["method"] = {"pipeline": str(call), "hparams": call.plain_hparams()}
        out["selection"] = selection
        seed_everything(seed)
        ctx = MergeContext(suite, call.needs(), device, seed, unlabeled_split, data_fraction, show_progress,
                           precision=precision)
        start = time.perf_counter()
        model = execute(call, ctx, stage_s)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        merge_s = time.perf_counter() - start + sum(b["seconds"] for b in ctx.cached_bases)
        release()  # the time limit covers the merge and the selection
        _check_finite(model)
        result = evaluate(model, suite, "test", device)
        acc = _checked_accuracy(result)
        _verify_inputs(suite, call)
        final = measure_final(model, acc, suite, device, count_flops)
        final["metrics"]["entropy_auroc"] = result["entropy_auroc"]
        out.update({
            "status": "ok",
            **final,
            "timing": {"merge_s": round(merge_s, 3), "stages_s": stage_s, "eval_s": round(result["seconds"], 3),
                       "eval_images_per_s": round(result["images_per_s"], 1), "loops": loop_rates(ctx),
                       "cached_bases": ctx.cached_bases,
                       **_peak_memory_mb(device)},
            "data_used": list(ctx.data_used.values()),
            "logs": {k: v for k, v in ctx.logs.items()},
        })
    except Exception as e:  # a failing method is a result, and the suite goes on
        out.update(_failure(e, suite, call))
    return out


def _sequential(call, suite, order_list, device, seed, unlabeled_split, data_fraction, show_progress,
                count_flops, precision) -> dict:
    """The fields of a sequential record: per order, the method's model after each arrival evaluated on
    the tasks seen so far; averages over orders; params and FLOPs of the final model (of the first order).
    A failure in any order makes the record ``failed`` (with the orders done so far)."""
    per_order, contexts, final_model = [], [], None

    def evaluate_seen(model, tasks):
        return _checked_accuracy(evaluate(model, suite, "test", device, tasks=tasks),
                                 f" (after {len(tasks)} experts)")

    try:
        for order in order_list:
            seed_everything(seed)
            result, model, ctx = run_order(call, suite, order, device, seed, unlabeled_split, data_fraction,
                                           show_progress, evaluate_seen, _check_finite, precision)
            per_order.append(result)
            contexts.append(ctx)
            if final_model is None:  # params and FLOPs: the final model of the first order
                final_model = model
        _verify_inputs(suite, call)
        summary = summarize(per_order, suite.tasks)
        return {
            "sequential": {"per_order": per_order, **{k: v for k, v in summary.items() if k != "final_accuracy"}},
            "status": "ok", "selection": {"protocol": "fixed"},
            **measure_final(final_model, summary["final_accuracy"], suite, device, count_flops),
            "timing": {"merge_s": round(sum(o["merge_s"] for o in per_order), 3),
                       "merge_s_per_order": [o["merge_s"] for o in per_order],
                       "eval_s": round(sum(o["eval_s"] for o in per_order), 3), **_peak_memory_mb(device)},
            "data_used": merge_data_used(contexts),
            "logs": {},
        }
    except Exception as e:  # a failing method is a result, and the suite goes on
        return {"sequential": {"per_order": per_order}, **_failure(e, suite, call)}


def _select_on_validation(call, tune, suite, device, seed, unlabeled_split, data_fraction, show_progress,
                          precision):
    names = list(tune)
    grid = []
    for values in itertools.product(*(tune[n] for n in names)):
        candidate = call.with_hparams(**dict(zip(names, values))).resolve()
        seed_everything(seed)
        ctx = MergeContext(suite, candidate.needs(), device, seed, unlabeled_split, data_fraction, show_progress,
                           precision=precision)
        acc = evaluate(execute(candidate, ctx), suite, "val", device)["accuracy"]
        chosen_values = {n: candidate.plain_hparams()[n] for n in names}
        grid.append({"hparams": chosen_values, "val_avg_accuracy": sum(acc.values()) / len(acc)})
    best = max(grid, key=lambda g: g["val_avg_accuracy"])
    chosen = call.with_hparams(**best["hparams"]).resolve()
    return chosen, {"protocol": "validation grid (average accuracy on the val split)", "grid": grid,
                    "chosen": best["hparams"]}


def run_many(methods: list[str], suite: Suite, jobs: int = 1, **kwargs) -> list[dict]:
    """Run several methods (``run_method`` with ``kwargs``); each failure is recorded and the rest go on. Returns
    the records in the order of ``methods``.

    ``jobs`` > 1 runs them in that many worker processes at once, one thread each (forked from this one: the
    suite is shared, not loaded again; CPU only), the longest expected first (:func:`expected_seconds`), so that
    a machine's cores each run a method instead of sharing one method's small matrix products.
    A results folder that cannot take records is an error before any method runs."""
    if kwargs.get("write", True):
        check_writable(Path(kwargs.get("results_dir", DEFAULT_RESULTS)))
    if jobs < 1:
        raise InputError(f"--jobs must be at least 1, got {jobs}")
    if jobs > 1 and len(methods) > 1:
        return _run_parallel(methods, suite, jobs, kwargs)
    out = []
    for m in methods:
        rec = _run_reporting(m, suite, kwargs)
        out.append(rec)
        print(_summary_line(rec), flush=True)
    return out


def _run_reporting(method: str, suite: Suite, kwargs: dict) -> dict:
    try:
        return run_method(method, suite, **kwargs)
    except Exception as e:  # bad spec (unknown method / hyperparameter): report, continue
        return {"status": "failed", "method": {"pipeline": method}, "error": f"{type(e).__name__}: {e}"}


def expected_seconds(method: str, records: list[dict]) -> float:
    """How long ``method`` is expected to take (to start the longest first): the longest merge and evaluation of
    its earlier ``records`` (the suite's), else a guess from its paper budget's steps (half a second each)."""
    try:
        name = MethodCall.parse(method).name
        steps = float(get_method(name).paper_budget.get("steps", 0))
    except Exception:  # an unknown method fails fast when it runs
        return 0.0
    seen = [r["timing"].get("merge_s", 0) + r["timing"].get("eval_s", 0)
            for r in records if r.get("status") == "ok" and r.get("method", {}).get("name") == name and "timing" in r]
    return max(seen) if seen else 0.5 * steps


def bounded_workers(jobs: int, work: int, records: list[dict]) -> int:
    """``jobs`` bounded by the work (no more workers than methods) and by the memory available: each worker is
    expected to need the largest peak a record of this suite measured, or this process's resident size (what a
    forked worker that writes to all it inherited would hold). Says so when it runs fewer."""
    peaks = [value * 2**20 for r in records if isinstance(r.get("timing"), dict)
             for key in ("peak_rss_mb", "peak_rss_mb_process")
             if isinstance(value := r["timing"].get(key), (int, float)) and math.isfinite(value)]
    per_worker = max(peaks + [memory.rss_bytes() or 0]) or None
    available = memory.available_bytes()
    fit = max(1, available // per_worker) if available and per_worker else jobs
    bounded = max(1, min(jobs, work, fit))
    if bounded < jobs:
        print(f"--jobs {jobs}: running {bounded} worker{'s' if bounded != 1 else ''} ({work} method"
              f"{'s' if work != 1 else ''}; memory for {fit} at {per_worker / 2**30:.1f} GiB each, "
              f"{(available or 0) / 2**30:.1f} GiB available)", file=sys.stderr, flush=True)
    return bounded


_PARALLEL: tuple | None = None  # (suite, kwargs) of the running _run_parallel, inherited by its forked workers


def _parallel_worker_init():
    os.environ["MERGEBENCH_QUIET"] = "1"
    torch.set_num_threads(1)  # GNU OpenMP cannot start a new pool in a forked child; one thread per worker


def _parallel_one(method: str) -> dict:
    suite, kwargs = _PARALLEL
    return _run_reporting(method, suite, kwargs)


def _run_parallel(methods: list[str], suite: Suite, jobs: int, kwargs: dict) -> list[dict]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    global _PARALLEL
    if resolve_device(kwargs.get("device", "auto")).type != "cpu":
        raise InputError("--jobs runs methods in forked CPU workers; on a GPU run them in one process (--jobs 1)")
    records = load_records(kwargs.get("results_dir", DEFAULT_RESULTS), suite.name).records  # read once
    order = sorted(range(len(methods)), key=lambda i: -expected_seconds(methods[i], records))
    jobs = bounded_workers(jobs, len(methods), records)
    kwargs = {**kwargs, "show_progress": False}
    out: list[dict | None] = [None] * len(methods)
    _PARALLEL = (suite, kwargs)
    try:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork"),
                                 initializer=_parallel_worker_init) as pool:
            futures = {pool.submit(_parallel_one, methods[i]): i for i in order}
            for future in as_completed(futures):
                i = futures[future]
                try:
                    rec = future.result()
                except Exception as e:  # the worker died (killed, out of memory): the rest go on
                    rec = {"status": "failed", "method": {"pipeline": methods[i]},
                           "error": f"worker process failed: {type(e).__name__}: {e}"}
                out[i] = rec
                print(_summary_line(rec), flush=True)
    finally:
        _PARALLEL = None
    return out


def _summary_line(rec: dict) -> str:
    name = rec.get("method", {}).get("pipeline", "?")
    if rec.get("status") != "ok":
        return f"FAILED  {name}: {rec.get('error')}"
    m = rec["metrics"]
    tag = "cached " if rec.get("skipped") else "ok     "
    if rec.get("protocol") == "sequential":
        q = rec["sequential"]
        return (f"{tag} {name} [sequential, {len(q['orders'])} orders]: final avg {q['final_avg_mean']:.1f} "
                f"+- {q['final_avg_std']:.1f}  avg over steps {q['avg_over_steps_mean']:.1f}  "
                f"merge {rec['timing']['merge_s']:.1f}s")
    return (f"{tag} {name}: avg {m['avg_accuracy']:.1f}  norm {m['avg_normalized_accuracy']:.1f}  "
            f"added {rec['params']['added']:,} params  merge {rec['timing']['merge_s']:.1f}s")
