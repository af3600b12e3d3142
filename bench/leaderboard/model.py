"""The table model: records -> rows (one per method pipeline and task set: its newest ok record), budget views,
the Pareto front, budget marks; and :class:`Board`, one results folder's records, loaded once.

Every number in a table comes from a record, and every record from a run. The output formats
(:mod:`mergebench.leaderboard.formats`) only arrange what this module computes.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import warnings
from functools import cached_property
from pathlib import Path

import pandas as pd

from mergebench.errors import InputError
from mergebench.engine.records import DIAGNOSTICS_FILE, Items, check_fields, load_records
from mergebench.api.catalog import close_matches
from mergebench.api.needs import NEEDS
from mergebench.suites import suite_for_results

BUDGET_MARK = "†"
DATA_MARK = "‡"  # a run on data whose split sizes differ from the dataset cards


# ------------------------------------------------------------------ what the columns mean (said once)
def column_notes() -> dict[str, str]:
    """What each column means, for every format's explanation of its table."""
    return {
        "tasks": "Top-1 accuracy (%) per task on the test split",
        "Avg": "mean over tasks",
        "Norm": "mean of accuracy / the task's expert accuracy",
        "Added params": "what the merged model stores beyond one backbone (count from its tensors, % of the backbone)",
        "MMACs/img": "multiply-accumulates per image (fvcore)",
        "Pareto": "on the accuracy-versus-added-parameters front of the rows shown (no other row is at least as "
                  "accurate with at most as many added parameters)",
    }


def explain_columns() -> str:
    """The column explanations as one paragraph (the Pareto mark is each format's own)."""
    n = column_notes()
    return (f"{n['tasks']}; Avg = {n['Avg']}; Norm = {n['Norm']}. Added params = {n['Added params']}. "
            f"MMACs/img = {n['MMACs/img']}.")


# ------------------------------------------------------------------ records -> rows
_NUMBER = (int, float)
# What the tables read of a record beyond what every record has (``records.check_record``): each field, where a record
# has it, is of this type; a record that has one of another type is listed as unreadable, never shown half-right.
SHOWN_FIELDS = {
    ("method", "name"): str, ("method", "display_name"): str, ("method", "label"): str,
    ("method", "at_defaults"): bool, ("method", "family"): str, ("method", "hparams"): dict,
    ("method", "needs"): Items(list, str), ("suite",): dict, ("suite", "tasks"): Items(list, str),
    ("suite", "experts"): str, ("suite", "synthetic"): bool, ("suite", "data_complete"): bool,
    ("suite", "data_short"): list, ("suite", "test_images"): Items(dict, int),
    ("metrics", "accuracy"): Items(dict, _NUMBER), ("metrics", "normalized_accuracy"): Items(dict, _NUMBER),
    ("metrics", "entropy_auroc"): Items(dict, _NUMBER), ("flops",): dict, ("flops", "mean"): _NUMBER,
    ("timing",): dict, ("selection",): dict, ("selection", "protocol"): str, ("budget",): dict,
    ("budget", "below_paper"): Items(list, str), ("config",): dict, ("config", "precision"): str, ("finished",): str,
    ("protocol",): str, ("sequential", "per_order"): Items(list, dict),
}


def unshowable(rec: dict) -> str | None:
    """Why ``rec`` (a record ``records.read_record`` accepts) cannot be shown, or None: a field of another type than
    the tables read (``SHOWN_FIELDS``), or a row that cannot be built from it."""
    try:
        check_fields(rec, SHOWN_FIELDS, required=False)
        if rec["status"] == "ok":
            rows = (sequential_rows if is_sequential(rec) else speed_rows if is_synthetic(rec) else one_shot_rows)([rec])
            if not is_sequential(rec) and not is_synthetic(rec):
                display(rows, task_columns(rows))
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        return f"cannot be shown: {e if isinstance(e, ValueError) else f'{type(e).__name__}: {e}'}"
    return None


def is_sequential(rec: dict) -> bool:
    return rec.get("protocol") == "sequential"


def is_synthetic(rec: dict) -> bool:
    """A run on a synthetic suite (random weights and images): its costs are shown, never its accuracy."""
    return isinstance(rec.get("suite"), dict) and bool(rec["suite"].get("synthetic"))


