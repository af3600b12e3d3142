"""Leaderboards from records: one row per method pipeline (its newest ok record).

Every number in a table comes from a record, and every record from a run.

Budget views (``view``): keep methods within an added-parameter budget (``"1%"`` of the
backbone or an absolute count such as ``"500k"``), within a data budget (``needs="data-free"``:
methods that use at most that kind of data), sorted by any column. The ``Pareto`` column marks
the methods on the accuracy-versus-added-parameters front of the rows shown: no other row is at
least as accurate with at most as many added parameters (and better in one). ``write`` also
draws that front and accuracy versus MACs per image (PNG and SVG) and a self-contained HTML page.
"""

from __future__ import annotations

import html
import math
import os
import re
from pathlib import Path

import pandas as pd

from mergebench.errors import InputError
from mergebench.io import atomic_write_text
from mergebench.records import load_records


def _latest_ok(records: list[dict]) -> list[dict]:
    """Per method pipeline and task set, the newest ok record (a run over fewer tasks never replaces a full one)."""
    latest: dict[tuple, dict] = {}
    for rec in records:
        if rec.get("status") != "ok":
            continue
        key = (rec["method"]["pipeline"], task_set(rec))
        if key not in latest or rec.get("finished", "") > latest[key].get("finished", ""):
            latest[key] = rec
    return list(latest.values())


# ------------------------------------------------------------------ task sets
def task_set(rec: dict) -> tuple[str, ...]:
    """The tasks a record was evaluated on (part of what a leaderboard compares)."""
    tasks = (rec.get("suite") or {}).get("tasks") or list((rec.get("metrics") or {}).get("accuracy", {}))
    return tuple(tasks)


def task_sets(records: list[dict]) -> list[tuple[str, ...]]:
    """The task sets of the ok records, the main one first: the most tasks, then the most rows.
    Rows over any other set are kept in their own tables (``--tasks`` subset runs)."""
    counts: dict[tuple, int] = {}
    for rec in _latest_ok(records):
        counts[task_set(rec)] = counts.get(task_set(rec), 0) + 1
    return sorted(counts, key=lambda ts: (-len(ts), -counts[ts], ts))


def _subset_label(tasks: tuple[str, ...], main: tuple[str, ...]) -> str:
    return (f"{len(tasks)} of the {len(main)} tasks" if set(tasks) < set(main) else f"{len(tasks)} tasks") + \
        f": {', '.join(tasks)}"


def _label(rec: dict) -> str:
    """Display name, plus the hyperparameters that differ from the method's defaults."""
    from mergebench.pipeline import MethodCall
    from mergebench.registry import UnknownMethodError, get_method

    name, hparams = rec["method"]["display_name"], rec["method"]["hparams"]
    try:
        defaults = MethodCall(rec["method"]["name"]).resolve().plain_hparams()
    except (UnknownMethodError, ValueError):  # method no longer registered: show everything
        defaults = {}
    changed = {k: v for k, v in hparams.items() if defaults.get(k) != v}
    if "base" in changed:  # the full base spec is in the Pipeline column; name its method here
        changed["base"] = str(changed["base"]).split("(")[0]
    return name + (f" ({', '.join(f'{k}={v}' for k, v in changed.items())})" if changed else "")


BUDGET_MARK = "†"


def below_budget(rec: dict) -> list[str]:
    """What of the run fell below its method's paper budget (``["adamerging_layerwise: steps=100 < 500"]``).

    From the record (``record["budget"]``); a record written before budgets were recorded is read against
    the registry's paper budgets, through its pipeline.
    """
    if isinstance(rec.get("budget"), dict):
        return list(rec["budget"].get("below_paper") or [])
    from mergebench.pipeline import MethodCall
    from mergebench.registry import UnknownMethodError

    try:
        return MethodCall.parse(rec["method"]["pipeline"]).resolve().below_paper_budget()
    except (UnknownMethodError, ValueError):  # no longer registered / not parseable: nothing to compare with
        return []


def _method_cell(rec: dict, label: str) -> str:
    return label + (f" {BUDGET_MARK}" if below_budget(rec) else "")


def budget_note(df: pd.DataFrame) -> str:
    """The line under a table that explains its budget marks ("" when every row ran at its paper's budget)."""
    if df.empty or "Below budget" not in df:
        return ""
    rows = [(m, why) for m, why in zip(df["Method"], df["Below budget"]) if why]
    if not rows:
        return ""
    return (f"{BUDGET_MARK} ran below its paper's budget: "
            + "; ".join(f"{m.removesuffix(' ' + BUDGET_MARK)} ({why})" for m, why in rows) + ".")


def _failed(records: list[dict], ok_pipelines: set[str]) -> list[dict]:
    """Failed runs of pipelines that have no ok record (a later success supersedes a failure)."""
    return [r for r in records if r.get("status") == "failed" and r["method"]["pipeline"] not in ok_pipelines]


