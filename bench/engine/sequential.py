"""The sequential (continual) merging protocol: experts arrive one at a time, in an order.

A sequential method reads like its algorithm box::

    @register_method("my_continual", needs="sequential", ...)
    def my_continual(ctx, ...):
        merged = None
        for task, expert in ctx.sequence():     # experts in the run's order, one at a time
            merged = expert if merged is None else update(merged, expert)
            yield ctx.shared_model(merged)      # the harness evaluates it on the tasks seen so far

:class:`SequentialContext` hands out the experts in the run's order and refuses any expert that
has not arrived yet (:class:`FutureExpertError`); a method that declared data
(``register_method(..., sequential_data="labeled")``) gets only the arriving task's data, as in
continual learning. After every yielded model the harness evaluates it on the tasks seen so far;
after the last one that is every task. A run repeats this over several task orders (seeded random
permutations) and records each order's per-step accuracies and their average (:func:`run_orders`).

A one-shot method that needs no data also runs under this protocol through an adapter
(:func:`one_shot_steps`): after each arrival it is run again on the experts seen so far (Task
Arithmetic is then the running sum of the arrived task vectors). Its record says so
(``sequential.adapter``).
"""

from __future__ import annotations

import inspect
import statistics
import time
from typing import Iterator

import torch

from mergebench.api.context import MergeContext
from mergebench.errors import InputError
from mergebench.api.models import MergedModel
from mergebench.api.pipeline import MethodCall
from mergebench.api.registry import get_method
from mergebench.api.weights import Weights

DEFAULT_ORDERS = 3
# one-shot methods run through the adapter by `mergebench demo --protocol sequential` (fusion_bench's continual baselines)
SEQUENTIAL_BASELINES = ("task_arithmetic", "ties_merging")
ADAPTER = "one-shot method re-run on the experts seen so far after each arrival (it keeps every arrived expert)"


class FutureExpertError(PermissionError):
    """A sequential method asked for an expert (or data of a task) that has not arrived yet."""


class SequentialContext(MergeContext):
    """A merge context for one task order: ``sequence()`` yields ``(task, expert weights)`` one at a time.

    ``tasks`` is the list of tasks arrived so far; experts and task vectors of other tasks are refused,
    and data (when declared) is served for the arriving task only. ``notes`` collects what a method
    reports about its own run (stored in the record).
    """

    def __init__(self, suite, spec, order: list[str], show_progress: bool = True):
        unknown = [t for t in order if t not in suite.tasks]
        if unknown or sorted(order) != sorted(suite.tasks):
            raise InputError(f"a task order must be a permutation of the suite's tasks {suite.tasks}, got {order}")
        super().__init__(suite, spec, show_progress, tasks=[])
        self._order = list(order)
        self._started = False
        self.notes: dict = {}

    @property
    def current(self) -> str | None:
        """The task that arrived last (None before the first)."""
        return self.tasks[-1] if self.tasks else None

    def sequence(self) -> Iterator[tuple[str, Weights]]:
        """The experts in the run's order: ``(task, theta_task)``, one per step. Can be iterated once."""
        if self._started:
            raise RuntimeError("ctx.sequence() can be iterated once per run")
        self._started = True
        for task in self._order:
            self.tasks.append(task)
            yield task, self.expert_weights(task)

    def _expert_tensors(self, task: str) -> Weights:  # behind expert_weights, per_tensor and task vectors
        if task not in self.tasks:
            raise FutureExpertError(
                f"expert {task!r} has not arrived yet (arrived: {self.tasks}); a sequential method sees the experts "
                f"one at a time through `for task, expert in ctx.sequence()`")
        return super()._expert_tensors(task)

    def _indices(self, split, task, n):
        if task != self.current:
            raise FutureExpertError(
                f"data of task {task!r} requested while the arriving task is {self.current!r}; a sequential method "
                f"gets the data of the arriving task only")
        return super()._indices(split, task, n)

    def seen_view(self) -> MergeContext:
        """An ordinary context over the tasks arrived so far (what a one-shot method sees in the adapter)."""
        return MergeContext(self._source, self.spec, self.show_progress, tasks=list(self.tasks))

    def note(self, key: str, value) -> None:
        """Record a fact about this run (e.g. which path a method took); stored in the record."""
        self.notes[key] = value


def task_orders(tasks: list[str], orders: int | list[list[str]], seed: int = 0) -> list[list[str]]:
    """``orders`` seeded random task orders (or the given orders, checked).

    The orders are rows of a random Latin square (a cyclic square with its rows, columns and task labels shuffled):
    no two of the first ``len(tasks)`` orders put the same task at the same position, and successive tasks differ
    between orders. Beyond ``len(tasks)`` orders a new square is drawn.
    """
    if isinstance(orders, int):
        if orders < 1:
            raise InputError(f"the number of task orders must be at least 1, got {orders}")
        g = torch.Generator().manual_seed(10007 * seed + 1)
        n, out = len(tasks), []
        while len(out) < orders:
            rows, cols, labels = (torch.randperm(n, generator=g).tolist() for _ in range(3))
            out += [[tasks[labels[(r + cols[c]) % n]] for c in range(n)] for r in rows]
        return out[:orders]
    out = [list(o) for o in orders]
    for o in out:
        if sorted(o) != sorted(tasks):
            raise InputError(f"task order {o} is not a permutation of the suite's tasks {tasks}")
    if not out:
        raise InputError("give at least one task order")
    return out