def latest_ok(records: list[dict]) -> list[dict]:
    """Per method pipeline and task set, the newest ok record (a run over fewer tasks never replaces a full one)."""
    latest: dict[tuple, dict] = {}
    for rec in records:
        if rec.get("status") != "ok":
            continue
        key = (rec["method"]["pipeline"], task_set(rec))
        if key not in latest or (rec.get("finished") or "") > (latest[key].get("finished") or ""):
            latest[key] = rec
    return list(latest.values())


def failed_runs(records: list[dict]) -> list[dict]:
    """Every failed record, unless an ok record of the same configuration (``config_hash``: method settings, task set,
    data, seed...) supersedes it: an ok run of the same method over other tasks or other data does not."""
    ok = {r["config_hash"] for r in records if r.get("status") == "ok"}
    return [r for r in records if r.get("status") == "failed" and r["config_hash"] not in ok]


def over_other_tasks(rec: dict, main: tuple[str, ...]) -> str:
    """" (over digits, signs)" for a run over another task set than the main table's ``main``, else ""."""
    tasks = task_set(rec)
    return f" (over {', '.join(tasks)})" if main and tasks and tasks != tuple(main) else ""


def task_set(rec: dict) -> tuple[str, ...]:
    """The tasks a record was evaluated on (part of what a leaderboard compares)."""
    tasks = (rec.get("suite") or {}).get("tasks") or list((rec.get("metrics") or {}).get("accuracy", {}))
    return tuple(tasks)


def task_sets(records: list[dict]) -> list[tuple[str, ...]]:
    """The task sets of the ok records, the main one first: the most tasks, then the most rows.
    Rows over any other set are kept in their own tables (``--tasks`` subset runs)."""
    counts: dict[tuple, int] = {}
    for rec in latest_ok(records):
        counts[task_set(rec)] = counts.get(task_set(rec), 0) + 1
    return sorted(counts, key=lambda ts: (-len(ts), -counts[ts], ts))


def subset_label(tasks: tuple[str, ...], main: tuple[str, ...]) -> str:
    return (f"{len(tasks)} of the {len(main)} tasks" if set(tasks) < set(main) else f"{len(tasks)} tasks") + \
        f": {', '.join(tasks)}"


def label(rec: dict) -> str:
    """The row's method: the record's ``method.label`` (display name, plus the hyperparameters that differ from the
    method's defaults); a record without one shows its display name."""
    method = rec["method"]
    return method.get("label") or method.get("display_name") or method.get("name") or method["pipeline"]


def below_budget(rec: dict) -> list[str]:
    """What of the run fell below its method's paper budget (``["adamerging_layerwise: steps=100 < 500"]``), from
    the record (``budget.below_paper``; none where the record has no budget)."""
    budget = rec.get("budget")
    return list(budget.get("below_paper") or []) if isinstance(budget, dict) else []


def incomplete_data(rec: dict) -> list[str]:
    """The splits of a real-suite run whose image counts differ from the dataset cards (the record's
    ``suite.data_short``; empty for a run on complete data)."""
    info = rec.get("suite") if isinstance(rec.get("suite"), dict) else {}
    return [str(s) for s in info.get("data_short") or ["split sizes"]] if info.get("data_complete") is False else []


def method_cell(rec: dict, text: str) -> str:
    return text + (f" {DATA_MARK}" if incomplete_data(rec) else "") + (f" {BUDGET_MARK}" if below_budget(rec) else "")


def data_note(df: pd.DataFrame) -> str:
    """The line under a table that explains its incomplete-data marks ("" when every row ran on complete data)."""
    rows = [m.removesuffix(" " + BUDGET_MARK).removesuffix(" " + DATA_MARK) for m in df.get("Method", [])
            if m.removesuffix(" " + BUDGET_MARK).endswith(DATA_MARK)]
    if not rows:
        return ""
    return (f"{DATA_MARK} ran on data whose split sizes differ from the dataset cards (the record's suite.data_short "
            f"names them; `mergebench data check` says what is missing), so this table is not compared with "
            f"published numbers: {', '.join(rows)}.")


def budget_note(df: pd.DataFrame) -> str:
    """The line under a table that explains its budget marks ("" when every row ran at its paper's budget)."""
    if df.empty or "Below budget" not in df:
        return ""
    rows = [(m, why) for m, why in zip(df["Method"], df["Below budget"]) if why]
    if not rows:
        return ""
    return (f"{BUDGET_MARK} ran below its paper's budget: "
            + "; ".join(f"{m.removesuffix(' ' + BUDGET_MARK)} ({why})" for m, why in rows) + ".")


