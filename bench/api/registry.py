"""The method registry: ``@register_method`` on a plain function, lookup, wildcards, plugins.

Built-in methods live in ``mergebench.methods`` and register on import. External plugins
declare an entry point in the group ``mergebench.methods`` (value: a module, or
``module:object``); loading it imports the module, whose ``@register_method`` calls register.
The lookup, aliases, wildcards and plugin discovery are those of every registry
(:class:`mergebench.api.catalog.Registry`): ``METHODS``.

A method is ``fn(ctx: MergeContext, **hyperparameters) -> MergedModel``. Its hyperparameters
are its keyword arguments: the defaults are the paper's and the annotations give the types the
CLI parses. A parameter named ``base`` makes it an add-on: the harness runs the base method
first (a method spec such as ``"task_arithmetic(scaling=0.3)"``) and passes the merged model.
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

from mergebench.api.catalog import Registry, UnknownNameError, close_matches  # noqa: F401  (close_matches: re-exported)
from mergebench.api.catalog import parse_bool
from mergebench.errors import InputError
from mergebench.api.needs import NEEDS  # noqa: F401  (what data a method may ask its context for)
from mergebench.api.ranges import Interval

ENTRY_POINT_GROUP = "mergebench.methods"


# The budgets a run can use. "paper": the method's defaults, which are its paper's (steps, batch sizes, amounts of
# data, as the official code runs them). "smoke": the few-step overrides a method declares for tests and the
# conformance kit (``register_method(..., smoke={"steps": 2})``); a smoke run is marked below the paper's budget.
BUDGETS = ("paper", "smoke")


# What a method may require of the suite's experts beyond full weights; a suite says which it meets
# (``Suite.meets``, ``Suite.provides``).
REQUIREMENTS = {
    "lora": "LoRA experts with their factors (mini8-lora, micro-lora, or PEFT adapters in a real-suite manifest)",
}


class UnknownMethodError(UnknownNameError):
    pass


class HyperparameterError(InputError):
    pass


@dataclass(frozen=True)
class Paper:
    title: str
    year: int | None = None
    arxiv: str | None = None
    venue: str | None = None
    code: str | None = None

    def cite(self, markdown: bool = False) -> str:
        """"Title, Venue Year, arXiv N"; ``markdown``: the title in italics, the arXiv id and the code linked."""
        bits = [f"*{self.title}*" if markdown else self.title]
        if self.venue or self.year:
            bits.append(" ".join(str(b) for b in (self.venue, self.year) if b))
        if self.arxiv:
            bits.append(f"[arXiv {self.arxiv}](https://arxiv.org/abs/{self.arxiv})" if markdown else f"arXiv {self.arxiv}")
        if markdown and self.code:
            bits.append(f"[code]({self.code})")
        return ", ".join(bits)


@dataclass(frozen=True)
class Hyperparameter:
    name: str
    default: Any
    type: Any
    help: str = ""
    range: Interval | None = None  # register_method(..., ranges={name: "(0, 100]"}); None: any value of the type

    def check(self, value: Any, method: str) -> None:
        """A value outside the declared range is a :class:`HyperparameterError` naming method, value and range."""
        if self.range is not None and value is not None and value not in self.range:
            raise HyperparameterError(f"{method}: {self.name}={value!r} is outside its range {self.range}")

    def parse(self, text: Any) -> Any:
        """Coerce a CLI string (or a Python value) to this hyperparameter's type."""
        if not isinstance(text, str):
            if self.type is float and isinstance(text, int) and not isinstance(text, bool):
                return float(text)  # 20 and 20.0 are one configuration
            return text
        if self.type is str:
            return text
        target = self.type
        origin = typing.get_origin(target)
        if origin is typing.Literal:
            choices = typing.get_args(target)
            for c in choices:
                if str(c) == text:
                    return c
            raise HyperparameterError(f"{self.name} must be one of {list(choices)}, got {text!r}")
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            args = [a for a in typing.get_args(target) if a is not type(None)]
            if text.lower() == "none":
                return None
            target = args[0]
        if target is bool:
            if (flag := parse_bool(text)) is None:
                raise HyperparameterError(f"{self.name} is a bool; got {text!r}")
            return flag
        try:
            return target(text)
        except (TypeError, ValueError) as e:
            raise HyperparameterError(f"{self.name} expects {getattr(target, '__name__', target)}, got {text!r}") from e


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Callable
    display_name: str
    paper: Paper | None
    needs: str
    adds_params: bool
    hyperparameters: dict = field(default_factory=dict)  # name -> Hyperparameter
    defaults_source: str = ""
    family: str = ""
    source: str = "built-in"
    requires: tuple = ()  # keys of REQUIREMENTS, e.g. ("lora",)
    # a sequential method's data: the kind of the arriving task's data it may ask for ("nothing" = data-free)
    sequential_data: str = "nothing"
    # hyperparameter -> the paper's value, for the amounts of compute and data (steps, batch sizes, exemplars):
    # a smaller value is a smaller budget. The defaults must equal it (a test checks every registered method).
    paper_budget: dict = field(default_factory=dict)
    smoke: dict = field(default_factory=dict)  # hyperparameter -> value of the smoke budget
    notes: str = ""  # documentation after the docstring that a family of methods shares (budget, deviations)

    def below_paper(self, hparams: dict) -> list[str]:
        """``["steps=100 < 500", ...]``: the budget hyperparameters of ``hparams`` below the paper's values."""
        out = []
        for key, paper in self.paper_budget.items():
            value = hparams.get(key, paper)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < paper:
                out.append(f"{key}={value:g} < {paper:g}")
        return out

    @property
    def is_addon(self) -> bool:
        return "base" in self.hyperparameters

    @property
    def all_needs(self) -> set[str]:
        """``needs`` plus, for a sequential method, the kind of data it declared (``sequential_data``)."""
        return {self.needs} | ({self.sequential_data} if self.sequential_data != "nothing" else set())

    @property
    def doc(self) -> str:
        """The function's docstring, then the shared ``notes``."""
        return "\n\n".join(part for part in (inspect.getdoc(self.fn), inspect.cleandoc(self.notes)) if part)

    def summary(self) -> dict:
        return {
            "name": self.name, "display_name": self.display_name,
            "paper": self.paper.cite() if self.paper else None, "needs": self.needs,
            "adds_params": self.adds_params, "family": self.family, "source": self.source,
            "hyperparameters": {k: h.default for k, h in self.hyperparameters.items()},
            "ranges": {k: str(h.range) for k, h in self.hyperparameters.items() if h.range is not None},
            "defaults_source": self.defaults_source, "requires": list(self.requires),
            "paper_budget": dict(self.paper_budget), "smoke": dict(self.smoke),
        }


