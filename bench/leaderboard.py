"""Leaderboards from records: one row per method pipeline (its newest ok record).

Every number in a table comes from a record, and every record from a run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from mergebench.io import atomic_write_text
from mergebench.records import load_records


def _latest_ok(records: list[dict]) -> list[dict]:
    latest: dict[str, dict] = {}
    for rec in records:
        if rec.get("status") != "ok":
            continue
        key = rec["method"]["pipeline"]
        if key not in latest or rec.get("finished", "") > latest[key].get("finished", ""):
            latest[key] = rec
    return list(latest.values())


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
    return name + (f" ({', '.join(f'{k}={v}' for k, v in changed.items())})" if changed else "")


def _failed(records: list[dict], ok_pipelines: set[str]) -> list[dict]:
    """Failed runs of pipelines that have no ok record (a later success supersedes a failure)."""
    return [r for r in records if r.get("status") == "failed" and r["method"]["pipeline"] not in ok_pipelines]


def table(results_dir, suite: str) -> tuple[pd.DataFrame, list[dict], list]:
    """(rows as a DataFrame, failed records, unreadable files) for ``suite``."""
    loaded = load_records(results_dir, suite)
    ok = _latest_ok(loaded.records)
    rows = []
    for rec in ok:
        m, p, f, t = rec["metrics"], rec["params"], rec.get("flops") or {}, rec["timing"]
        row = {"Method": _label(rec), "Pipeline": rec["method"]["pipeline"]}
        row.update({task: acc for task, acc in m["accuracy"].items()})
        row.update({
            "Avg": m["avg_accuracy"], "Norm": m["avg_normalized_accuracy"],
            "Added params": p["added"], "Added %": p["added_pct"],
            "MMACs/img": f.get("mean", float("nan")) / 1e6, "Merge s": t["merge_s"],
            "Needs": ",".join(rec["method"]["needs"]), "Selection": rec.get("selection", {}).get("protocol", "fixed"),
        })
        rows.append(row)
    df = pd.DataFrame(rows)
    if not df.empty:
        df = df.sort_values("Avg", ascending=False).reset_index(drop=True)
    failed = _failed(loaded.records, {r["method"]["pipeline"] for r in ok})
    return df, failed, loaded.unreadable


def _fmt_params(n: float) -> str:
    n = int(n)
    if abs(n) >= 1e6:
        return f"{n / 1e6:.2f}M"
    if abs(n) >= 1e3:
        return f"{n / 1e3:.1f}k"
    return str(n)


def _display(df: pd.DataFrame, tasks: list[str]) -> pd.DataFrame:
    out = df.drop(columns=["Pipeline", "Needs", "Selection"]).copy()
    for col in tasks + ["Avg", "Norm"]:
        out[col] = out[col].map(lambda v: f"{v:.1f}")
    out["Added params"] = [f"{_fmt_params(n)} ({pct:.2f}%)" for n, pct in zip(df["Added params"], df["Added %"])]
    out = out.drop(columns=["Added %"])
    out["MMACs/img"] = out["MMACs/img"].map(lambda v: f"{v:.2f}")
    out["Merge s"] = out["Merge s"].map(lambda v: f"{v:.1f}")
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


def published(suite: str) -> list[dict]:
    """Published averages for a real suite ``real-<backbone>`` (``datasets/reference_results.yaml``), else []."""
    import yaml

    path = Path(__file__).resolve().parents[1] / "datasets" / "reference_results.yaml"
    if not suite.startswith("real-") or not path.exists():
        return []
    return (yaml.safe_load(path.read_text()) or {}).get("backbones", {}).get(suite[len("real-"):], [])


def published_section(suite: str, df: pd.DataFrame) -> list[str]:
    """Markdown lines: each published number beside the measured one of the same method (default settings)."""
    rows = published(suite)
    if not rows:
        return []
    measured = {} if df.empty else {r["Pipeline"].split("(")[0]: r["Avg"] for _, r in df.iloc[::-1].iterrows()}
    table = pd.DataFrame([{"Method": r["display"], "Published Avg": f"{r['avg']:.1f}",
                           "Measured Avg": f"{measured[r['method']]:.1f}" if r["method"] in measured else "-",
                           "Verified": "yes" if r.get("verified") else "no", "Source": r["source"]} for r in rows])
    return ["", f"## Published numbers ({suite[len('real-'):]}, task-vectors protocol)", "",
            "From `datasets/reference_results.yaml`; Measured Avg is the best row of that method above. "
            "Verified = checked against the cited paper.", "", table.to_markdown(index=False)]


def render(results_dir, suite: str, fmt: str = "md") -> str:
    df, failed, unreadable = table(results_dir, suite)
    if df.empty and not failed:
        return f"No records for suite {suite!r} in {results_dir}. Run `mergebench run --suite {suite} ...` first.\n"
    tasks = [c for c in df.columns if c not in {"Method", "Pipeline", "Avg", "Norm", "Added params", "Added %",
                                                 "MMACs/img", "Merge s", "Needs", "Selection"}]
    if fmt == "csv":
        return df.to_csv(index=False)
    shown = _display(df, tasks) if not df.empty else df
    if fmt == "latex":
        # pandas writes booktabs rules (\toprule, \midrule, \bottomrule)
        return shown.to_latex(index=False, escape=True, column_format="l" + "r" * (len(shown.columns) - 1))
    lines = [f"# mergebench leaderboard: {suite}", "",
             "Top-1 accuracy (%) per task on the test split; Avg = mean over tasks; Norm = mean of accuracy / the "
             "task's expert accuracy. Added params = what the merged model stores beyond one backbone "
             "(count from its tensors, % of the backbone). MMACs/img = multiply-accumulates per image (fvcore). "
             "Generated from the run records in this folder by `mergebench leaderboard`.", ""]
    if not shown.empty:
        lines.append(shown.to_markdown(index=False))
    checks = sanity(df) if not df.empty else []
    if checks:
        lines += ["", "## Benchmark sanity (from the measured numbers above)", ""] + [f"- {c}" for c in checks]
    lines += published_section(suite, df)
    if failed:
        lines += ["", "## Failed runs", ""] + [f"- `{r['method']['pipeline']}`: {r.get('error', '?')}" for r in failed]
    if unreadable:
        lines += ["", "## Unreadable record files (skipped)", ""] + [f"- {p}: {why}" for p, why in unreadable]
    return "\n".join(lines) + "\n"


def write(results_dir, suite: str, out_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Write LEADERBOARD.md, leaderboard.csv and leaderboard.tex next to the records."""
    out_dir = Path(out_dir or Path(results_dir) / suite)
    paths = {}
    for fmt, name in (("md", "LEADERBOARD.md"), ("csv", "leaderboard.csv"), ("latex", "leaderboard.tex")):
        paths[fmt] = atomic_write_text(out_dir / name, render(results_dir, suite, fmt))
    return paths