PRECISION_NAMES = {"bf16": "bfloat16 autocast", "fp32": "float32"}


def precision_note(df: pd.DataFrame) -> str:
    """The line that says at which precision the test-time adaptation rows ran, when they did not all run at one
    ("" otherwise): `--precision auto` reuses records of either precision, so one table can hold both."""
    if df.empty or "Precision" not in df:
        return ""
    by: dict[str, list[str]] = {}
    for m, p in zip(df["Method"], df["Precision"]):
        if p:
            by.setdefault(p, []).append(m.removesuffix(" " + BUDGET_MARK))
    if len(by) < 2:
        return ""
    return ("Test-time adaptation loops ran at two precisions: "
            + "; ".join(f"{PRECISION_NAMES.get(p, p)}: {', '.join(ms)}" for p, ms in sorted(by.items())) + ".")


def run_precision(rec: dict) -> str:
    """The precision a test-time adaptation run's loops ran at ("" for a run that has none)."""
    return (rec.get("config") or {}).get("precision", "")


def table_note(df: pd.DataFrame) -> str:
    """The lines under a table: its budget marks and, where they differ, its rows' precisions."""
    return " ".join(n for n in (budget_note(df), precision_note(df), data_note(df)) if n)


def one_shot_rows(ok: list[dict]) -> pd.DataFrame:
    """The rows of ok one-shot records, sorted by Avg, with their Pareto marks."""
    rows = []
    for rec in ok:
        m, p, f, t = rec["metrics"], rec["params"], rec.get("flops") or {}, rec["timing"]
        row = {"Method": method_cell(rec, label(rec)), "Pipeline": rec["method"]["pipeline"]}
        row.update({task: acc for task, acc in m["accuracy"].items()})
        row.update({
            "Avg": m["avg_accuracy"], "Norm": m["avg_normalized_accuracy"],
            "Added params": p["added"], "Added %": p["added_pct"],
            "MMACs/img": f.get("mean", float("nan")) / 1e6, "Merge s": t["merge_s"],
            "Needs": ",".join(rec["method"]["needs"]), "Selection": (rec.get("selection") or {}).get("protocol", "fixed"),
            "Below budget": "; ".join(below_budget(rec)), "Precision": run_precision(rec),
        })
        rows.append(row)
    df = pd.DataFrame(rows)
    if not df.empty:
        df = df.sort_values("Avg", ascending=False).reset_index(drop=True)
        df["Pareto"] = pareto_front(df["Avg"], df["Added params"])
    return df


NOTES_FILE = "NOTES.md"  # in a suite's results folder: text shown under its main table

SPEED_NOTE = ("Synthetic suite: random weights, experts and images of the real benchmark's shapes. It measures cost "
              "only: merge time, evaluation throughput and peak memory; its accuracies are chance level and are not "
              "shown. Peak memory is the CUDA allocator's peak on a GPU, the process's resident peak during the run "
              "on a CPU.")


def speed_rows(ok: list[dict]) -> pd.DataFrame:
    rows = []
    for rec in ok:
        t = rec.get("timing", {})
        peak = t.get("peak_gpu_mb", t.get("peak_rss_mb", t.get("peak_rss_mb_process")))
        rows.append({"Method": label(rec), "Pipeline": rec["method"]["pipeline"], "Merge s": t.get("merge_s"),
                     "Eval images": sum((rec["suite"].get("test_images") or {}).values()) or None,
                     "Eval s": t.get("eval_s"), "Eval images/s": t.get("eval_images_per_s"),
                     "Peak MB": peak, "Device": rec.get("device"),
                     "Fraction": rec["suite"].get("fraction")})
    df = pd.DataFrame(rows)
    if not df.empty:
        df = df.sort_values("Merge s").reset_index(drop=True)
    return df


def sequential_label(rec: dict) -> str:
    return label(rec) + (" (adapter)" if rec["sequential"].get("adapter") else "")


