"""A run's identity: the one frozen :class:`RunSpec` and its one :meth:`RunSpec.config_hash`.

Built once (by :meth:`RunSpec.build`, from the command line's or a sweep's settings) and passed down whole to the
runner, its workers and the method's context. Its hash names the run's record (``RESULTS/SUITE/NAME-HASH.json``),
so an ok record of the same spec is reused instead of run again.

The hash covers what can change the result: the method pipeline with every hyperparameter, the suite's identity
and checkpoint hashes, the seed, the data settings, the validation grid, and, only where it can change the result,
the precision (pipelines with a test-time adaptation stage) and the sequential protocol's task orders. The device,
the limits and the harness's own options (results folder, progress bars, FLOP counting) are not in it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergebench.api.context import PRECISIONS, resolve_precision
from mergebench.errors import InputError
from mergebench.engine.limits import check_seconds
from mergebench.api.pipeline import MethodCall
from mergebench.engine.records import config_hash, record_path
from mergebench.api.registry import UnknownMethodError, get_method
from mergebench.engine.sequential import DEFAULT_ORDERS, check_sequential, task_orders

PROTOCOLS = ("one-shot", "sequential")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def uses_precision(call: MethodCall) -> bool:
    """Whether the run's ``precision`` can change ``call``'s result: a stage is a test-time adaptation method."""
    return any(get_method(s.name).family == "test-time adaptation" for s in call.stages())


def resolve_protocol(call: MethodCall, protocol: str | None) -> str:
    """``None``: a method declared ``needs='sequential'`` runs sequentially, every other one-shot."""
    native = get_method(call.name).needs == "sequential"
    if protocol is None:
        return "sequential" if native else "one-shot"
    if protocol not in PROTOCOLS:
        raise InputError(f"unknown protocol {protocol!r}; use 'one-shot' or 'sequential'")
    if protocol == "one-shot" and native:
        raise InputError(f"{call.name} is a sequential method (experts arrive one at a time); run it with "
                         f"--protocol sequential")
    return protocol


def method_label(name: str, display_name: str | None, hparams: dict) -> str:
    """A leaderboard row's method: its display name, plus the hyperparameters that differ from its defaults (a
    method no longer registered shows them all)."""
    try:
        defaults = MethodCall(name).resolve().plain_hparams() if hparams else {}
    except (UnknownMethodError, ValueError):
        defaults = {}
    changed = {k: v for k, v in hparams.items() if defaults.get(k) != v}
    if "base" in changed:  # the full base spec is in the Pipeline column; name its method here
        changed["base"] = str(changed["base"]).split("(")[0]
    return (display_name or name) + (f" ({', '.join(f'{k}={v}' for k, v in changed.items())})" if changed else "")


def at_defaults(call: MethodCall | str) -> bool:
    """Whether ``call`` (a resolved call or its text) is its method at every default (a method no longer
    registered: no)."""
    try:
        call = MethodCall.parse(call)
        return str(call) == str(MethodCall(call.name).resolve())
    except (UnknownMethodError, ValueError):
        return False


def method_facts(call: MethodCall) -> dict:
    """The record's ``method``: the registry's facts of ``call`` (a resolved call) that records and leaderboards
    show."""
    spec = get_method(call.name)
    hparams = call.plain_hparams()
    return {"name": call.name, "display_name": spec.display_name,
            "label": method_label(call.name, spec.display_name, hparams), "at_defaults": at_defaults(call),
            "pipeline": str(call), "hparams": hparams,
            "needs": sorted(call.needs()), "adds_params": any(get_method(s.name).adds_params for s in call.stages()),
            "paper": spec.paper.cite() if spec.paper else None, "source": spec.source, "family": spec.family}


@dataclass(frozen=True)
class SuiteIdentity:
    """What of a suite a run's identity holds: its name (the results folder), tasks, and artifact hashes."""

    name: str
    tasks: tuple[str, ...]
    key: Any = None          # the suite's cache key (its build's identity), else its checkpoint hashes
    checkpoints: Any = None  # {file: sha256} of the checkpoints the run merges

    @classmethod
    def of(cls, suite) -> "SuiteIdentity":
        info = suite.info
        return cls(suite.name, tuple(suite.tasks), info.get("cache_key") or info.get("checkpoints"),
                   info.get("checkpoints"))