def table(results_dir, suite: str, tasks: tuple[str, ...] | None = None) -> tuple[pd.DataFrame, list[dict], list]:
    """(rows as a DataFrame, failed records, unreadable files) for ``suite``: the rows over the main task set
    (``task_sets``), or over ``tasks``."""
    loaded = load_records(results_dir, suite)
    # sequential runs have their own table; runs on synthetic data only a speed table (their accuracies are noise)
    records = [r for r in loaded.records if not _is_sequential(r) and not _is_synthetic(r)]
    ok = _latest_ok(records)
    ok_pipelines = {r["method"]["pipeline"] for r in ok}
    chosen = tuple(tasks) if tasks is not None else next(iter(task_sets(records)), ())
    ok = [r for r in ok if task_set(r) == chosen]
    rows = []
    for rec in ok:
        m, p, f, t = rec["metrics"], rec["params"], rec.get("flops") or {}, rec["timing"]
        row = {"Method": _method_cell(rec, _label(rec)), "Pipeline": rec["method"]["pipeline"]}
        row.update({task: acc for task, acc in m["accuracy"].items()})
        row.update({
            "Avg": m["avg_accuracy"], "Norm": m["avg_normalized_accuracy"],
            "Added params": p["added"], "Added %": p["added_pct"],
            "MMACs/img": f.get("mean", float("nan")) / 1e6, "Merge s": t["merge_s"],
            "Needs": ",".join(rec["method"]["needs"]), "Selection": rec.get("selection", {}).get("protocol", "fixed"),
            "Below budget": "; ".join(below_budget(rec)),
        })
        rows.append(row)
    df = pd.DataFrame(rows)
    if not df.empty:
        df = df.sort_values("Avg", ascending=False).reset_index(drop=True)
        df["Pareto"] = pareto_front(df["Avg"], df["Added params"])
    failed = _failed(records, ok_pipelines)
    return df, failed, loaded.unreadable


# ------------------------------------------------------------------ synthetic suites: speed, never accuracy
def _is_synthetic(rec: dict) -> bool:
    return isinstance(rec.get("suite"), dict) and bool(rec["suite"].get("synthetic"))


SPEED_NOTE = ("Synthetic suite: random weights, experts and images of the real benchmark's shapes. It measures cost "
              "only: merge time, evaluation throughput and peak memory; its accuracies are chance level and are not "
              "shown. Peak memory is the CUDA allocator's peak on a GPU, the process's resident peak during the run "
              "on a CPU.")


def speed_table(results_dir, suite: str) -> tuple[pd.DataFrame, list[dict]]:
    """(rows, failed records) of the runs on synthetic data of ``suite``: the newest ok record per pipeline, with
    its costs and no accuracy."""
    records = [r for r in load_records(results_dir, suite).records if _is_synthetic(r) and not _is_sequential(r)]
    ok = _latest_ok(records)
    rows = []
    for rec in ok:
        t = rec.get("timing", {})
        peak = t.get("peak_gpu_mb", t.get("peak_rss_mb", t.get("peak_rss_mb_process")))
        rows.append({"Method": _label(rec), "Pipeline": rec["method"]["pipeline"], "Merge s": t.get("merge_s"),
                     "Eval images": sum((rec["suite"].get("test_images") or {}).values()) or None,
                     "Eval s": t.get("eval_s"), "Eval images/s": t.get("eval_images_per_s"),
                     "Peak MB": peak, "Device": rec.get("device"),
                     "Fraction": rec["suite"].get("fraction")})
    df = pd.DataFrame(rows)
    if not df.empty:
        df = df.sort_values("Merge s").reset_index(drop=True)
    return df, _failed(records, {r["method"]["pipeline"] for r in ok})


def _render_speed(df: pd.DataFrame, failed: list[dict], suite: str, fmt: str) -> str:
    if fmt == "csv":
        return df.to_csv(index=False)
    if fmt == "latex":
        return _latex(df, SPEED_NOTE)
    if fmt == "html":
        return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>mergebench speed: {html.escape(suite)}"
                f"</title></head><body><h1>mergebench speed: {html.escape(suite)}</h1><p>{html.escape(SPEED_NOTE)}</p>"
                + (df.to_html(index=False) if not df.empty else "") + "</body></html>\n")
    lines = [f"# mergebench speed: {suite}", "", SPEED_NOTE, ""]
    if not df.empty:
        lines.append(df.to_markdown(index=False))
    if failed:
        lines += ["", "## Failed runs", ""] + [f"- `{r['method']['pipeline']}`: {r.get('error', '?')}" for r in failed]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ sequential protocol
def _is_sequential(rec: dict) -> bool:
    return rec.get("protocol") == "sequential"