def sequential_rows(ok: list[dict]) -> pd.DataFrame:
    rows = []
    for rec in ok:
        q, f = rec["sequential"], rec.get("flops") or {}
        rows.append({"Method": method_cell(rec, sequential_label(rec)),
                     "Pipeline": rec["method"]["pipeline"], "Orders": len(q["orders"]),
                     "Final Avg": q["final_avg_mean"], "Final std": q["final_avg_std"],
                     "Avg over steps": q["avg_over_steps_mean"], "Steps std": q["avg_over_steps_std"],
                     "Norm": rec["metrics"]["avg_normalized_accuracy"], "Added params": rec["params"]["added"],
                     "MMACs/img": f.get("mean", float("nan")) / 1e6, "Merge s": rec["timing"]["merge_s"],
                     "Needs": ",".join(rec["method"]["needs"]), "Below budget": "; ".join(below_budget(rec)),
                     "Precision": run_precision(rec)})
    return pd.DataFrame(rows)


class Board:
    """One suite's records in one results folder, read once; every table of a leaderboard comes from here."""

    def __init__(self, results_dir, suite: str):
        self.results_dir, self.suite = results_dir, suite
        loaded = load_records(results_dir, suite)
        self.records, self.unreadable = [], list(loaded.unreadable)
        for rec in loaded.records:  # a record the tables cannot show is named with the unreadable files
            why = unshowable(rec)
            if why is None:
                self.records.append(rec)
            else:
                self.unreadable.append((Path(rec["_path"]), why))
                warnings.warn(f"skipping record {rec['_path']}: {why}", stacklevel=2)
        self.unreadable.sort(key=lambda item: str(item[0]))
        # sequential runs have their own table; runs on synthetic data only a speed table (their accuracies are noise)
        self.one_shot = [r for r in self.records if not is_sequential(r) and not is_synthetic(r)]
        self.synthetic = [r for r in self.records if is_synthetic(r) and not is_sequential(r)]
        self._tables: dict = {}

    @property
    def empty(self) -> bool:
        return not self.records

    @cached_property
    def notes(self) -> str:
        """The folder's ``NOTES.md`` (what its maintainers found out about rows of its table, with the evidence),
        shown under the main table; "" when there is none."""
        path = Path(self.results_dir) / self.suite / NOTES_FILE
        return path.read_text(encoding="utf-8").strip() if path.is_file() else ""

    @cached_property
    def spec(self):
        """The registered suite these records belong to (its sanity checks and published numbers), or None."""
        return suite_for_results(self.suite)

    @cached_property
    def task_sets(self) -> list[tuple[str, ...]]:
        return task_sets(self.one_shot)

    @cached_property
    def main_tasks(self) -> tuple[str, ...]:
        return next(iter(self.task_sets), ())

    @cached_property
    def latest(self) -> list[dict]:
        return latest_ok(self.one_shot)

    def shown(self, tasks: tuple[str, ...] | None = None) -> list[dict]:
        """The ok records of the rows over ``tasks`` (default: the main task set)."""
        chosen = tuple(tasks) if tasks is not None else self.main_tasks
        return [r for r in self.latest if task_set(r) == chosen]

    def table(self, tasks: tuple[str, ...] | None = None) -> tuple[pd.DataFrame, list[dict]]:
        """(rows, failed records): the rows over the main task set (``task_sets``), or over ``tasks``."""
        key = tuple(tasks) if tasks is not None else None
        if key not in self._tables:
            self._tables[key] = (one_shot_rows(self.shown(tasks)), failed_runs(self.one_shot))
        df, failed = self._tables[key]
        return df.copy(), failed

    @cached_property
    def _sequential(self) -> tuple[pd.DataFrame, list[dict], list[dict]]:
        records = [r for r in self.records if is_sequential(r) and not is_synthetic(r)]
        latest: dict = {}
        for rec in records:
            if rec.get("status") != "ok":
                continue
            key = (rec["method"]["pipeline"], len(rec["sequential"]["orders"]))
            if key not in latest or (rec.get("finished") or "") > (latest[key].get("finished") or ""):
                latest[key] = rec
        ok = sorted(latest.values(), key=lambda r: -r["sequential"]["final_avg_mean"])
        return sequential_rows(ok), failed_runs(records), ok

    def sequential_table(self) -> tuple[pd.DataFrame, list[dict], list[dict]]:
        """(rows, failed records, the ok records shown) of the sequential runs: per method pipeline and number
        of orders, the newest ok record."""
        df, failed, ok = self._sequential
        return df.copy(), failed, ok

    @cached_property
    def _speed(self) -> tuple[pd.DataFrame, list[dict]]:
        return speed_rows(latest_ok(self.synthetic)), failed_runs(self.synthetic)

    def speed_table(self) -> tuple[pd.DataFrame, list[dict]]:
        """(rows, failed records) of the runs on synthetic data: the newest ok record per pipeline, with its costs
        and no accuracy."""
        df, failed = self._speed
        return df.copy(), failed

    def experts(self) -> list[str]:
        """What the suite's experts are, as the records say (e.g. LoRA experts), when they say."""
        return sorted({r["suite"]["experts"] for r in self.records
                       if isinstance(r.get("suite"), dict) and r["suite"].get("experts")})

    def sanity(self, df: pd.DataFrame) -> list[str]:
        """The suite's own checks of its measured numbers (``register_suite(sanity=...)``)."""
        if self.spec is None or df.empty:
            return []

        params = len(inspect.signature(self.spec.sanity).parameters)
        if params > 2:
            return self.spec.sanity(df, self.shown(), self.diagnostics)
        return self.spec.sanity(df, self.shown()) if params > 1 else self.spec.sanity(df)

    @cached_property
    def diagnostics(self) -> dict | None:
        """The folder's mechanism report (``mergebench diagnose --write``), or None."""
        path = Path(self.results_dir) / self.suite / DIAGNOSTICS_FILE
        try:
            return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        except (OSError, ValueError):
            return None

    def references(self, df: pd.DataFrame):
        """The suite's published numbers for the main table ``df`` (``register_suite(references=...)``), or None."""
        if df.empty or self.spec is None:
            return None
        pipelines = set(df["Pipeline"])
        records = [r for r in self.shown() if r["method"]["pipeline"] in pipelines]
        return self.spec.references(records) if records else None


    def subset_tables(self, view_options: dict | None = None) -> list[tuple[tuple[str, ...], pd.DataFrame]]:
        """(task set, rows in the view) for each task set other than the main one that has rows in the view."""
        out = []
        for ts in self.task_sets[1:]:
            df = view(self.table(tasks=ts)[0], **(view_options or {}))
            if not df.empty:
                out.append((ts, df))
        return out

    def published(self, df: pd.DataFrame):
        """(title, note, table) of each published number the suite gives (``register_suite(references=...)``) beside
        the measured one of the same method (its best row in the main table ``df``), or None."""
        refs = self.references(df)
        if refs is None or not refs.rows:
            return None
        measured = {} if df.empty else {r["Pipeline"].split("(")[0]: r["Avg"] for _, r in df.iloc[::-1].iterrows()}
        rows = pd.DataFrame([{"Method": r["display"], "Published Avg": f"{r['avg']:.1f}",
                              "Measured Avg": f"{measured[r['method']]:.1f}" if r["method"] in measured else "-",
                              "Verified": "yes" if r.get("verified") else "no", "Source": r["source"]}
                             for r in refs.rows])
        return refs.title, refs.note, rows


