"""The runner: one method spec on one suite -> one record. Failures are records too.

The harness does devices, seeds, data, timing, counting and the record; the method only merges.
"""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from mergebench.engine import basecache, integrity, memory, transfer, worker
from mergebench.api.context import MergeContext
from mergebench.engine.execution import MethodFailed
from mergebench.errors import InputError, MergebenchError
from mergebench.engine.evaluate import evaluate
from mergebench.engine.io import atomic_write_text, cache_root, check_writable
from mergebench.engine.metrics import model_macs, parameter_counts, tensor_bytes
from mergebench.api.models import MergedModel, SharedModel
from mergebench.api.pipeline import MethodCall
from mergebench.engine.records import Record, config_hash, environment, find_ok, load_records, record_header, write_record
from mergebench.api.registry import get_method
from mergebench.engine.runspec import RunSpec, SuiteIdentity, method_facts, resolve_device
from mergebench.engine.sequential import merge_data_used, order_result, step_result, summarize
from mergebench.suites.base import Suite

DEFAULT_RESULTS = Path("results")


class ArchitectureMismatchError(MergebenchError, ValueError):
    """An expert does not have the pretrained model's architecture (keys or shapes differ)."""


class InvalidExpertError(MergebenchError, ValueError):
    """An expert's tensor is not floating point, or holds NaN or inf: a bad checkpoint, not a method's fault."""