def sequential_table(results_dir, suite: str) -> tuple[pd.DataFrame, list[dict], list[dict]]:
    """(rows, failed records, the ok records shown) of the sequential runs of ``suite``: per method pipeline and
    number of orders, the newest ok record."""
    records = [r for r in load_records(results_dir, suite).records if _is_sequential(r) and not _is_synthetic(r)]
    latest: dict = {}
    for rec in records:
        if rec.get("status") != "ok":
            continue
        key = (rec["method"]["pipeline"], len(rec["sequential"]["orders"]))
        if key not in latest or rec.get("finished", "") > latest[key].get("finished", ""):
            latest[key] = rec
    ok = sorted(latest.values(), key=lambda r: -r["sequential"]["final_avg_mean"])
    rows = []
    for rec in ok:
        q, f = rec["sequential"], rec.get("flops") or {}
        rows.append({"Method": _method_cell(rec, _label(rec) + (" (adapter)" if q.get("adapter") else "")),
                     "Pipeline": rec["method"]["pipeline"], "Orders": len(q["orders"]),
                     "Final Avg": q["final_avg_mean"], "Final std": q["final_avg_std"],
                     "Avg over steps": q["avg_over_steps_mean"], "Steps std": q["avg_over_steps_std"],
                     "Norm": rec["metrics"]["avg_normalized_accuracy"], "Added params": rec["params"]["added"],
                     "MMACs/img": f.get("mean", float("nan")) / 1e6, "Merge s": rec["timing"]["merge_s"],
                     "Needs": ",".join(rec["method"]["needs"]), "Below budget": "; ".join(below_budget(rec))})
    ok_keys = {r["method"]["pipeline"] for r in ok}
    failed = [r for r in records if r.get("status") == "failed" and r["method"]["pipeline"] not in ok_keys]
    return pd.DataFrame(rows), failed, ok


def _display_sequential(df: pd.DataFrame) -> pd.DataFrame:
    out = df[["Method", "Orders"]].copy()
    out["Final Avg"] = [f"{m:.1f} ± {s:.1f}" for m, s in zip(df["Final Avg"], df["Final std"])]
    out["Avg over steps"] = [f"{m:.1f} ± {s:.1f}" for m, s in zip(df["Avg over steps"], df["Steps std"])]
    out["Norm"] = df["Norm"].map(lambda v: f"{v:.1f}")
    out["Added params"] = df["Added params"].map(_fmt_params)
    out["MMACs/img"] = df["MMACs/img"].map(lambda v: f"{v:.3f}")
    out["Merge s"] = df["Merge s"].map(lambda v: f"{v:.1f}")
    out["Needs"] = df["Needs"]
    return out


SEQUENTIAL_NOTE = ("Sequential protocol: the experts arrive one at a time in a task order; after each arrival the "
                   "method's model is evaluated on the tasks seen so far. Final Avg = average accuracy on all tasks "
                   "after the last expert, mean ± std over the task orders; Avg over steps = the mean over steps of "
                   "the accuracy on the tasks seen, mean ± std over orders; Norm = final accuracy / the experts'. "
                   "(adapter) = a one-shot method re-run on the experts seen so far. Params and MACs: the final model.")


def render_sequential(results_dir, suite: str, fmt: str = "md") -> str:
    """The sequential runs' table as Markdown (with failed runs), ``csv`` or ``latex``."""
    df, failed, _ = sequential_table(results_dir, suite)
    if df.empty and not failed:
        return (f"No sequential records for suite {suite!r} in {results_dir}. Run `mergebench run --suite {suite} "
                f"--protocol sequential ...` first.\n")
    if fmt == "csv":
        return df.to_csv(index=False)
    shown = _display_sequential(df) if not df.empty else df
    if fmt == "latex":
        return _latex(shown, budget_note(df))
    if fmt != "md":
        raise InputError(f"the sequential table is written as md, csv or latex, not {fmt!r}")
    return "\n".join(_sequential_lines(df, failed, plots=False)) + "\n"


def _sequential_lines(df: pd.DataFrame, failed: list[dict], plots: bool) -> list[str]:
    lines = ["## Sequential protocol (continual merging)", "", SEQUENTIAL_NOTE, ""]
    if not df.empty:
        lines.append(_display_sequential(df).to_markdown(index=False))
        if budget_note(df):
            lines += ["", budget_note(df)]
    if plots and not df.empty:
        lines += ["", "![Accuracy on the tasks seen after each expert](sequential_curve.svg)"]
    if failed:
        lines += ["", "Failed sequential runs:", ""] + [f"- `{r['method']['pipeline']}`: {r.get('error', '?')}"
                                                        for r in failed]
    return lines


