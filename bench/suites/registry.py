"""The suite registry: ``@register_suite`` on a loader function, ``get_suite(name, **options)``.

A suite is registered once, with what it knows about its own results::

    @register_suite(sanity=MergingSanity(expert_gap=25), description="eight procedural 32-px tasks")
    def mini8(build: bool = True, verbose: bool = True) -> Suite:
        return load_mini8("mini8")

The name defaults to the function's name (``register_suite("mini8-lora")`` for names that are not
identifiers). The loader's keyword arguments other than ``build`` and ``verbose`` are the suite's options
(the real suite's ``manifest``, ``data_root``, ...): ``get_suite``, the command line and sweeps pass them
through. On the command line every option is ``--suite-option KEY=VALUE``; those named in ``flags`` (option ->
help) also get a flag of their own on every command that loads a suite (``flags={"data_root": "the folder
holding the datasets"}`` gives ``--data-root DIR``; a ``bool`` option is a switch). ``sanity`` checks the leaderboard's rows (lines such as "(a) ...: holds") and
``references`` gives the published numbers to show beside them; the leaderboard only displays what they
return. External packages register suites through the entry-point group ``mergebench.suites`` (value: the
module that calls ``register_suite``), as methods do through ``mergebench.methods``.
"""

from __future__ import annotations

import fnmatch
import functools
import inspect
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

from mergebench.api.catalog import Registry, UnknownNameError, close_matches, parse_bool
from mergebench.errors import InputError, MissingFileError
from mergebench.suites.base import Suite
from mergebench.suites.ranking import calibration_set, ranking_agreement

ENTRY_POINT_GROUP = "mergebench.suites"


class UnknownSuiteError(UnknownNameError):
    pass


class SuiteOptionError(InputError):
    """An option (keyword argument) the suite's loader does not take."""


@dataclass(frozen=True)
class References:
    """Published numbers a suite shows beside its measured rows (``SuiteSpec.references``)."""

    title: str                 # the section's heading
    note: str                  # where the numbers come from and what they are compared with
    rows: list[dict]           # {"method", "display", "avg", "verified", "source"} per published number