SUBSET_NOTE = "Not comparable with the main table (another task set): Avg, Norm and Pareto are over these tasks only."


def table(results_dir, suite: str, tasks: tuple[str, ...] | None = None) -> tuple[pd.DataFrame, list[dict], list]:
    """(rows as a DataFrame, failed records, unreadable files) for ``suite``: the rows over the main task set
    (``task_sets``), or over ``tasks``."""
    board = Board(results_dir, suite)
    return (*board.table(tasks), board.unreadable)


def sequential_table(results_dir, suite: str) -> tuple[pd.DataFrame, list[dict], list[dict]]:
    """(rows, failed records, the ok records shown) of the sequential runs of ``suite``."""
    return Board(results_dir, suite).sequential_table()


def speed_table(results_dir, suite: str) -> tuple[pd.DataFrame, list[dict]]:
    """(rows, failed records) of the runs on synthetic data of ``suite``."""
    return Board(results_dir, suite).speed_table()


# ------------------------------------------------------------------ display
def fmt_params(n: float) -> str:
    n = int(n)
    if abs(n) >= 1e6:
        return f"{n / 1e6:.2f}M"
    if abs(n) >= 1e3:
        return f"{n / 1e3:.1f}k"
    return str(n)


NON_TASK_COLUMNS = {"Method", "Pipeline", "Avg", "Norm", "Added params", "Added %", "MMACs/img", "Merge s", "Needs",
                    "Selection", "Pareto", "Below budget", "Precision"}