def _register_entry_point(name: str, obj) -> None:
    """``module:function`` pointing at an unregistered function: register it under the entry point's name."""
    if callable(obj) and not hasattr(obj, "method_spec"):
        register_method(name)(obj)


METHODS: Registry[MethodSpec] = Registry(
    "method", group=ENTRY_POINT_GROUP, builtins="mergebench.methods",
    listing="`mergebench list-methods` lists them all", on_entry_point=_register_entry_point,
    identity=lambda spec: _qualname(spec.fn), error=UnknownMethodError)


def register_method(name: str | Callable | None = None, *, display_name: str | None = None, paper: Paper | dict | None = None,
                    needs: str = "nothing", adds_params: bool = False, defaults_source: str = "",
                    family: str = "", hyperparameter_help: dict | None = None, sequential_data: str = "nothing",
                    requires: tuple | list = (), paper_budget: dict | None = None, smoke: dict | None = None,
                    ranges: dict | None = None, aliases: tuple | list = (), notes: str = ""):
    """Register a merging method (a plain function of ``(ctx, **hyperparameters)``); the name defaults to the
    function's name, ``aliases`` are former names that keep resolving (records store names).

    Example::

        @register_method("task_arithmetic", paper=Paper("Editing Models with Task Arithmetic", 2023, "2212.04089"))
        def task_arithmetic(ctx, scaling: float = 0.3):
            return ctx.shared_model(ctx.pretrained_weights + scaling * sum(ctx.task_vectors().values()))

    ``paper_budget`` names the hyperparameters that measure compute or data (steps, batch size, exemplars) with
    the paper's values, which the defaults must equal; a run below them is marked on the leaderboard.
    ``smoke`` gives the values of the smoke budget (``--budget smoke``: tests, the conformance kit), e.g.
    ``smoke={"steps": 2}``.
    ``ranges`` declares the valid values of numeric hyperparameters in interval notation, e.g.
    ``ranges={"k": "(0, 100]", "scaling": "[0, inf)", "steps": "[1, inf)"}``; a value outside is an error when
    the method spec is resolved (before any work), naming the method, the value and the range.
    ``notes``: documentation that follows the docstring, shared by a family of methods (their budget and
    deviations), written once beside them.
    """
    if callable(name):  # bare @register_method
        return register_method()(name)
    if needs not in NEEDS:
        raise ValueError(f"needs={needs!r} is not one of {list(NEEDS)}")
    if sequential_data not in ("nothing", "unlabeled", "labeled") or (sequential_data != "nothing" and needs != "sequential"):
        raise ValueError(f"sequential_data={sequential_data!r}: one of 'nothing', 'unlabeled', 'labeled', and only "
                         f"with needs='sequential' (the arriving task's data)")
    if isinstance(paper, dict):
        paper = Paper(**paper)
    unknown = [r for r in requires if r not in REQUIREMENTS]
    if unknown:
        raise ValueError(f"requires={unknown!r}: known requirements are {list(REQUIREMENTS)}")

    def decorator(fn: Callable) -> Callable:
        key = name or fn.__name__
        hyper = _hyperparameters(fn, hyperparameter_help or {}, ranges or {}, key)
        budget = _budget_values(fn, hyper, paper_budget or {}, "paper_budget")
        smoke_values = _budget_values(fn, hyper, smoke or {}, "smoke")
        spec = MethodSpec(
            name=key, fn=fn, display_name=display_name or key, paper=paper, needs=needs,
            adds_params=adds_params, hyperparameters=hyper, defaults_source=defaults_source,
            family=family, source=_source_of(fn), sequential_data=sequential_data, requires=tuple(requires),
            paper_budget=budget, smoke=smoke_values, notes=notes,
        )
        METHODS.add(key, spec, aliases=aliases, module=fn.__module__)
        fn.method_spec = spec
        return fn

    return decorator