@dataclass(frozen=True)
class MergingSanity:
    """The properties a merging benchmark must show, checked on measured numbers (needs the reference rows):
    (a) the experts far above the pretrained model, on average and on every task; (b) interference: Task
    Arithmetic well below the experts; (c) merging partly works: Task Arithmetic above the pretrained model and
    Weight Averaging, recovering a share of the pretrained-to-expert gap; (d) the test-time signal is
    informative: on the Task Arithmetic model, prediction entropy ranks correct above wrong predictions on every
    task (AUROC, from the record's evaluation); (e) methods separate: the data-free, closed-form and test-time
    merges span some points between the weakest and the best; (f) the ranking is the real benchmark's: Kendall tau
    between the rows of the calibration set's methods at their defaults and their published averages, with every
    one of them on the published side of Task Arithmetic. A threshold of 0 leaves its check out."""

    expert_gap: float = 25.0     # (a) points between the experts and the pretrained model
    task_gap: float = 0.0        # (a) ... on every task
    interference: float = 10.0   # (b) points between the experts and Task Arithmetic
    recovery: float = 0.2        # (c) share of the gap Task Arithmetic recovers
    auroc: float = 0.0           # (d) least per-task entropy AUROC on the Task Arithmetic model
    span: float = 0.0            # (e) points between the weakest and the best merge of SPAN_FAMILIES
    ranking_tau: float = 0.0     # (f) Kendall tau with the published averages of the calibration set (suites/ranking)
    # (g) the mechanisms, from the folder's `mergebench diagnose` report: the share of the experts' gain kept (mean
    # over experts) by their top-20% entries and by rank 10%, LOT's own-update share, the share of the label-trained layer-wise
    # coefficients' gain that entropy finds, and the zero-shot model less sure where it is wrong
    mechanisms: bool = False
    trim_20: float = 0.90
    rank_10: float = 0.90
    lot_share: float = 0.75
    entropy_share: float = 0.60
    task_arithmetic: str = "task_arithmetic(scaling=0.3)"  # the Task Arithmetic row the checks read

    SPAN_FAMILIES = ("data-free", "data-free (masks)", "data-based closed form", "test-time adaptation")

    def __call__(self, rows, records: list[dict] | None = None, diagnostics: dict | None = None) -> list[str]:
        by = {r["Pipeline"].split("(")[0]: r for _, r in rows.iterrows()}
        ta_row = next((r for _, r in rows.iterrows() if r["Pipeline"] == self.task_arithmetic),
                      by.get("task_arithmetic"))
        if any(x is None for x in (by.get("pretrained"), by.get("individual"), by.get("weight_averaging"), ta_row)):
            return []
        pre, ind, wa, ta = by["pretrained"]["Avg"], by["individual"]["Avg"], by["weight_averaging"]["Avg"], ta_row["Avg"]
        measured = records[0]["metrics"]["accuracy"] if records else {}
        tasks = [c for c in rows.columns if c in measured]
        gap = ind - pre
        recovered = (ta - pre) / gap if gap else float("nan")
        mark = lambda ok: "holds" if ok else "FAILS"  # noqa: E731
        a = f"(a) experts vs pretrained: {ind:.1f} vs {pre:.1f}, +{gap:.1f} points (>= {self.expert_gap:g} required)"
        ok_a = gap >= self.expert_gap
        if self.task_gap and tasks:
            per = {t: by["individual"][t] - by["pretrained"][t] for t in tasks}
            worst = min(per, key=per.get)
            a += (f"; every task's expert >= {self.task_gap:g} points above the pretrained model (least: {worst} "
                  f"+{per[worst]:.1f})")
            ok_a = ok_a and per[worst] >= self.task_gap
        lines = [
            f"{a}: {mark(ok_a)}",
            f"(b) interference: Task Arithmetic {ta:.1f} is {ind - ta:.1f} points below the experts "
            f"(>= {self.interference:g} required): {mark(ind - ta >= self.interference)}",
            f"(c) merging partly works: Task Arithmetic {ta:.1f} vs pretrained {pre:.1f} and Weight Averaging {wa:.1f}; "
            f"recovers {100 * recovered:.0f}% of the pretrained-to-expert gap (>= {100 * self.recovery:g}% required): "
            f"{mark(ta > pre and ta > wa and recovered >= self.recovery)}",
        ]
        if self.auroc:
            ta_rec = next((r for r in records or [] if r["method"]["pipeline"] == ta_row["Pipeline"]), None)
            au = (ta_rec or {}).get("metrics", {}).get("entropy_auroc")
            if au:
                shown = ", ".join(f"{t} {v:.2f}" for t, v in au.items())
                lines.append(f"(d) the test-time signal is informative: on the Task Arithmetic model, prediction "
                             f"entropy separates correct from wrong predictions with AUROC {shown} (>= {self.auroc:g} "
                             f"on every task required): {mark(min(au.values()) >= self.auroc)}")
            else:
                lines.append("(d) the test-time signal: the Task Arithmetic record has no entropy AUROC (re-run it "
                             "with `--force`): FAILS")
        if self.span:
            family = {r["method"]["pipeline"]: r["method"].get("family") for r in records or []}  # the records'
            merged = {r["Method"]: r["Avg"] for _, r in rows.iterrows()
                      if family.get(r["Pipeline"]) in self.SPAN_FAMILIES}
            if len(merged) >= 2:
                lo, hi = min(merged, key=merged.get), max(merged, key=merged.get)
                spread = merged[hi] - merged[lo]
                lines.append(f"(e) methods separate: the {len(merged)} data-free, closed-form and test-time merges span "
                             f"{spread:.1f} points, {merged[lo]:.1f} ({lo}) to {merged[hi]:.1f} ({hi}) "
                             f"(>= {self.span:g} required): {mark(spread >= self.span)}")
        if self.ranking_tau:
            lines.append(self._ranking(rows, records, mark))
        if self.mechanisms:
            lines.append(self._mechanisms(diagnostics, mark))
        return lines

    def _mechanisms(self, d: dict | None, mark) -> str:
        if not d:
            return ("(g) the mechanisms: no `mergebench diagnose` report in this folder (run `mergebench diagnose "
                    "--suite SUITE --write`): FAILS")
        trim, rank = d["trim"]["20"], d["low_rank"]["10"]
        lot, found = d["subspace"]["own_share_lot"], d["entropy_headroom"]["share_found_by_entropy"]
        cal = d["calibration"]
        margin = cal["entropy_wrong"] - cal["entropy_correct"]
        checks = [
            (f"trimming to the top 20% keeps {trim['mean']:.0%} of the experts' gain (least {trim['min']:.0%}; >= "
             f"{self.trim_20:.0%})", trim["mean"] >= self.trim_20),
            (f"rank 10% keeps {rank['mean']:.0%} (least {rank['min']:.0%}; >= {self.rank_10:.0%})",
             rank["mean"] >= self.rank_10),
            (f"LOT's closed form keeps {lot:.2f} of each task's own layer update (>= {self.lot_share:.2f})",
             lot >= self.lot_share),
            (f"entropy-trained layer-wise coefficients find {found:.0%} of the label-trained ones' gain over Task "
             f"Arithmetic (>= {self.entropy_share:.0%})", found >= self.entropy_share),
            (f"the zero-shot model's mean entropy is {margin:+.2f} nats higher where it is wrong than where it is right "
             f"(> 0)", margin > 0),
        ]
        return ("(g) the mechanisms (DIAGNOSTICS.md): " + "; ".join(f"{text}: {mark(ok)}" for text, ok in checks)
                + f": {mark(all(ok for _, ok in checks))}")

    def _ranking(self, rows, records, mark) -> str:
        avg = {r["Pipeline"]: r["Avg"] for _, r in rows.iterrows()}
        defaults = {r["method"]["name"]: r["method"]["pipeline"] for r in records or [] if r["method"].get("at_defaults")}
        measured = {}
        for method in calibration_set()["published"]:
            if defaults.get(method) in avg:
                measured[method] = avg[defaults[method]]
        r = ranking_agreement(measured)
        text = (f"(f) the ranking is the real benchmark's: Kendall tau {r['tau']:.2f} between the {r['methods']} of "
                f"{r['of']} calibration methods at their defaults and their published ViT-B/32 averages "
                f"(datasets/mini8_calibration.yaml; >= {self.ranking_tau:g} required)")
        if r["missing"]:
            text += f"; no default-settings record of {', '.join(r['missing'])}"
        text += (f"; on the other side of Task Arithmetic than published: {', '.join(r['wrong_side'])}"
                 if r["wrong_side"] else "; every one on the published side of Task Arithmetic")
        ok = r["tau"] >= self.ranking_tau and not r["wrong_side"] and not r["missing"]
        return f"{text}: {mark(ok)}"