def task_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c not in NON_TASK_COLUMNS]


def display(df: pd.DataFrame, tasks: list[str]) -> pd.DataFrame:
    """The rows as the tables show them (numbers formatted, bookkeeping columns dropped)."""
    out = df.drop(columns=["Pipeline", "Needs", "Selection", "Below budget", "Precision"], errors="ignore").copy()
    for col in tasks + ["Avg", "Norm"]:
        out[col] = out[col].map(lambda v: f"{v:.1f}")
    out["Added params"] = [f"{fmt_params(n)} ({pct:.2f}%)" for n, pct in zip(df["Added params"], df["Added %"])]
    out = out.drop(columns=["Added %"])
    out["MMACs/img"] = out["MMACs/img"].map(lambda v: f"{v:.3f}")  # 3 decimals: add-ons cost thousands of MACs
    out["Merge s"] = out["Merge s"].map(lambda v: f"{v:.1f}")
    if "Pareto" in out:
        out["Pareto"] = out["Pareto"].map(lambda v: "*" if v else "")
    return out


def display_sequential(df: pd.DataFrame) -> pd.DataFrame:
    out = df[["Method", "Orders"]].copy()
    out["Final Avg"] = [f"{m:.1f} ± {s:.1f}" for m, s in zip(df["Final Avg"], df["Final std"])]
    out["Avg over steps"] = [f"{m:.1f} ± {s:.1f}" for m, s in zip(df["Avg over steps"], df["Steps std"])]
    out["Norm"] = df["Norm"].map(lambda v: f"{v:.1f}")
    out["Added params"] = df["Added params"].map(fmt_params)
    out["MMACs/img"] = df["MMACs/img"].map(lambda v: f"{v:.3f}")
    out["Merge s"] = df["Merge s"].map(lambda v: f"{v:.1f}")
    out["Needs"] = df["Needs"]
    return out


SEQUENTIAL_NOTE = ("Sequential protocol: the experts arrive one at a time in a task order; after each arrival the "
                   "method's model is evaluated on the tasks seen so far. Final Avg = average accuracy on all tasks "
                   "after the last expert, mean ± std over the task orders; Avg over steps = the mean over steps of "
                   "the accuracy on the tasks seen, mean ± std over orders; Norm = final accuracy / the experts'. "
                   "(adapter) = a one-shot method re-run on the experts seen so far. Params and MACs: the final model.")


# ------------------------------------------------------------------ figures
FIGURES = {"pareto_params": "Accuracy vs added parameters", "accuracy_flops": "Accuracy vs MACs per image"}
EQUAL_COSTS = 0.01  # MACs per image within 1% of one another: accuracy vs MACs would be a vertical line


def equal_costs_note(df: pd.DataFrame) -> str:
    """Why accuracy versus MACs is not plotted for these rows ("" when it is): their costs are all within
    ``EQUAL_COSTS`` of one another, or not recorded."""
    if df.empty:
        return ""
    macs = [float(v) for v in df["MMACs/img"] if not math.isnan(float(v)) and float(v) > 0]
    if not macs:
        return "Accuracy vs MACs per image is not plotted: no row records its MACs."
    lo, hi = min(macs), max(macs)
    if hi > lo * (1 + EQUAL_COSTS):
        return ""
    cost = f"{lo:.2f} MMACs per image" + (f" (to within {100 * (hi - lo) / lo:.2f}%)" if hi > lo else "")
    return f"Accuracy vs MACs per image is not plotted: every method costs {cost}."


# ------------------------------------------------------------------ budget views
# the data budgets a view takes: the kinds of data (needs.NEEDS, in order of how much a method sees) and
# the spellings of "none"
NEEDS_ORDER = tuple(NEEDS)
NEEDS_ALIASES = {**{k: k for k in NEEDS_ORDER}, "data-free": "nothing", "datafree": "nothing", "none": "nothing"}
_NEEDS_LEVEL = {k: i for i, k in enumerate(NEEDS_ORDER)}
_SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9}