@dataclass(frozen=True)
class Variant:
    """One row of a method family's table of variants (as timm's ``default_cfgs``): what it is called, its own
    docstring, the arguments of the family's function it fixes (``fixed``: not hyperparameters), the defaults it
    changes (``defaults``: still hyperparameters) and registration fields of its own (``register``)."""

    display_name: str
    doc: str
    fixed: dict = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)
    register: dict = field(default_factory=dict)


def register_variants(variants: dict[str, Variant], **registration) -> Callable:
    """Register one function of a family once per row of ``variants`` (name -> :class:`Variant`).

    Each variant is a method of its own (name, display name, hyperparameters, docs: its row's docstring, then the
    family's ``notes``). The family's ``registration`` (``register_method``'s keywords)
    applies to every row, its ``ranges``, ``hyperparameter_help``, ``paper_budget`` and ``smoke`` restricted to
    the row's hyperparameters; a row's ``register`` adds to or overrides it. Example::

        @register_variants({"adamerging_taskwise": Variant("AdaMerging (task-wise)", "...", fixed={"granularity": "task"}),
                            "adamerging_layerwise": Variant("AdaMerging (layer-wise)", "...", fixed={"granularity": "layer"})},
                           paper=ADAMERGING, needs="unlabeled")
        def adamerging(ctx, granularity: str, steps: int = 500): ...
    """
    def decorator(fn: Callable) -> Callable:
        signature = inspect.signature(fn)
        hints = typing.get_type_hints(fn)
        for name, row in variants.items():
            unknown = [k for k in {**row.fixed, **row.defaults} if k not in signature.parameters]
            if unknown:
                raise ValueError(f"variant {name!r} of {_qualname(fn)} names {unknown}, not arguments of it")
            params = [p.replace(default=row.defaults.get(p.name, p.default)) for p in signature.parameters.values()
                      if p.name not in row.fixed]
            register_method(name, display_name=row.display_name, **{
                **{k: ({n: v for n, v in value.items() if n in {p.name for p in params}}
                       if k in ("ranges", "hyperparameter_help", "paper_budget", "smoke") else value)
                   for k, value in registration.items()}, **row.register})(
                _VariantFunction(fn, name, row, signature.replace(parameters=params), hints))
        return fn

    return decorator