def _no_sanity(rows) -> list[str]:
    return []


def _no_references(records: list[dict]) -> References | None:
    return None


@dataclass(frozen=True)
class SuiteSpec:
    name: str
    loader: Callable[..., Suite]
    description: str = ""
    # the loader's keyword arguments beyond build/verbose: name -> inspect.Parameter (default, annotation)
    options: dict = field(default_factory=dict)
    builds: bool = True          # built locally on first use (``mergebench build NAME``)
    results: tuple = ()          # wildcards of the results folders its runs write to (default: its name)
    sanity: Callable = _no_sanity            # rows (the leaderboard's main table) -> lines
    references: Callable = _no_references    # the main table's records -> References | None
    flags: dict = field(default_factory=dict)  # option -> help: the options with a command-line flag of their own
    # method specs run by ``--all`` beside every method's defaults: the seed papers' headline configurations
    showcase: tuple = ()

    def load(self, build: bool = True, verbose: bool = True, **options) -> Suite:
        unknown = [k for k in options if k not in self.options]
        if unknown:
            raise SuiteOptionError(f"suite {self.name!r} takes no option {unknown[0]!r}"
                            f"{close_matches(unknown[0], self.options)} (its options: "
                            f"{', '.join(self.options) or 'none'})")
        try:
            suite = self.loader(build=build, verbose=verbose, **options)
        except FileNotFoundError as e:  # not built, no manifest, no data root: the user's to fix
            if isinstance(e, MissingFileError):
                raise
            raise MissingFileError(str(e)) from None
        # the same files, loaded again (built by now, so never a build): restores the suite after a method changed
        # its inputs, and rebuilds it in a fresh process (a time-limited run on CUDA)
        suite.reload = functools.partial(get_suite, self.name, build=False, verbose=False, **options)
        return suite

    def parse_options(self, values: dict[str, Any]) -> dict[str, Any]:
        """Options given as text (``--suite-option KEY=VALUE``, a sweep's YAML) coerced to the loader's annotated
        types: ``bool`` (true/false), ``int``, ``float``, ``list[str]`` (comma-separated); others as given."""
        out = {}
        for key, value in values.items():
            if key not in self.options:
                raise SuiteOptionError(f"suite {self.name!r} takes no option {key!r}{close_matches(key, self.options)} "
                                       f"(its options: {', '.join(self.options) or 'none'})")
            out[key] = _coerce(key, value, self.option_type(key), self.name)
        return out

    def option_type(self, key: str) -> Any:
        """The annotated type of option ``key`` (the type of its default where the annotation cannot be resolved)."""
        try:
            hints = typing.get_type_hints(self.loader)
        except Exception:  # unresolvable annotations: the defaults' types
            hints = {}
        return hints.get(key, type(self.options[key].default))

    def is_switch(self, key: str) -> bool:
        """Whether option ``key`` is a ``bool`` (a flag without a value on the command line)."""
        return self.option_type(key) is bool

    def writes_to(self, folder: str) -> bool:
        """Whether ``folder`` (a results folder: the suite name its records carry) holds this suite's runs."""
        return any(fnmatch.fnmatchcase(folder, p) for p in (self.results or (self.name,)))