def parse_budget(text: str | float | int) -> tuple[str, float]:
    """``"1%"`` -> ("pct", 1.0) of the backbone; ``"500k"``, ``"2M"``, ``"1e6"``, ``0`` -> ("count", n)."""
    if isinstance(text, (int, float)):
        return "count", float(text)
    t = str(text).strip().lower().replace(",", "").replace("_", "")
    m = re.fullmatch(r"([0-9.e+-]+)\s*(%|[kmgb]?)", t)
    try:
        value = float(m.group(1)) if m else None
    except ValueError:
        value = None
    if value is None or value < 0:
        raise InputError(f"cannot read the parameter budget {text!r}: write a percentage of the backbone "
                         f"('1%') or a count ('0', '500k', '2M', '1e6')")
    if m.group(2) == "%":
        return "pct", value
    return "count", value * _SUFFIX[m.group(2)]


def needs_filter(needs: str) -> set[str]:
    key = NEEDS_ALIASES.get(str(needs).strip().lower())
    if key is None:
        raise InputError(f"unknown data budget {needs!r}; use one of {', '.join(sorted(NEEDS_ALIASES))}")
    if key == "sequential":
        return {"nothing", "sequential"}
    return {k for k, level in _NEEDS_LEVEL.items() if level <= _NEEDS_LEVEL[key] and k != "sequential"}


def needs_level(kind: str) -> int:
    return _NEEDS_LEVEL.get(kind, 0)


def _sort_spec(sort: str, columns) -> tuple[str, bool]:
    """``"COLUMN"`` or ``"COLUMN:asc|desc"``; accuracy columns sort descending, costs ascending by default."""
    name, _, direction = sort.rpartition(":") if sort.lower().endswith((":asc", ":desc")) else (sort, "", "")
    match = next((c for c in columns if c.lower() == name.strip().lower()), None)
    if match is None:
        shown = [c for c in columns if c != "Pipeline"]
        raise InputError(f"cannot sort by {name!r}{close_matches(name, shown)} (columns: {', '.join(shown)})")
    if direction:
        return match, direction.lower() == "asc"
    return match, match in {"Method", "Added params", "Added %", "MMACs/img", "Merge s", "Needs", "Selection"}


def view(df: pd.DataFrame, max_added_params: str | float | None = None, needs: str | None = None,
         sort: str | None = None) -> pd.DataFrame:
    """A budget view of ``table()``'s rows; the Pareto column is recomputed on the rows kept."""
    out = df
    if max_added_params is not None and not out.empty:
        kind, limit = parse_budget(max_added_params)
        column = "Added %" if kind == "pct" else "Added params"
        out = out[out[column] <= limit + 1e-9]
    if needs is not None and not out.empty:
        allowed = needs_filter(needs)
        out = out[[set(n.split(",")) <= allowed for n in out["Needs"]]]
    if sort is not None and not out.empty:
        column, ascending = _sort_spec(sort, out.columns)
        out = out.sort_values(column, ascending=ascending, kind="stable")
    out = out.reset_index(drop=True)
    if not out.empty:
        out["Pareto"] = pareto_front(out["Avg"], out["Added params"])
    return out


def describe_view(max_added_params=None, needs=None, sort=None) -> str:
    bits = []
    if max_added_params is not None:
        kind, limit = parse_budget(max_added_params)
        bits.append(f"added parameters <= {limit:g}% of the backbone" if kind == "pct" else
                    f"added parameters <= {fmt_params(limit)}")
    if needs is not None:
        bits.append("data: " + " or ".join("none (data-free)" if k == "nothing" else k
                                           for k in sorted(needs_filter(needs), key=_NEEDS_LEVEL.get)))
    if sort is not None:
        bits.append(f"sorted by {sort}")
    return "; ".join(bits)


def pareto_front(accuracy, cost) -> list[bool]:
    """True where no other point has accuracy >= and cost <= with one of them strict."""
    points = list(zip([float(a) for a in accuracy], [float(c) for c in cost]))
    front = []
    for i, (a, c) in enumerate(points):
        dominated = any(a2 >= a and c2 <= c and (a2 > a or c2 < c)
                        for j, (a2, c2) in enumerate(points) if j != i and not math.isnan(a2) and not math.isnan(c2))
        front.append(not dominated and not math.isnan(a) and not math.isnan(c))
    return front