def check_sequential(call: MethodCall) -> str | None:
    """None for a native sequential method, else the adapter's description; a clear error if it cannot run."""
    spec = get_method(call.name)
    if spec.needs == "sequential":
        if spec.is_addon:
            raise InputError(f"{call.name} is a sequential add-on; the sequential protocol runs single methods")
        return None
    if spec.is_addon or call.needs() != {"nothing"}:
        raise InputError(
            f"{call.name} (needs {sorted(call.needs())}) cannot run under the sequential protocol: the adapter re-runs "
            f"data-free one-shot methods on the experts seen so far; a method using data or a base must be written "
            f"as a sequential method (needs='sequential', `for task, expert in ctx.sequence(): ... yield`)")
    return ADAPTER


def one_shot_steps(call: MethodCall, ctx: SequentialContext) -> Iterator[MergedModel]:
    """The adapter: after each arrival, the one-shot method on the experts seen so far."""
    fn = get_method(call.name).fn
    for _task, _expert in ctx.sequence():
        yield fn(ctx.seen_view(), **call.hparams)


def steps(call: MethodCall, ctx: SequentialContext) -> Iterator[MergedModel]:
    """The merged models of one order, one per arrival (native generator or adapter)."""
    spec = get_method(call.name)
    if spec.needs != "sequential":
        return one_shot_steps(call, ctx)
    gen = spec.fn(ctx, **call.hparams)
    if not inspect.isgenerator(gen):
        raise TypeError(f"{call.name} is declared needs='sequential' but returned {type(gen).__name__}; a sequential "
                        f"method is a generator: `for task, expert in ctx.sequence(): ... yield ctx.shared_model(w)`")
    return gen


def run_order(spec, suite, order: list[str], show_progress: bool, evaluate_fn,
              check_fn) -> tuple[dict, MergedModel, SequentialContext]:
    """Run one order of ``spec``'s run (a :class:`mergebench.engine.runspec.RunSpec`): after each yielded model, evaluate
    it on the tasks seen so far.

    Returns (the order's result, the final model, its context). ``evaluate_fn(model, tasks) -> {task: acc}``;
    ``check_fn(model)`` raises on a bad model. Merge time counts only the method's own work between yields.
    """
    call = spec.call
    ctx = SequentialContext(suite, spec, order, show_progress)
    gen = steps(call, ctx)
    curve, merge_s, eval_s, model = [], 0.0, 0.0, None
    while True:
        start = time.perf_counter()
        try:
            model = next(gen)
        except StopIteration:
            break
        finally:
            merge_s += time.perf_counter() - start
        if not isinstance(model, MergedModel):
            raise TypeError(f"{call.name} yielded {type(model).__name__}; yield a MergedModel "
                            f"(e.g. ctx.shared_model(weights)) after each expert")
        if len(curve) >= len(ctx.tasks):
            raise RuntimeError(f"{call.name} yielded more than one model for the arrival of {ctx.current!r}; yield "
                               f"exactly one merged model per expert")
        check_fn(model)
        seen = list(ctx.tasks)
        start = time.perf_counter()
        acc = evaluate_fn(model, seen)
        eval_s += time.perf_counter() - start
        curve.append(step_result(len(curve) + 1, seen, acc))
    if len(curve) != len(order):
        raise RuntimeError(f"{call.name} yielded {len(curve)} models for {len(order)} experts; yield one merged model "
                           f"after each expert (and consume the whole `ctx.sequence()`)")
    return order_result(order, curve, merge_s, eval_s, dict(ctx.logs), dict(ctx.notes)), model, ctx


def step_result(step: int, seen: list[str], acc: dict[str, float]) -> dict:
    """One step of an order's curve: the model after the arrival of ``seen[-1]``, evaluated on ``seen``."""
    return {"step": step, "task": seen[-1], "seen": list(seen), "accuracy": acc,
            "avg_accuracy": sum(acc.values()) / len(acc)}


def order_result(order: list[str], curve: list[dict], merge_s: float, eval_s: float, logs: dict,
                 notes: dict) -> dict:
    """One order's part of a sequential record, from its curve (:func:`step_result` per step)."""
    return {"order": list(order), "steps": curve, "final_accuracy": curve[-1]["accuracy"],
            "final_avg_accuracy": curve[-1]["avg_accuracy"],
            "avg_accuracy_over_steps": sum(s["avg_accuracy"] for s in curve) / len(curve),
            "merge_s": round(merge_s, 3), "eval_s": round(eval_s, 3), "logs": logs, "notes": notes}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(per_order: list[dict], tasks: list[str]) -> dict:
    """Averages over orders: final per-task accuracy, final average and average over steps (mean and std), and
    the mean accuracy curve (step k: the average over orders of the accuracy on the k tasks seen)."""
    final = {t: statistics.fmean(o["final_accuracy"][t] for o in per_order) for t in tasks}
    final_mean, final_std = _mean_std([o["final_avg_accuracy"] for o in per_order])
    steps_mean, steps_std = _mean_std([o["avg_accuracy_over_steps"] for o in per_order])
    n_steps = len(per_order[0]["steps"])
    curve = [statistics.fmean(o["steps"][k]["avg_accuracy"] for o in per_order) for k in range(n_steps)]
    return {"final_accuracy": final, "final_avg_mean": final_mean, "final_avg_std": final_std,
            "avg_over_steps_mean": steps_mean, "avg_over_steps_std": steps_std, "curve_mean": curve}


def merge_data_used(used: list[dict]) -> list[dict]:
    """The data every order's context served (its ``data_used``), summed over orders."""
    out: dict = {}
    for data_used in used:
        for key, entry in data_used.items():
            slot = out.setdefault(key, {"kind": entry["kind"], "split": entry["split"], "images": {}})
            for task, n in entry["images"].items():
                slot["images"][task] = slot["images"].get(task, 0) + n
    return list(out.values())