def check_architectures(suite: Suite) -> None:
    """Every expert must have the pretrained encoder's tensors (same names, same shapes).

    Raises :class:`ArchitectureMismatchError` naming the expert and the first differences, and
    :class:`InvalidExpertError` naming the expert (or the pretrained encoder) and the tensor when a tensor is
    not floating point where the pretrained one is, or is not finite. Checked once per suite object; then the
    suite's fingerprints are taken (:mod:`mergebench.engine.integrity`), against which every method is checked.
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

    acc = {}
    for task in suite.tasks:
        expert = SharedModel(suite.build_encoder({**suite.pretrained, **suite.expert_weights(task)}))
        acc[task] = evaluate(expert, suite, split, device, tasks=[task])["accuracy"][task]
    atomic_write_text(path, json.dumps(acc))
    return acc


def run_one(method: str | MethodCall, suite: Suite, results_dir=DEFAULT_RESULTS, force: bool = False,
            show_progress: bool = True, count_flops: bool = True, write: bool = True, **settings) -> dict:
    """``run_method`` of the spec ``RunSpec.build(method, suite, **settings)`` (seed, device, precision, budget,
    protocol, orders, unlabeled_split, data_fraction, tune, time_limit_s, memory_limit_mb)."""
    return run_method(RunSpec.build(method, suite, **settings), suite, results_dir, force=force,
                      show_progress=show_progress, count_flops=count_flops, write=write)


def run_method(spec: RunSpec, suite: Suite, results_dir=DEFAULT_RESULTS, force: bool = False,
               show_progress: bool = True, count_flops: bool = True, write: bool = True) -> dict:
    """Merge with ``spec``'s method on ``suite`` (the loaded suite ``spec`` names), evaluate, measure and write
    one record.

    ``spec.protocol == "sequential"`` (the default for methods declared ``needs="sequential"``) runs the
    continual protocol of :mod:`mergebench.engine.sequential` over ``spec.orders``; see :func:`_sequential`.

    ``spec.tune`` (hyperparameter: values) selects those values on the validation split (the task-vectors
    protocol) before the test evaluation; otherwise hyperparameters are fixed.
    A spec that already has an ok record (:meth:`RunSpec.reusable_hashes`) is returned as is unless ``force``.
    The merge runs in a worker process of its own that holds only what the method declared
    (:mod:`mergebench.engine.worker`); the harness evaluates the model it returns, here, on ``suite``. Whatever ends the
    worker without a model (an exception, an exit, a signal, a time or memory limit), a change of its inputs in
    place or of global torch state becomes a record with ``status: failed`` and its reason.

    ``spec.precision``: of the test-time adaptation loops' forward and backward passes, "bf16" (bfloat16
    autocast) or "fp32" (:meth:`MergeContext.autocast`); stored in the record (and, for the pipelines it can
    change, in its configuration).

    ``spec.time_limit_s``: the merge (validation selection included; for the sequential protocol every order with
    its evaluations) is killed at the deadline; the run is recorded as failed with "exceeded its time limit of
    N s". ``spec.memory_limit_mb``: the worker (with every process it started) is killed when its resident memory
    passes it ("exceeded its memory limit of N MB").
    """
    if not isinstance(spec, RunSpec):
        raise TypeError(f"run_method takes a RunSpec (RunSpec.build(method, suite, ...)), not "
                        f"{type(spec).__name__}; run_one(method, suite, ...) builds one")
    if (spec.suite.name, spec.suite.key) != (suite.name, SuiteIdentity.of(suite).key):
        raise InputError(f"the run's spec names suite {spec.suite.name!r} ({spec.suite.key}), not the suite given "
                         f"({suite.name!r}, {SuiteIdentity.of(suite).key}); build the spec on this suite")
    check_architectures(suite)
    path = spec.record_path(results_dir)
    if not force and write:
        for h in spec.reusable_hashes():
            done = find_ok(results_dir, suite.name, h)
            if done is not None:
                done["skipped"] = True
                return done
    if write:  # before any merge work: a record that cannot be written loses the work
        check_writable(path.parent)

    header = record_header(
        spec.config_hash(), method_facts(spec.call),
        {"requested": spec.budget, "below_paper": spec.call.below_paper_budget()},
        {"name": suite.name, "tasks": suite.tasks, **suite.info}, spec.seed, spec.device, spec.precision,
        spec.config(), environment(), spec.time_limit_s, spec.memory_limit_mb,
        {"orders": [list(o) for o in spec.orders], "adapter": spec.adapter} if spec.sequential else None)
    measured = _measure(spec, suite, show_progress, count_flops)
    if measured.threads is not None:
        header["env"]["threads"] = measured.threads
    if measured.call is not None:  # the hyperparameters chosen on the validation split
        header["method"] = method_facts(measured.call)
    record = (Record.ok if measured.ok else Record.failed)(header, **measured.fields)
    if measured.suite_changed:  # the harness's own suite changed (a returned module's code ran here while evaluated)
        restored = integrity.restore(suite, spec.call.name)
        record.error += ("; the suite was loaded again from its files" if restored else
                         "; the suite cannot be loaded again (no reload), so later runs on it refuse to start")
    out = record.to_json()
    if write:
        out["_path"] = str(write_record(out, path))
    return out


@dataclass
class Measured:
    """The outcome of a run's measured part: the arguments of :meth:`Record.ok` (``ok``) or
    :meth:`Record.failed`, and what the harness does with besides."""

    ok: bool
    fields: dict
    call: MethodCall | None = None  # the call that ran, where validation selection chose it
    threads: int | None = None      # the threads the merge's worker ran with
    inputs_modified: object = None  # the method changed its inputs (what it cached is discarded)
    suite_changed: object = None    # the harness's own suite changed (it is loaded again)


def _measure(spec: RunSpec, suite: Suite, show_progress: bool, count_flops: bool) -> Measured:
    """The measured part of a run (ok or failed). The merges run in workers (:mod:`mergebench.engine.worker`) under the
    spec's limits: the time limit covers the merge and the selection (for the sequential protocol every order
    with its evaluations); evaluation and measurement run here."""
    device = torch.device(spec.device)
    memory.reset_peak(device)
    stored = basecache.stored_count()
    limits = worker.Limits(spec.time_limit_s, spec.memory_limit_mb)
    deadline = None if limits.seconds is None else time.monotonic() + limits.seconds
    if spec.sequential:
        out = _sequential(spec, suite, show_progress, count_flops, _Budget(limits, deadline))
    else:
        out = _one_shot(spec, suite, show_progress, count_flops, _Budget(limits, deadline))
    if out.inputs_modified or out.suite_changed:  # what it cached came from untrusted inputs
        basecache.discard_since(stored)
    return out


class _Budget:
    """What is left of a run's limits for its next worker (the time limit spans every merge of the run)."""

    def __init__(self, limits: worker.Limits, deadline: float | None):
        self.limits, self.deadline = limits, deadline

    def next(self) -> worker.Limits:
        seconds = self.limits.seconds
        if self.deadline is not None:
            seconds = max(0.01, self.deadline - time.monotonic())
        return worker.Limits(seconds, self.limits.memory_mb, stated_seconds=self.limits.seconds)

    def what(self, call: MethodCall, sequential: bool = False) -> str:
        if self.limits.seconds is None:
            return str(call.name)
        return f"{call.name} ({'all task orders, evaluation included' if sequential else 'merge and selection'})"



