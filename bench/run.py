"""The runner: one method spec on one suite -> one record. Failures are records too.

The harness does devices, seeds, data, timing, counting and the record; the method only merges.
"""

from __future__ import annotations

import itertools
import json
import random
import resource
import signal
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch

from mergebench import basecache
from mergebench.context import MergeContext
from mergebench.evaluate import evaluate
from mergebench.io import atomic_write_text, cache_root
from mergebench.metrics import model_macs, parameter_counts, tensor_bytes
from mergebench.models import MergedModel
from mergebench.pipeline import MethodCall
from mergebench.records import config_hash, environment, find_ok, now, record_path, write_record
from mergebench.registry import get_method
from mergebench.sequential import (DEFAULT_ORDERS, check_sequential, merge_data_used, run_order, summarize,
                                   task_orders)
from mergebench.suites.base import Suite

DEFAULT_RESULTS = Path("results")


class MethodFailed(RuntimeError):
    pass


class MethodTimeout(MethodFailed):
    """The method ran past its time limit (``run_method(time_limit=...)``, ``--time-limit``)."""


class ArchitectureMismatchError(ValueError):
    """An expert does not have the pretrained model's architecture (keys or shapes differ)."""


@contextmanager
def time_limit(seconds: float | None, what: str = "the method"):
    """Raise :class:`MethodTimeout` inside the block once ``seconds`` have passed.

    In the main thread this is a ``SIGALRM`` timer: the exception is raised at the next Python
    bytecode after the deadline, so loops, data streams and sleeps are interrupted (a single
    long C call finishes first). Elsewhere (no signals off the main thread) the limit is checked
    when the block ends, so an overrun is still recorded as a failure, only later.
    """
    if not seconds:
        yield
        return
    message = f"{what} exceeded its time limit of {seconds:g} s"
    start = time.monotonic()
    use_signal = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if use_signal:
        def _expire(signum, frame):
            raise MethodTimeout(message)
        previous = signal.signal(signal.SIGALRM, _expire)
        signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        if use_signal:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    if time.monotonic() - start > seconds:
        raise MethodTimeout(message)