def sequential_figure(ok: list[dict], suite: str):
    """Per method, the accuracy on the tasks seen after each expert: mean over orders, ± std band."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for rec in ok:
        per_order = rec["sequential"]["per_order"]
        steps = range(1, len(per_order[0]["steps"]) + 1)
        curves = [[s["avg_accuracy"] for s in o["steps"]] for o in per_order]
        mean = [sum(c[k] for c in curves) / len(curves) for k in range(len(steps))]
        std = [(sum((c[k] - mean[k]) ** 2 for c in curves) / max(1, len(curves) - 1)) ** 0.5 for k in range(len(steps))]
        line, = ax.plot(list(steps), mean, marker="o", ms=3, label=_label(rec) + (" (adapter)" if rec["sequential"].get("adapter") else ""))
        ax.fill_between(list(steps), [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)],
                        color=line.get_color(), alpha=0.15, lw=0)
    ax.set_xlabel("experts arrived (tasks seen)")
    ax.set_ylabel("average accuracy on the tasks seen (%)")
    ax.set_title(f"{suite}: sequential merging, mean ± std over task orders", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def _fmt_params(n: float) -> str:
    n = int(n)
    if abs(n) >= 1e6:
        return f"{n / 1e6:.2f}M"
    if abs(n) >= 1e3:
        return f"{n / 1e3:.1f}k"
    return str(n)


def _display(df: pd.DataFrame, tasks: list[str]) -> pd.DataFrame:
    out = df.drop(columns=["Pipeline", "Needs", "Selection", "Below budget"], errors="ignore").copy()
    for col in tasks + ["Avg", "Norm"]:
        out[col] = out[col].map(lambda v: f"{v:.1f}")
    out["Added params"] = [f"{_fmt_params(n)} ({pct:.2f}%)" for n, pct in zip(df["Added params"], df["Added %"])]
    out = out.drop(columns=["Added %"])
    out["MMACs/img"] = out["MMACs/img"].map(lambda v: f"{v:.3f}")  # 3 decimals: add-ons cost thousands of MACs
    out["Merge s"] = out["Merge s"].map(lambda v: f"{v:.1f}")
    if "Pareto" in out:
        out["Pareto"] = out["Pareto"].map(lambda v: "*" if v else "")
    return out


def sanity(df: pd.DataFrame) -> list[str]:
    """The properties a merging benchmark must show, checked on measured numbers (needs the reference rows)."""
    by = {r["Pipeline"].split("(")[0]: r["Avg"] for _, r in df.iterrows()}
    pre, ind, wa = by.get("pretrained"), by.get("individual"), by.get("weight_averaging")
    ta = next((r["Avg"] for _, r in df.iterrows() if r["Pipeline"] == "task_arithmetic(scaling=0.3)"), by.get("task_arithmetic"))
    if None in (pre, ind, wa, ta):
        return []
    gap = ind - pre
    recovered = (ta - pre) / gap if gap else float("nan")
    mark = lambda ok: "holds" if ok else "FAILS"  # noqa: E731
    return [
        f"(a) experts vs pretrained: {ind:.1f} vs {pre:.1f}, +{gap:.1f} points (>= 25 required): {mark(gap >= 25)}",
        f"(b) interference: Task Arithmetic {ta:.1f} is {ind - ta:.1f} points below the experts (>= 10 required): "
        f"{mark(ind - ta >= 10)}",
        f"(c) merging partly works: Task Arithmetic {ta:.1f} vs pretrained {pre:.1f} and Weight Averaging {wa:.1f}; "
        f"recovers {100 * recovered:.0f}% of the pretrained-to-expert gap (>= 20% required): "
        f"{mark(ta > pre and ta > wa and recovered >= 0.2)}",
    ]


def reference_results() -> dict:
    """``datasets/reference_results.yaml``: the published averages, the task set and backbone they were measured on."""
    import yaml

    path = Path(__file__).resolve().parents[1] / "datasets" / "reference_results.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def record_model(rec: dict) -> tuple[str | None, bool | None]:
    """(open_clip architecture without the -quickgelu suffix, QuickGELU?) of a real-suite record, else (None, None)."""
    info = rec.get("suite") or {}
    model = info.get("model")
    if isinstance(model, dict):
        return model.get("name"), model.get("quick_gelu")
    m = re.match(r"open_clip (\S+) \((QuickGELU|GELU)\)", str(info.get("backbone", "")))  # records before "model"
    if m and m.group(1) != "custom":
        return re.sub(r"-quickgelu$", "", m.group(1)), m.group(2) == "QuickGELU"
    return None, None


def published(model: str | None, tasks, quick_gelu: bool | None = True) -> list[dict]:
    """Published averages for runs of ``model`` (an open_clip architecture such as ``ViT-B-32``) over ``tasks``.

    They apply only to the backbone and task set they were measured on (OpenAI's QuickGELU weights, the eight
    tasks): whatever the suite or manifest is called, a GELU backbone or another task set gets none."""
    ref = reference_results()
    if not model or not ref:
        return []
    if set(tasks or ()) != set(ref.get("tasks", ())) or bool(quick_gelu) != (ref.get("activation") == "quick_gelu"):
        return []
    return ref.get("backbones", {}).get(model, [])


def _published_rows(results_dir, suite: str, df: pd.DataFrame) -> tuple[str | None, list[dict]]:
    """(model, published rows) for the main table: its rows must all come from one model and the published tasks."""
    if df.empty:
        return None, []
    records = [r for r in load_records(results_dir, suite).records if not _is_sequential(r)]
    main = [r for r in _latest_ok(records) if r["method"]["pipeline"] in set(df["Pipeline"])]
    main_set = next(iter(task_sets(records)), ())
    models = {record_model(r) for r in main if task_set(r) == main_set}
    if len(models) != 1:
        return None, []
    (model, quick_gelu), = models
    return model, published(model, main_set, quick_gelu)


def published_section(results_dir, suite: str, df: pd.DataFrame) -> list[str]:
    """Markdown lines: each published number beside the measured one of the same method (default settings)."""
    model, rows = _published_rows(results_dir, suite, df)
    if not rows:
        return []
    measured = {} if df.empty else {r["Pipeline"].split("(")[0]: r["Avg"] for _, r in df.iloc[::-1].iterrows()}
    table = pd.DataFrame([{"Method": r["display"], "Published Avg": f"{r['avg']:.1f}",
                           "Measured Avg": f"{measured[r['method']]:.1f}" if r["method"] in measured else "-",
                           "Verified": "yes" if r.get("verified") else "no", "Source": r["source"]} for r in rows])
    return ["", f"## Published numbers ({model}, task-vectors protocol)", "",
            "From `datasets/reference_results.yaml`; Measured Avg is the best row of that method in the main table "
            "(the same backbone and the same eight tasks). Verified = checked against the cited paper.", "",
            table.to_markdown(index=False)]


def subset_sections(results_dir, suite: str, view_options: dict | None = None) -> list[str]:
    """Markdown lines: one table per other task set (runs with ``--tasks``), each with its own Pareto marks.
    They never share the main table's stars or sit beside the published numbers."""
    records = [r for r in load_records(results_dir, suite).records if not _is_sequential(r)]
    sets = task_sets(records)
    lines = []
    for ts in sets[1:]:
        df = view(table(results_dir, suite, tasks=ts)[0], **(view_options or {}))
        if df.empty:
            continue
        lines += ["", f"## Runs over {_subset_label(ts, sets[0])}", "",
                  "Not comparable with the main table (another task set): Avg, Norm and Pareto are over these tasks "
                  "only.", "", _display(df, _tasks(df)).to_markdown(index=False)]
        if budget_note(df):
            lines += ["", budget_note(df)]
    return lines