def _coerce(key: str, value: Any, annotation: Any, suite: str) -> Any:
    if not isinstance(value, str):
        return value
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if value.lower() == "none":
            return None
        annotation = args[0]
    origin = typing.get_origin(annotation) or annotation
    if origin in (list, tuple):
        return [v.strip() for v in value.split(",") if v.strip()]
    if origin is bool:
        if (flag := parse_bool(value)) is None:
            raise SuiteOptionError(f"suite {suite!r}: option {key} is true or false, got {value!r}")
        return flag
    if origin in (int, float):
        try:
            return origin(value)
        except ValueError:
            raise SuiteOptionError(f"suite {suite!r}: option {key} expects {origin.__name__}, got {value!r}") from None
    return value


SUITES: Registry[SuiteSpec] = Registry(
    "suite", group=ENTRY_POINT_GROUP, builtins="mergebench.suites.builtin", error=UnknownSuiteError,
    identity=lambda spec: f"{spec.loader.__module__}.{spec.loader.__qualname__}")


def register_suite(name: str | Callable | None = None, *, description: str | None = None, builds: bool = True,
                   results: str | tuple | list = (), sanity: Callable | None = None,
                   references: Callable | None = None, aliases: tuple | list = (), flags: dict | None = None,
                   showcase: tuple | list = ()):
    """Register a suite loader ``fn(build=True, verbose=True, **options) -> Suite`` (see the module docstring).

    ``description`` defaults to the first line of the loader's docstring; ``builds=False`` for suites read from
    the user's files (not built by ``mergebench build``); ``results`` the wildcards of the results folders its
    runs go to when they differ from its name (the real suite: ``real-*``, after the manifest's name); ``flags``
    the options that get a command-line flag of their own, with the flag's help (``{"manifest": "the model-zoo
    manifest"}``: ``--manifest``); ``showcase`` method specs that ``mergebench run --all`` (and ``demo``) run beside
    every method's defaults (``("surgery(base=adamerging_layerwise)",)``: a paper's headline configuration)."""
    if callable(name):  # bare @register_suite
        return register_suite()(name)

    def decorator(fn: Callable) -> Callable:
        params = inspect.signature(fn).parameters
        missing = [p for p in ("build", "verbose") if p not in params]
        if missing:
            raise TypeError(f"suite loader {fn.__module__}.{fn.__qualname__} must take {' and '.join(missing)} "
                            f"as keyword arguments (build: build on first use; verbose: print progress)")
        options = {k: p for k, p in params.items() if k not in ("build", "verbose")
                   and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        key = name or fn.__name__
        unknown = [k for k in flags or {} if k not in options]
        if unknown:
            raise TypeError(f"suite loader {fn.__module__}.{fn.__qualname__}: flags name {unknown[0]!r}, which is not "
                            f"one of its options ({', '.join(options) or 'none'})")
        doc = (inspect.getdoc(fn) or "").strip().splitlines()
        spec = SuiteSpec(key, fn, description if description is not None else (doc[0] if doc else ""), options,
                         builds, (results,) if isinstance(results, str) else tuple(results),
                         sanity or _no_sanity, references or _no_references, dict(flags or {}), tuple(showcase))
        SUITES.add(key, spec, aliases=aliases, module=fn.__module__)
        fn.suite_spec = spec
        return fn

    return decorator


def get_suite_spec(name: str) -> SuiteSpec:
    return SUITES.get(name)


def list_suites(pattern: str | list[str] = "*", builds: bool | None = None) -> list[str]:
    """Registered suite names matching shell-style wildcards, in registration order (built-ins first)."""
    names = SUITES.names(pattern)
    return [n for n in names if builds is None or SUITES.get(n).builds == builds]


def get_suite(name: str, build: bool = True, verbose: bool = True, **options: Any) -> Suite:
    """The suite ``name`` (``mini8``, ``micro``, ``real``, ... or a plugin's), built on first use if ``build``;
    ``options`` are its loader's keyword arguments (``get_suite("real", manifest=..., data_root=...)``)."""
    return SUITES.get(name).load(build=build, verbose=verbose, **options)


def suite_for_results(folder: str) -> SuiteSpec | None:
    """The registered suite whose runs a results folder holds (``real-ViT-B-32`` -> ``real``), or None."""
    if folder in SUITES:
        return SUITES.get(folder)
    return next((SUITES.get(n) for n in SUITES.names() if SUITES.get(n).writes_to(folder)), None)