def check_architectures(suite: Suite) -> None:
    """Every expert must have the pretrained encoder's tensors (same names, same shapes).

    Raises :class:`ArchitectureMismatchError` naming the expert and the first differences.
    Checked once per suite object.
    """
    if getattr(suite, "_architectures_checked", False):
        return
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
    suite._architectures_checked = True


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
    if device.type == "cuda":
        return {"peak_gpu_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)}
    # ru_maxrss is in KiB on Linux: the process's high-water mark, not this run's alone
    return {"peak_rss_mb_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def run_config(call: MethodCall, suite: Suite, seed: int = 0, unlabeled_split: str = "test",
               data_fraction: float = 1.0, tune: dict[str, list] | None = None,
               orders: list[list[str]] | None = None) -> dict:
    """What determines a run's result; its hash (``config_hash``) names the record (sweeps use it too).

    ``orders`` (the task orders of a sequential run) is added only for that protocol, so one-shot hashes are stable;
    a method declared ``needs="sequential"`` gets the default orders when none are given (as ``run_method`` does).
    """
    if orders is None and get_method(call.name).needs == "sequential":
        orders = task_orders(suite.tasks, DEFAULT_ORDERS, seed)
    config = {"pipeline": str(call), "suite": suite.info.get("cache_key") or suite.info.get("checkpoints"),
              "checkpoints": suite.info.get("checkpoints"), "seed": seed,
              "data": {"unlabeled_split": unlabeled_split, "fraction": data_fraction},
              "tune": {k: list(v) for k, v in (tune or {}).items()}}
    if orders is not None:
        config.update({"protocol": "sequential", "orders": [list(o) for o in orders]})
    return config


def resolve_protocol(call: MethodCall, protocol: str | None) -> str:
    """``None``: a method declared ``needs='sequential'`` runs sequentially, every other one-shot."""
    native = get_method(call.name).needs == "sequential"
    if protocol is None:
        return "sequential" if native else "one-shot"
    if protocol not in ("one-shot", "sequential"):
        raise ValueError(f"unknown protocol {protocol!r}; use 'one-shot' or 'sequential'")
    if protocol == "one-shot" and native:
        raise ValueError(f"{call.name} is a sequential method (experts arrive one at a time); run it with "
                         f"--protocol sequential")
    return protocol


def run_method(method: str | MethodCall, suite: Suite, results_dir=DEFAULT_RESULTS, seed: int = 0,
               device="auto", force: bool = False, unlabeled_split: str = "test", data_fraction: float = 1.0,
               tune: dict[str, list] | None = None, show_progress: bool = True, count_flops: bool = True,
               write: bool = True, time_limit_s: float | None = None, protocol: str | None = None,
               orders: int | list[list[str]] = DEFAULT_ORDERS, budget: str = "paper") -> dict:
    """Merge with ``method`` on ``suite``, evaluate, measure and write one record.

    ``protocol="sequential"`` (the default for methods declared ``needs="sequential"``) runs the continual
    protocol of :mod:`mergebench.sequential` over ``orders`` task orders (a count of seeded random
    permutations, or the orders themselves); see :func:`_run_sequential`.

    ``tune`` ({hyperparameter: [values]}) selects those values on the validation split (the
    task-vectors protocol) before the test evaluation; otherwise hyperparameters are fixed.
    A configuration that already has an ok record is returned as is unless ``force``.
    Exceptions inside the method become a record with ``status: failed``; so does a merge
    (validation selection included) that runs longer than ``time_limit_s`` seconds.
    """
    device = resolve_device(device)
    check_architectures(suite)
    call = MethodCall.parse(method).with_budget(budget).resolve()
    for name in (tune or {}):  # unknown names are errors before any work
        call.with_hparams(**{name: tune[name][0]}).resolve()
    protocol = resolve_protocol(call, protocol)
    order_list = None
    if protocol == "sequential":
        if tune:
            raise ValueError("--tune (validation selection) is not available under the sequential protocol")
        adapter = check_sequential(call)
        order_list = task_orders(suite.tasks, orders, seed)
    config = run_config(call, suite, seed, unlabeled_split, data_fraction, tune, order_list)
    chash = config_hash(config)
    path = record_path(results_dir, suite.name, ("sequential_" if order_list else "") + str(call), chash)
    if not force and write:
        done = find_ok(results_dir, suite.name, chash)
        if done is not None:
            done["skipped"] = True
            return done

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
        "config": config, "env": environment(),
    }
    if time_limit_s:
        record["time_limit_s"] = time_limit_s
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if order_list is not None:
        record["protocol"] = "sequential"
        record["sequential"] = {"orders": order_list, "adapter": adapter}
        _run_sequential(record, call, suite, order_list, device, seed, unlabeled_split, data_fraction, show_progress,
                        count_flops, time_limit_s)
        record["finished"] = now()
        if write:
            write_record(record, path)
            record["_path"] = str(path)
        return record
    try:
        selection = {"protocol": "fixed"}
        stage_s: dict = {}
        with time_limit(time_limit_s, f"{call.name} (merge and selection)"):
            if tune:
                call, selection = _select_on_validation(call, tune, suite, device, seed, unlabeled_split,
                                                        data_fraction, show_progress)
                record["method"]["pipeline"], record["method"]["hparams"] = str(call), call.plain_hparams()
            record["selection"] = selection
            seed_everything(seed)
            ctx = MergeContext(suite, call.needs(), device, seed, unlabeled_split, data_fraction, show_progress)
            start = time.perf_counter()
            model = execute(call, ctx, stage_s)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            merge_s = time.perf_counter() - start + sum(b["seconds"] for b in ctx.cached_bases)
        _check_finite(model)
        result = evaluate(model, suite, "test", device)
        acc = result["accuracy"]
        bad = [t for t, a in acc.items() if not (0.0 <= a <= 100.0)]
        if bad:
            why = (f"; the merged model gave non-finite outputs for {result['nonfinite']} images"
                   if result.get("nonfinite") else "")
            raise MethodFailed(f"non-finite or out-of-range accuracy on {bad}{why}")
        ref = reference_accuracy(suite, device)
        norm = {t: 100.0 * acc[t] / ref[t] if ref[t] > 0 else float("nan") for t in acc}
        backbone = [v for v in suite.pretrained.values()]
        params = parameter_counts(model, sum(v.numel() for v in backbone), sum(tensor_bytes(v) for v in backbone))
        image_shape = (3, suite.encoder_config["image_size"], suite.encoder_config["image_size"])
        flops = model_macs(model.cpu(), suite.tasks, image_shape) if count_flops else None
        record.update({
            "status": "ok",
            "metrics": {"accuracy": acc, "normalized_accuracy": norm,
                        "avg_accuracy": sum(acc.values()) / len(acc),
                        "avg_normalized_accuracy": sum(norm.values()) / len(norm),
                        "reference_accuracy": ref},
            "params": params, "flops": flops,
            "timing": {"merge_s": round(merge_s, 3), "stages_s": stage_s, "eval_s": round(result["seconds"], 3),
                       "eval_images_per_s": round(result["images_per_s"], 1), "loops": loop_rates(ctx),
                       "cached_bases": ctx.cached_bases,
                       **_peak_memory_mb(device)},
            "data_used": list(ctx.data_used.values()),
            "logs": {k: v for k, v in ctx.logs.items()},
        })
    except Exception as e:  # a failing method is a result, and the suite goes on
        record.update({"status": "failed", "error": f"{type(e).__name__}: {e}",
                       "traceback": traceback.format_exc(limit=8)})
    record["finished"] = now()
    if write:
        write_record(record, path)
        record["_path"] = str(path)
    return record