@dataclass(frozen=True)
class RunSpec:
    """One run's settings, resolved: ``call`` with its budget applied and every hyperparameter filled, the
    precision resolved for ``device``, the protocol chosen and its task orders drawn."""

    call: MethodCall
    suite: SuiteIdentity
    seed: int = 0
    device: str = "cpu"
    precision: str = "fp32"           # resolved: "bf16" or "fp32"
    requested_precision: str = "auto"  # as asked; "auto" lets a run reuse a record of the other precision
    budget: str = "paper"
    protocol: str = "one-shot"
    orders: tuple[tuple[str, ...], ...] | None = None  # the sequential protocol's task orders
    unlabeled_split: str = "test"
    data_fraction: float = 1.0
    tune: tuple[tuple[str, tuple], ...] = ()  # ((hyperparameter, values), ...) selected on the validation split
    time_limit_s: float | None = None
    memory_limit_mb: float | None = None
    adapter: str | None = field(default=None, compare=False)  # how a one-shot method runs sequentially

    @classmethod
    def build(cls, method: str | MethodCall, suite, *, seed: int = 0, device: str | torch.device = "auto",
              precision: str = "auto", budget: str = "paper", protocol: str | None = None,
              orders: int | list[list[str]] = DEFAULT_ORDERS, unlabeled_split: str = "test",
              data_fraction: float = 1.0, tune: dict[str, list] | None = None, time_limit_s: float | None = None,
              memory_limit_mb: float | None = None) -> "RunSpec":
        """The spec of ``method`` (a spec text or a call) on ``suite`` (a loaded suite) with these settings; every
        setting is checked here (unknown names, values out of range), before any work."""
        device = resolve_device(device)
        if precision not in PRECISIONS:
            raise InputError(f"unknown precision {precision!r}; use one of {list(PRECISIONS)}")
        call = MethodCall.parse(method).with_budget(budget).resolve()
        tune = {k: list(v) for k, v in (tune or {}).items()}
        for name, values in tune.items():  # unknown names and out-of-range values are errors before any work
            for value in values:
                call.with_hparams(**{name: value}).resolve()
        protocol = resolve_protocol(call, protocol)
        order_list, adapter = None, None
        if protocol == "sequential":
            if tune:
                raise InputError("--tune (validation selection) is not available under the sequential protocol")
            adapter = check_sequential(call)
            order_list = tuple(tuple(o) for o in task_orders(suite.tasks, orders, seed))
        return cls(call, SuiteIdentity.of(suite), int(seed), str(device), resolve_precision(precision, device),
                   precision, budget, protocol, order_list, unlabeled_split, data_fraction,
                   tuple((k, tuple(v)) for k, v in tune.items()), check_seconds(time_limit_s),
                   check_seconds(memory_limit_mb, "memory limit", "MB"), adapter)

    @classmethod
    def from_record(cls, rec: dict) -> "RunSpec":
        """The spec a record was run with, from its stored settings (the requested pipeline, suite, seed,
        precision, budget, data, validation grid and task orders)."""
        info = rec["suite"]
        config = rec.get("config") or {}
        selected = (rec.get("selection") or {}).get("protocol", "fixed") != "fixed"
        pipeline = config["pipeline"] if selected else rec["method"]["pipeline"]
        data = config.get("data") or {}
        orders = (rec.get("sequential") or {}).get("orders") if rec.get("protocol") == "sequential" else None
        return cls(MethodCall.parse(pipeline).resolve(),
                   SuiteIdentity(info["name"], tuple(info["tasks"]), info.get("cache_key") or info.get("checkpoints"),
                                 info.get("checkpoints")),
                   rec["seed"], rec.get("device", "cpu"), rec.get("precision", "fp32"), rec.get("precision", "fp32"),
                   (rec.get("budget") or {}).get("requested", "paper"), rec.get("protocol") or "one-shot",
                   tuple(tuple(o) for o in orders) if orders is not None else None,
                   data.get("unlabeled_split", "test"), data.get("fraction", 1.0),
                   tuple((k, tuple(v)) for k, v in (config.get("tune") or {}).items()),
                   rec.get("time_limit_s"), rec.get("memory_limit_mb"))

    # ------------------------------------------------------------ identity
    @property
    def sequential(self) -> bool:
        return self.protocol == "sequential"

    @property
    def tune_grid(self) -> dict[str, list]:
        return {k: list(v) for k, v in self.tune}

    def config(self, precision: str | None = None) -> dict:
        """What determines the run's result, as stored in its record's ``config`` (``precision``: another
        resolved precision in place of the spec's, for :meth:`reusable_hashes`)."""
        config = {"pipeline": str(self.call), "suite": self.suite.key, "checkpoints": self.suite.checkpoints,
                  "seed": self.seed, "data": {"unlabeled_split": self.unlabeled_split, "fraction": self.data_fraction},
                  "tune": self.tune_grid}
        if uses_precision(self.call):
            config["precision"] = precision or self.precision
        if self.orders is not None:
            config.update({"protocol": "sequential", "orders": [list(o) for o in self.orders]})
        return config

    def config_hash(self) -> str:
        """The run's identity: the hash of :meth:`config`."""
        return config_hash(self.config())

    def reusable_hashes(self) -> list[str]:
        """The configuration hashes whose ok record the run may reuse, its own first. Under precision "auto" a
        test-time adaptation run also reuses the record of the other precision: auto picks whichever the hardware
        multiplies fastest, so records made on a machine with bfloat16 hardware serve one without it and the
        other way round (each record says which it ran at); an explicit precision asks for that one alone."""
        own = self.config_hash()
        if self.requested_precision != "auto" or not uses_precision(self.call):
            return [own]
        return [own] + [config_hash(self.config(p)) for p in PRECISIONS if p not in ("auto", self.precision)]

    def record_path(self, results_dir) -> Path:
        return record_path(results_dir, self.suite.name, ("sequential_" if self.sequential else "") + str(self.call),
                           self.config_hash())