def _job(kind: str, spec: RunSpec, suite: Suite, show_progress: bool, folder: Path, **more) -> dict:
    """A worker's job: the method (its registrations), the run's spec and the inputs its needs allow."""
    return {"kind": kind, "name": str(spec.call.name), "spec": spec, "specs": _specs(spec.call),
            "inputs": worker.method_inputs(suite, worker.data_level(spec.call.needs())),
            "show_progress": show_progress, "folder": str(folder), **more}


def merge_in_worker(spec: RunSpec, suite: Suite, show_progress: bool = False, limits: worker.Limits | None = None,
                    reuse_bases: bool = True, what: str | None = None) -> tuple[MergedModel, dict]:
    """Merge ``spec``'s call in a fresh worker holding what it declared; returns the model (built here) and the
    merge's fields (``merge_s``, ``stages_s``, ``data_used``, ``logs``, ``loops``, ``cached_bases``, ``memory``,
    ``threads``, ``left_running``). The bases come from and go to the base cache here, never there.
    Raises :class:`mergebench.engine.worker.WorkerFailed` when the worker ends without a model."""
    call, device = spec.call, torch.device(spec.device)
    here = MergeContext(suite, spec, show_progress=False)
    stages = {str(s): s for s in call.stages()[:-1]}
    folder = Path(tempfile.mkdtemp(prefix="mergebench-merge-"))
    try:
        hits = {}
        for text, stage in (stages.items() if reuse_bases else ()):
            hit = basecache.lookup(stage, here)
            if hit is not None:
                hits[text] = {"model": transfer.save(hit.model, folder, f"hit-{len(hits)}"), "seconds": hit.seconds,
                              "data_used": hit.data_used, "logs": hit.logs}

        def on_message(message, reply):
            if message[0] == "base":  # a base the worker merged: cached here, from the model it sent
                _, text, note, seconds, data, logs = message
                model = _returned(note, folder, suite, call, device)
                basecache.store(stages[text], here, basecache.CachedBase(model, seconds, data, logs))

        job = _job("merge", spec, suite, show_progress, folder, bases=hits, reuse_bases=reuse_bases)
        out = worker.run(job, what or str(call.name), limits, on_message)
        return _returned(out.pop("model"), folder, suite, call, device), out
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _failure(e: BaseException, suite: Suite, call: MethodCall, **fields) -> Measured:
    """A failed run's outcome (with ``fields`` it finished); a method that also changed its inputs is named for
    that first."""
    if isinstance(e, worker.WorkerFailed):
        out = Measured(False, {**fields, "error": f"{e.type_name}: {e}", "traceback": e.child_traceback})
        changed = e.extra.get("inputs_modified")
        if e.type_name == "InputsModifiedError":
            out.inputs_modified = True
        elif changed:
            err = integrity.InputsModifiedError(str(call.name), changed)
            out.fields["error"] = f"InputsModifiedError: {err} (it also raised {e.type_name}: {e})"
            out.inputs_modified = changed
        return out
    out = Measured(False, {**fields, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=8)})
    if isinstance(e, integrity.InputsModifiedError):
        out.suite_changed = e.changed
    else:
        changed = integrity.changes(suite)
        if changed:
            err = integrity.InputsModifiedError(str(call.name), changed)
            out.fields["error"] = f"InputsModifiedError: {err} (it also raised {type(e).__name__}: {e})"
            out.suite_changed = changed
    return out


def _specs(call: MethodCall) -> list:
    seen = {}
    for stage in call.stages():
        seen.setdefault(stage.name, get_method(stage.name))
    return list(seen.values())


def _returned(note: dict, folder: Path, suite: Suite, call: MethodCall, device) -> MergedModel:
    """A model a worker returned, built in this process (a saved module: only the methods' own classes)."""
    modules = {spec.fn.__module__ for spec in _specs(call)}
    return transfer.load(note, folder, suite.encoder_config, suite.pretrained, device, modules)