def _run_sequential(record, call, suite, order_list, device, seed, unlabeled_split, data_fraction, show_progress,
                    count_flops, time_limit_s):
    """Fill ``record`` for the sequential protocol: per order, the method's model after each arrival evaluated on
    the tasks seen so far; averages over orders; params and FLOPs of the final model (of the first order).
    A failure in any order makes the record ``failed`` (with the orders done so far)."""
    per_order, contexts, final_model = [], [], None

    def evaluate_seen(model, tasks):
        result = evaluate(model, suite, "test", device, tasks=tasks)
        bad = [t for t, a in result["accuracy"].items() if not (0.0 <= a <= 100.0)]
        if bad:
            why = (f"; the merged model gave non-finite outputs for {result['nonfinite']} images"
                   if result.get("nonfinite") else "")
            raise MethodFailed(f"non-finite or out-of-range accuracy on {bad} (after {len(tasks)} experts){why}")
        return result["accuracy"]

    try:
        with time_limit(time_limit_s, f"{call.name} (all task orders, evaluation included)"):
            for order in order_list:
                seed_everything(seed)
                result, model, ctx = run_order(call, suite, order, device, seed, unlabeled_split, data_fraction,
                                               show_progress, evaluate_seen, _check_finite)
                per_order.append(result)
                contexts.append(ctx)
                if final_model is None:  # params and FLOPs: the final model of the first order
                    final_model = model
        summary = summarize(per_order, suite.tasks)
        acc = summary["final_accuracy"]
        ref = reference_accuracy(suite, device)
        norm = {t: 100.0 * acc[t] / ref[t] if ref[t] > 0 else float("nan") for t in acc}
        backbone = list(suite.pretrained.values())
        params = parameter_counts(final_model, sum(v.numel() for v in backbone), sum(tensor_bytes(v) for v in backbone))
        image_shape = (3, suite.encoder_config["image_size"], suite.encoder_config["image_size"])
        flops = model_macs(final_model.cpu(), suite.tasks, image_shape) if count_flops else None
        record["sequential"].update({"per_order": per_order, **{k: v for k, v in summary.items() if k != "final_accuracy"}})
        record.update({
            "status": "ok", "selection": {"protocol": "fixed"},
            "metrics": {"accuracy": acc, "normalized_accuracy": norm, "avg_accuracy": sum(acc.values()) / len(acc),
                        "avg_normalized_accuracy": sum(norm.values()) / len(norm), "reference_accuracy": ref},
            "params": params, "flops": flops,
            "timing": {"merge_s": round(sum(o["merge_s"] for o in per_order), 3),
                       "merge_s_per_order": [o["merge_s"] for o in per_order],
                       "eval_s": round(sum(o["eval_s"] for o in per_order), 3), **_peak_memory_mb(device)},
            "data_used": merge_data_used(contexts),
            "logs": {},
        })
    except Exception as e:  # a failing method is a result, and the suite goes on
        record["sequential"]["per_order"] = per_order
        record.update({"status": "failed", "error": f"{type(e).__name__}: {e}",
                       "traceback": traceback.format_exc(limit=8)})


def _select_on_validation(call, tune, suite, device, seed, unlabeled_split, data_fraction, show_progress):
    names = list(tune)
    grid = []
    for values in itertools.product(*(tune[n] for n in names)):
        candidate = call.with_hparams(**dict(zip(names, values))).resolve()
        seed_everything(seed)
        ctx = MergeContext(suite, candidate.needs(), device, seed, unlabeled_split, data_fraction, show_progress)
        acc = evaluate(execute(candidate, ctx), suite, "val", device)["accuracy"]
        chosen_values = {n: candidate.plain_hparams()[n] for n in names}
        grid.append({"hparams": chosen_values, "val_avg_accuracy": sum(acc.values()) / len(acc)})
    best = max(grid, key=lambda g: g["val_avg_accuracy"])
    chosen = call.with_hparams(**best["hparams"]).resolve()
    return chosen, {"protocol": "validation grid (average accuracy on the val split)", "grid": grid,
                    "chosen": best["hparams"]}


def run_many(methods: list[str], suite: Suite, **kwargs) -> list[dict]:
    """Run several methods; each failure is recorded and the rest go on."""
    out = []
    for m in methods:
        try:
            rec = run_method(m, suite, **kwargs)
        except Exception as e:  # bad spec (unknown method / hyperparameter): report, continue
            rec = {"status": "failed", "method": {"pipeline": m}, "error": f"{type(e).__name__}: {e}"}
        out.append(rec)
        yield_line = _summary_line(rec)
        print(yield_line, flush=True)
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