NON_TASK_COLUMNS = {"Method", "Pipeline", "Avg", "Norm", "Added params", "Added %", "MMACs/img", "Merge s", "Needs",
                    "Selection", "Pareto", "Below budget"}


def _tasks(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c not in NON_TASK_COLUMNS]


def render(results_dir, suite: str, fmt: str = "md", max_added_params: str | float | None = None,
           needs: str | None = None, sort: str | None = None, plots: bool = False) -> str:
    """The leaderboard as Markdown (``md``), ``csv``, ``latex`` (booktabs) or ``html`` (self-contained).

    ``max_added_params``, ``needs`` and ``sort`` select a budget view (see ``view``); ``plots``
    (Markdown) links the plot files that ``write`` puts next to it.
    """
    df, failed, unreadable = table(results_dir, suite)
    seq_df, seq_failed, _ = sequential_table(results_dir, suite)
    speed_df, speed_failed = speed_table(results_dir, suite)
    if df.empty and not failed and seq_df.empty and not seq_failed:
        if not speed_df.empty or speed_failed:  # only runs on synthetic data: their costs, no accuracy
            return _render_speed(speed_df, speed_failed, suite, fmt)
        return f"No records for suite {suite!r} in {results_dir}. Run `mergebench run --suite {suite} ...` first.\n"
    filters = describe_view(max_added_params, needs, sort)
    if not df.empty:
        df = view(df, max_added_params, needs, sort)
    if fmt == "html":
        return to_html(df, failed, unreadable, suite, filters, plot_svgs(df, suite) if not df.empty else {})
    tasks = _tasks(df)
    if fmt == "csv":
        return df.to_csv(index=False)
    shown = _display(df, tasks) if not df.empty else df
    if fmt == "latex":
        return _latex(shown, budget_note(df))
    lines = [f"# mergebench leaderboard: {suite}", "",
             "Top-1 accuracy (%) per task on the test split; Avg = mean over tasks; Norm = mean of accuracy / the "
             "task's expert accuracy. Added params = what the merged model stores beyond one backbone "
             "(count from its tensors, % of the backbone). MMACs/img = multiply-accumulates per image (fvcore). "
             "Generated from the run records in this folder by `mergebench leaderboard`.", ""]
    lines[2] += (" Pareto = * on the accuracy-versus-added-parameters front of the rows shown (no other row is at "
                 "least as accurate with at most as many added parameters).")
    experts = sorted({r["suite"]["experts"] for r in load_records(results_dir, suite).records
                      if isinstance(r.get("suite"), dict) and r["suite"].get("experts")})
    if experts:  # e.g. LoRA experts (mini8-lora): say what was merged
        lines += [f"Experts: {'; '.join(experts)}.", ""]
    if filters:
        lines += [f"View: {filters}.", ""]
    subsets = task_sets([r for r in load_records(results_dir, suite).records if not _is_sequential(r)])
    if len(subsets) > 1 and not shown.empty:  # say which task set this table is over; the others follow below
        lines += [f"Tasks: {', '.join(tasks)} ({len(tasks)}); runs over other task sets are in their own tables "
                  f"below.", ""]
    if not shown.empty:
        lines.append(shown.to_markdown(index=False))
        if budget_note(df):
            lines += ["", budget_note(df)]
    if plots and not df.empty:
        lines += ["", "## Budgets", "", "![Accuracy vs added parameters](pareto_params.svg)",
                  "![Accuracy vs MACs per image](accuracy_flops.svg)",
                  "", "Also as PNG (`pareto_params.png`, `accuracy_flops.png`) and as a sortable page "
                  "(`leaderboard.html`)."]
    checks = sanity(df) if not df.empty else []
    if checks:
        lines += ["", "## Benchmark sanity (from the measured numbers above)", ""] + [f"- {c}" for c in checks]
    lines += subset_sections(results_dir, suite, {"max_added_params": max_added_params, "needs": needs,
                                                  "sort": sort})
    lines += published_section(results_dir, suite, df)
    if not seq_df.empty or seq_failed:
        lines += [""] + _sequential_lines(seq_df, seq_failed, plots)
    if not speed_df.empty or speed_failed:  # synthetic runs beside real ones: their costs only
        lines += [""] + _render_speed(speed_df, speed_failed, suite, "md").replace("# mergebench speed", "## Speed",
                                                                                   1).splitlines()
    if failed:
        lines += ["", "## Failed runs", ""] + [f"- `{r['method']['pipeline']}`: {r.get('error', '?')}" for r in failed]
    if unreadable:
        lines += ["", "## Unreadable record files (skipped)", ""] + [f"- {p}: {why}" for p, why in unreadable]
    return "\n".join(lines) + "\n"