def _verify_inputs(suite: Suite, call: MethodCall) -> None:
    """Before anything is computed from the suite's inputs after a method (and cached): they are unchanged."""
    changed = integrity.changes(suite)
    if changed:
        raise integrity.InputsModifiedError(str(call.name), changed)


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


def _one_shot(spec: RunSpec, suite: Suite, show_progress: bool, count_flops: bool, budget: _Budget) -> Measured:
    call, device, chosen = spec.call, torch.device(spec.device), None
    selection = None
    try:
        if spec.tune:
            chosen, selection = _select_on_validation(spec, suite, show_progress, budget)
            call = chosen
        selection = selection or {"protocol": "fixed"}
        model, merged = merge_in_worker(replace(spec, call=call), suite, show_progress, budget.next(),
                                        what=budget.what(call))
        _check_finite(model)
        result = evaluate(model, suite, "test", device)
        acc = _checked_accuracy(result)
        _verify_inputs(suite, call)
        final = measure_final(model, acc, suite, device, count_flops)
        final["metrics"]["entropy_auroc"] = result["entropy_auroc"]
        timing = {"merge_s": round(merged["merge_s"], 3), "stages_s": merged["stages_s"],
                  "eval_s": round(result["seconds"], 3), "eval_images_per_s": round(result["images_per_s"], 1),
                  "loops": merged["loops"], "cached_bases": merged["cached_bases"], **merged["memory"]}
        left = {"left_running": merged["left_running"]} if merged["left_running"] else None
        return Measured(True, {"selection": selection, **final, "timing": timing, "data_used": merged["data_used"],
                               "logs": merged["logs"], "worker": left}, chosen, merged["threads"])
    except Exception as e:  # a failing method is a result, and the suite goes on
        out = _failure(e, suite, call, selection=selection)
        out.call = chosen
        return out


def _sequential(spec: RunSpec, suite: Suite, show_progress: bool, count_flops: bool, budget: _Budget) -> Measured:
    """The outcome of a sequential run: per order, the method's model after each arrival evaluated here on
    the tasks seen so far; averages over orders; params and FLOPs of the final model (of the first order).
    The orders run in one worker, which sends each step's model and waits for its evaluation.
    A failure in any order makes the record ``failed`` (with the orders done so far)."""
    call, device = spec.call, torch.device(spec.device)
    order_list = [list(o) for o in spec.orders]
    curves: dict[int, list] = {}
    eval_s: dict[int, float] = {}
    final_model = None

    def on_step(i, model, seen):
        nonlocal final_model
        _check_finite(model)
        start = time.perf_counter()
        acc = _checked_accuracy(evaluate(model, suite, "test", device, tasks=seen), f" (after {len(seen)} experts)")
        eval_s[i] = eval_s.get(i, 0.0) + time.perf_counter() - start
        curves.setdefault(i, []).append(step_result(len(curves.get(i, [])) + 1, seen, acc))
        if i == 0 and len(seen) == len(suite.tasks):  # params and FLOPs: the final model of the first order
            final_model = model
        return acc

    per_order: list[dict] = []
    try:
        try:
            out = sequential_in_worker(spec, suite, show_progress, budget.next(), on_step,
                                       budget.what(call, sequential=True))
        finally:
            per_order = [order_result(order_list[i], curves[i], 0.0, eval_s.get(i, 0.0), {}, {})
                         for i in sorted(curves) if len(curves[i]) == len(order_list[i])]
        per_order = [order_result(order, curves[i], o["merge_s"], eval_s[i], o["logs"], o["notes"])
                     for i, (order, o) in enumerate(zip(order_list, out["orders"]))]
        _verify_inputs(suite, call)
        summary = summarize(per_order, suite.tasks)
        final = measure_final(final_model, summary["final_accuracy"], suite, device, count_flops)
        timing = {"merge_s": round(sum(o["merge_s"] for o in per_order), 3),
                  "merge_s_per_order": [o["merge_s"] for o in per_order],
                  "eval_s": round(sum(o["eval_s"] for o in per_order), 3), **out["memory"]}
        left = {"left_running": out["left_running"]} if out["left_running"] else None
        return Measured(True, {
            "sequential": {"per_order": per_order, **{k: v for k, v in summary.items() if k != "final_accuracy"}},
            "selection": {"protocol": "fixed"}, **final, "timing": timing,
            "data_used": merge_data_used([o["data_used"] for o in out["orders"]]), "logs": {}, "worker": left},
            threads=out["threads"])
    except Exception as e:  # a failing method is a result, and the suite goes on
        return _failure(e, suite, call, sequential={"per_order": per_order})


