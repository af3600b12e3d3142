"""Running a resolved pipeline inside the process that merges: bases first (from the base cache when they ran
before), then each add-on on the model its base returned, every stage from the run's seed."""

from __future__ import annotations

import random
import time

import numpy as np
import torch

from mergebench.engine import basecache
from mergebench.api.context import MergeContext
from mergebench.api.models import MergedModel
from mergebench.api.pipeline import MethodCall
from mergebench.api.registry import get_method


class MethodFailed(RuntimeError):
    pass


def seed_everything(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed)


def execute(call: MethodCall, ctx: MergeContext, timings: dict | None = None, reuse_bases: bool = True,
            bases=None) -> MergedModel:
    """Run a resolved pipeline: bases first, then each add-on on the model its base returned.

    Every stage starts from the run's seed, so an add-on draws the same randomness whether its base ran or came
    from the base cache (:mod:`mergebench.engine.basecache`, used unless ``reuse_bases=False``; ``bases``: another
    object with its ``lookup`` and ``store``, a worker's view of it).
    """
    spec = get_method(call.name)
    kwargs = dict(call.hparams)
    if "base" in kwargs:
        kwargs["base"] = _execute_base(kwargs["base"], ctx, timings, reuse_bases, bases or basecache)
    seed_everything(ctx.seed)
    start = time.perf_counter()
    model = spec.fn(ctx, **kwargs)
    if timings is not None:
        timings[str(call.name)] = round(time.perf_counter() - start, 4)
    if not isinstance(model, MergedModel):
        raise MethodFailed(f"{call.name} returned {type(model).__name__}; a method must return a MergedModel "
                           f"(e.g. ctx.shared_model(weights))")
    return model


def _execute_base(call: MethodCall, ctx: MergeContext, timings: dict | None, reuse: bool, bases) -> MergedModel:
    """The base of an add-on: from the base cache, or run (and then cached) with what it used and logged."""
    if reuse:
        hit = bases.lookup(call, ctx)
        if hit is not None:
            ctx.add_usage(hit.data_used, hit.logs)
            ctx.cached_bases.append({"pipeline": str(call), "seconds": round(hit.seconds, 4)})
            if timings is not None:
                timings[str(call.name)] = round(hit.seconds, 4)
            return hit.model
    used, logged = ctx.usage_snapshot()
    start = time.perf_counter()
    model = execute(call, ctx, timings, reuse, bases)
    seconds = time.perf_counter() - start
    if reuse:
        data, logs = ctx.usage_since(used, logged)
        bases.store(call, ctx, basecache.CachedBase(model, seconds, data, logs))
    return model


def loop_rates(ctx: MergeContext) -> dict:
    """{loop: {"steps", "seconds", "steps_per_s"}} of the method's progress loops (optimisation steps, episodes)."""
    return {desc: {"steps": v["steps"], "seconds": round(v["seconds"], 3),
                   "steps_per_s": round(v["steps"] / v["seconds"], 3) if v["seconds"] > 0 else None}
            for desc, v in ctx.loops.items()}