def _latex(shown: pd.DataFrame, note: str = "") -> str:
    """A booktabs tabular (pandas writes \\toprule, \\midrule, \\bottomrule), with ``note`` set under it."""
    if shown.empty:
        return shown.to_latex(index=False)
    text = shown.to_latex(index=False, escape=True, column_format="l" + "r" * (len(shown.columns) - 1))
    return text + (f"\\par\\smallskip\\noindent{{\\footnotesize {_latex_escape(note)}}}\n" if note else "")


def _latex_escape(text: str) -> str:
    for a, b in (("&", r"\&"), ("%", r"\%"), ("$", r"\$"), ("#", r"\#"),
                 ("_", r"\_"), ("{", r"\{"), ("}", r"\}"), ("~", r"\textasciitilde{}"), ("^", r"\^{}"),
                 ("<", r"$<$"), (BUDGET_MARK, r"\dag{}")):
        text = text.replace(a, b)
    return text


def write(results_dir, suite: str, out_dir: str | os.PathLike | None = None, plots: bool = True,
          **view_options) -> dict[str, Path]:
    """Write LEADERBOARD.md, leaderboard.csv and leaderboard.tex next to the records; with ``plots``
    also leaderboard.html and the plots (pareto_params.{png,svg}, accuracy_flops.{png,svg})."""
    out_dir = Path(out_dir or Path(results_dir) / suite)
    df = table(results_dir, suite)[0]
    seq_df, _, seq_ok = sequential_table(results_dir, suite)
    want_plots = plots
    plots = plots and not df.empty
    paths = {}
    for fmt, name in (("md", "LEADERBOARD.md"), ("csv", "leaderboard.csv"), ("latex", "leaderboard.tex")):
        paths[fmt] = atomic_write_text(out_dir / name, render(results_dir, suite, fmt, plots=want_plots, **view_options))
    if not seq_df.empty:
        for fmt, name in (("csv", "leaderboard_sequential.csv"), ("latex", "leaderboard_sequential.tex")):
            paths[f"sequential_{fmt}"] = atomic_write_text(out_dir / name, render_sequential(results_dir, suite, fmt))
        if want_plots:
            fig = sequential_figure(seq_ok, suite)
            for ext in ("png", "svg"):
                paths[f"sequential_curve_{ext}"] = _save_figure(fig, out_dir / f"sequential_curve.{ext}")
    if plots:
        paths["html"] = atomic_write_text(out_dir / "leaderboard.html", render(results_dir, suite, "html", **view_options))
        shown = view(df, **view_options)
        for key, fig in figures(shown, suite).items():
            for ext in ("png", "svg"):
                paths[f"{key}_{ext}"] = _save_figure(fig, out_dir / f"{key}.{ext}")
    return paths


# ------------------------------------------------------------------ budget views
NEEDS_ALIASES = {"data-free": "nothing", "datafree": "nothing", "none": "nothing", "nothing": "nothing",
                 "unlabeled": "unlabeled", "labeled": "labeled", "sequential": "sequential"}