def sequential_in_worker(spec: RunSpec, suite: Suite, show_progress: bool = False,
                         limits: worker.Limits | None = None, on_step=None, what: str | None = None) -> dict:
    """Every order of ``spec``'s sequential run in one fresh worker; each step's model is built here and given to
    ``on_step(order index, model, tasks seen)``, whose answer (accuracy per task seen) goes back to the worker.
    Returns the worker's fields (``orders``: merge_s, logs, notes, data_used of each; ``memory``, ``threads``,
    ``left_running``). Raises :class:`mergebench.engine.worker.WorkerFailed` when the worker ends without them."""
    call, device = spec.call, torch.device(spec.device)
    folder = Path(tempfile.mkdtemp(prefix="mergebench-sequential-"))

    def on_message(message, reply):
        _, i, note, seen = message
        model = _returned(note, folder, suite, call, device)
        (folder / note["file"]).unlink(missing_ok=True)
        acc = on_step(i, model, seen) if on_step is not None else dict.fromkeys(seen, 0.0)
        reply(("go", acc))

    try:
        job = _job("sequential", spec, suite, show_progress, folder)
        return worker.run(job, what or str(call.name), limits, on_message)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _select_on_validation(spec: RunSpec, suite: Suite, show_progress: bool, budget: _Budget):
    tune = spec.tune_grid
    names = list(tune)
    grid = []
    for values in itertools.product(*(tune[n] for n in names)):
        candidate = spec.call.with_hparams(**dict(zip(names, values))).resolve()
        model, _ = merge_in_worker(replace(spec, call=candidate), suite, show_progress, budget.next(),
                                   what=budget.what(spec.call))
        acc = evaluate(model, suite, "val", spec.device)["accuracy"]
        chosen_values = {n: candidate.plain_hparams()[n] for n in names}
        grid.append({"hparams": chosen_values, "val_avg_accuracy": sum(acc.values()) / len(acc)})
    best = max(grid, key=lambda g: g["val_avg_accuracy"])
    chosen = spec.call.with_hparams(**best["hparams"]).resolve()
    return chosen, {"protocol": "validation grid (average accuracy on the val split)", "grid": grid,
                    "chosen": best["hparams"]}


def run_many(methods: list[str], suite: Suite, jobs: int = 1, **kwargs) -> list[dict]:
    """Run several methods (``run_one`` with ``kwargs``: the harness's options and the run settings of each one's
    :class:`RunSpec`); each failure is recorded and the rest go on. Returns
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
        return run_one(method, suite, **kwargs)
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
    worker.use_inherited_server()
    os.environ["MERGEBENCH_QUIET"] = "1"
    torch.set_num_threads(1)  # GNU OpenMP cannot start a new pool in a forked child; one thread per worker


def _parallel_one(method: str) -> dict:
    suite, kwargs = _PARALLEL
    return _run_reporting(method, suite, kwargs)


def _run_parallel(methods: list[str], suite: Suite, jobs: int, kwargs: dict) -> list[dict]:
    global _PARALLEL
    if resolve_device(kwargs.get("device", "auto")).type != "cpu":
        raise InputError("--jobs runs methods in forked CPU workers; on a GPU run them in one process (--jobs 1)")
    records = load_records(kwargs.get("results_dir", DEFAULT_RESULTS), suite.name).records  # read once
    order = sorted(range(len(methods)), key=lambda i: -expected_seconds(methods[i], records))
    jobs = bounded_workers(jobs, len(methods), records)
    kwargs = {**kwargs, "show_progress": False}
    out: list[dict | None] = [None] * len(methods)
    _PARALLEL = (suite, kwargs)
    worker.start_server()
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