class _VariantFunction:
    """A variant's method: the family's function called with the row's fixed arguments. It pickles as its
    registered name (a worker process finds it in its own registry)."""

    def __init__(self, fn: Callable, name: str, row: Variant, signature: inspect.Signature, hints: dict):
        self.__wrapped__ = fn   # the family's function (its module's source keys the base cache)
        self.__name__ = self.__qualname__ = name
        self.__module__ = fn.__module__
        self.__doc__ = row.doc
        self.__signature__ = signature
        self.__annotations__ = {k: v for k, v in hints.items() if k in signature.parameters or k == "return"}
        self._fixed = dict(row.fixed)

    def __call__(self, ctx, **hyperparameters):
        bound = self.__signature__.bind(ctx, **hyperparameters)
        bound.apply_defaults()   # the variant's defaults, not the family function's
        return self.__wrapped__(ctx, **dict(list(bound.arguments.items())[1:]), **self._fixed)

    def __reduce__(self):
        return _registered_function, (self.__name__,)


def _registered_function(name: str) -> Callable:
    return get_method(name).fn


def _qualname(fn):
    return f"{fn.__module__}.{fn.__qualname__}"


def _source_of(fn) -> str:
    module = getattr(fn, "__module__", "") or ""
    return "built-in" if module.startswith("mergebench.") else f"plugin ({module.split('.')[0]})"


def _hyperparameters(fn: Callable, help_text: dict, ranges: dict | None = None, method: str = "") -> dict:
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    if not params:
        raise TypeError(f"{_qualname(fn)} must take the merge context as its first argument")
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable annotations: fall back to the defaults' types
        hints = {}
    out = {}
    for p in params[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is inspect.Parameter.empty:
            raise TypeError(f"hyperparameter {p.name!r} of {_qualname(fn)} needs a default (the paper's value)")
        typ = hints.get(p.name, type(p.default) if p.default is not None else str)
        out[p.name] = Hyperparameter(p.name, p.default, typ, help_text.get(p.name, ""))
    for key, text in (ranges or {}).items():
        hp = out.get(key)
        if hp is None or key == "base":
            raise ValueError(f"ranges of {_qualname(fn)} names {key!r}, which is not one of its hyperparameters "
                             f"({', '.join(k for k in out if k != 'base') or 'none'})")
        if not ({float, int} & ({hp.type} | set(typing.get_args(hp.type)))):
            raise ValueError(f"ranges of {_qualname(fn)}: {key!r} is not a number ({hp.type}), so it has no range")
        out[key] = hp = Hyperparameter(hp.name, hp.default, hp.type, hp.help, Interval.parse(text))
        try:
            hp.check(hp.default, method or fn.__name__)
        except HyperparameterError as e:
            raise ValueError(f"the default of {_qualname(fn)}: {e}") from None
    return out


def _budget_values(fn: Callable, hyper: dict, values: dict, what: str) -> dict:
    unknown = [k for k in values if k not in hyper or k == "base"]
    if unknown:
        raise ValueError(f"{what} of {_qualname(fn)} names {unknown!r}, which are not its hyperparameters "
                         f"({', '.join(k for k in hyper if k != 'base') or 'none'})")
    out = {k: hyper[k].parse(v) for k, v in values.items()}
    for k, v in out.items():
        try:
            hyper[k].check(v, _qualname(fn))
        except HyperparameterError as e:
            raise ValueError(f"{what}: {e}") from None
    return out


def discover_plugins(force: bool = False) -> dict[str, str]:
    """Import the built-ins and every entry point of the group; returns plugin load errors."""
    return METHODS.discover(force)


def get_method(name: str) -> MethodSpec:
    """The method registered as ``name`` (or under a former name, an alias); close matches when unknown."""
    return METHODS.get(name)


def list_methods(pattern: str | list[str] = "*", needs: str | None = None) -> list[str]:
    """Registered method names matching shell-style wildcards (like ``timm.list_models('vit_*')``)."""
    names = METHODS.names(pattern, sort=True)
    if needs is not None:
        names = [n for n in names if METHODS.get(n).needs == needs]
    return names


def unmet_requirements(spec: MethodSpec, suite) -> list[str]:
    """The requirements of ``spec`` that ``suite`` does not meet (e.g. ["lora"] on a suite of full experts)."""
    return [r for r in spec.requires if not suite.meets(r)]


def unregister_method(name: str) -> None:
    """Remove a method (tests and plugin development)."""
    METHODS.unregister(name)