_NEEDS_LEVEL = {"nothing": 0, "unlabeled": 1, "labeled": 2, "sequential": 3}
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


def _needs_filter(needs: str) -> set[str]:
    key = NEEDS_ALIASES.get(str(needs).strip().lower())
    if key is None:
        raise InputError(f"unknown data budget {needs!r}; use one of {', '.join(sorted(NEEDS_ALIASES))}")
    if key == "sequential":
        return {"nothing", "sequential"}
    return {k for k, level in _NEEDS_LEVEL.items() if level <= _NEEDS_LEVEL[key] and k != "sequential"}


def _sort_spec(sort: str, columns) -> tuple[str, bool]:
    """``"COLUMN"`` or ``"COLUMN:asc|desc"``; accuracy columns sort descending, costs ascending by default."""
    name, _, direction = sort.rpartition(":") if sort.lower().endswith((":asc", ":desc")) else (sort, "", "")
    match = next((c for c in columns if c.lower() == name.strip().lower()), None)
    if match is None:
        from mergebench.registry import close_matches
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
        allowed = _needs_filter(needs)
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
                    f"added parameters <= {_fmt_params(limit)}")
    if needs is not None:
        bits.append("data: " + " or ".join("none (data-free)" if k == "nothing" else k
                                           for k in sorted(_needs_filter(needs), key=_NEEDS_LEVEL.get)))
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


# ------------------------------------------------------------------ plots
_NEEDS_COLOR = {"nothing": "#1f77b4", "unlabeled": "#ff7f0e", "labeled": "#2ca02c", "sequential": "#9467bd"}


def _needs_of(row) -> str:
    kinds = row["Needs"].split(",")
    return max(kinds, key=lambda k: _NEEDS_LEVEL.get(k, 0))


def _scatter(ax, x, y, labels, colors, front_mask, xlabel, title):
    ax.scatter(x, y, c=colors, s=28, zorder=3, edgecolors="none")
    fx = [(xi, yi) for xi, yi, f in zip(x, y, front_mask) if f]
    if fx:
        fx.sort()
        xs, ys = zip(*fx)
        ax.step(xs, ys, where="post", color="black", lw=1, zorder=2, label="Pareto front")
        ax.scatter(xs, ys, s=70, facecolors="none", edgecolors="black", zorder=4)
    grouped: dict = {}  # methods at the same point share one label
    for xi, yi, label in zip(x, y, labels):
        grouped.setdefault((xi, yi), []).append(label)
    for (xi, yi), names in grouped.items():
        ax.annotate(" / ".join(names), (xi, yi), fontsize=6, xytext=(4, 2), textcoords="offset points")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("average accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)


def figures(df: pd.DataFrame, suite: str) -> dict:
    """{'pareto_params': Figure, 'accuracy_flops': Figure} (Agg canvas; no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    if df.empty:
        return {}
    labels = list(df["Method"])
    colors = [_NEEDS_COLOR.get(_needs_of(r), "gray") for _, r in df.iterrows()]
    legend = [Line2D([], [], marker="o", ls="", color=c, label="data-free" if k == "nothing" else k)
              for k, c in _NEEDS_COLOR.items() if c in colors]
    out = {}

    fig = Figure(figsize=(8.5, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    added = [float(v) for v in df["Added params"]]
    positive = [v for v in added if v > 0]
    # log axis; methods adding nothing sit at a "0" tick one decade left of the smallest positive count
    zero_x = 10 ** (math.floor(math.log10(min(positive))) - 1) if positive else 1.0
    xs = [v if v > 0 else zero_x for v in added]
    _scatter(ax, xs, list(df["Avg"]), labels, colors, list(df["Pareto"]),
             "added parameters stored beyond one backbone (log; 0 at the left)", f"{suite}: accuracy vs added parameters")
    ax.set_xscale("log")
    ticks = [zero_x] + [10 ** k for k in range(int(math.log10(zero_x)) + 1, int(math.log10(max(xs))) + 2)]
    ax.set_xticks(ticks, ["0"] + [f"$10^{{{int(round(math.log10(t)))}}}$" for t in ticks[1:]])
    ax.set_xlim(zero_x / 2, max(xs) * 3)
    ax.legend(handles=legend + [Line2D([], [], color="black", lw=1, label="Pareto front")], fontsize=7,
              loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    out["pareto_params"] = fig

    fig = Figure(figsize=(8.5, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    macs = [float(v) for v in df["MMACs/img"]]
    _scatter(ax, macs, list(df["Avg"]), labels, colors, pareto_front(df["Avg"], macs),
             "MMACs per image (mean over tasks)", f"{suite}: accuracy vs inference cost")
    finite = [m for m in macs if m > 0 and not math.isnan(m)]
    if finite and max(finite) / min(finite) > 20:
        ax.set_xscale("log")
    ax.legend(handles=legend + [Line2D([], [], color="black", lw=1, label="Pareto front")], fontsize=7,
              loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    out["accuracy_flops"] = fig
    return out


def _save_figure(fig, path: Path) -> Path:
    """Save through a temporary file (atomic); SVG without dates and with fixed ids (reproducible files)."""
    import matplotlib

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fmt = path.suffix[1:]
    metadata = {"Date": None} if fmt == "svg" else {"Software": None}
    with matplotlib.rc_context({"svg.hashsalt": "mergebench", "svg.fonttype": "none"}):
        fig.savefig(tmp, format=fmt, dpi=150, metadata=metadata)
    os.replace(tmp, path)
    return path


def plot_svgs(df: pd.DataFrame, suite: str) -> dict[str, str]:
    """The plots as SVG text (for the HTML page)."""
    import io

    import matplotlib

    out = {}
    for key, fig in figures(df, suite).items():
        buf = io.StringIO()
        with matplotlib.rc_context({"svg.hashsalt": "mergebench", "svg.fonttype": "none"}):
            fig.savefig(buf, format="svg", metadata={"Date": None})
        text = buf.getvalue()
        out[key] = text[text.index("<svg"):]
    return out


# ------------------------------------------------------------------ HTML
_SORT_JS = """
document.querySelectorAll('table.lb th').forEach((th, col) => th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0];
  const asc = th.dataset.dir !== 'asc';
  th.closest('tr').querySelectorAll('th').forEach(h => delete h.dataset.dir);
  th.dataset.dir = asc ? 'asc' : 'desc';
  const key = td => { const v = td.dataset.v ?? td.textContent; const n = parseFloat(v);
                      return isNaN(n) ? v.toLowerCase() : n; };
  [...body.rows].sort((a, b) => { const x = key(a.cells[col]), y = key(b.cells[col]);
    return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1); }).forEach(r => body.appendChild(r));
}));
"""


def to_html(df: pd.DataFrame, failed: list, unreadable: list, suite: str, filters: str = "",
            svgs: dict | None = None) -> str:
    """One self-contained page: a sortable table (click a header) and the plots as inline SVG."""
    e = html.escape
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>mergebench leaderboard: {e(suite)}</title>",
             "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}"
             "table{border-collapse:collapse;font-size:13px}th,td{padding:3px 8px;border-bottom:1px solid #ddd;"
             "text-align:right}td:first-child,th:first-child{text-align:left}th{cursor:pointer;background:#f4f4f4}"
             "th[data-dir=asc]::after{content:' \\25B2'}th[data-dir=desc]::after{content:' \\25BC'}"
             "tr.pareto td:first-child{font-weight:bold}.plots svg{max-width:48%;height:auto}</style></head><body>",
             f"<h1>mergebench leaderboard: {e(suite)}</h1>",
             "<p>Top-1 accuracy (%) per task on the test split; Avg = mean over tasks; Norm = mean of accuracy / the "
             "task's expert accuracy; added parameters are what the merged model stores beyond one backbone; MMACs/img "
             "counted by fvcore. Bold rows (Pareto = &#9733;) are on the accuracy-versus-added-parameters front. "
             "Click a column header to sort.</p>"]
    if filters:
        parts.append(f"<p><b>View:</b> {e(filters)}</p>")
    if not df.empty:
        tasks = _tasks(df)
        shown = _display(df, tasks)
        cols = list(shown.columns)
        parts.append("<table class='lb'><thead><tr>" + "".join(f"<th>{e(c)}</th>" for c in cols) + "</tr></thead><tbody>")
        raw_of = {"Added params": "Added params"}
        for i, row in shown.iterrows():
            cells = []
            for c in cols:
                text = "&#9733;" if c == "Pareto" and row[c] else e(str(row[c]))
                raw = df.loc[i, raw_of.get(c, c)] if c in df.columns and c not in ("Method",) else None
                attr = f" data-v='{float(raw)}'" if isinstance(raw, (int, float)) and not isinstance(raw, bool) else ""
                if c == "Pareto":
                    attr = f" data-v='{int(bool(df.loc[i, 'Pareto']))}'"
                cells.append(f"<td{attr}>{text}</td>")
            cls = " class='pareto'" if df.loc[i, "Pareto"] else ""
            parts.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
        parts.append("</tbody></table>")
        if budget_note(df):
            parts.append(f"<p class='budget'>{e(budget_note(df))}</p>")
    if svgs:
        parts.append("<h2>Budgets</h2><div class='plots'>" + "".join(svgs.values()) + "</div>")
    if failed:
        parts.append("<h2>Failed runs</h2><ul>" + "".join(
            f"<li><code>{e(r['method']['pipeline'])}</code>: {e(str(r.get('error', '?')))}</li>" for r in failed) + "</ul>")
    if unreadable:
        parts.append("<h2>Unreadable record files (skipped)</h2><ul>" + "".join(
            f"<li>{e(str(p))}: {e(why)}</li>" for p, why in unreadable) + "</ul>")
    parts.append(f"<script>{_SORT_JS}</script></body></html>")
    return "\n".join(parts) + "\n"
