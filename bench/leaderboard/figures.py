"""The leaderboard's figures (PNG and SVG, written beside it by ``write``): accuracy versus added parameters with
the Pareto front, accuracy versus MACs per image, and the sequential runs' accuracy after each expert."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd

from mergebench.leaderboard.formats import Format, Page, register_format
from mergebench.leaderboard.model import needs_level, pareto_front, sequential_label
from mergebench.registry import NEEDS


@register_format("figures")
class Figures(Format):
    """Not printable: ``write`` saves the figures (with plots, next to the tables)."""

    with_plots = True

    def write(self, page: Page, out_dir: Path) -> dict[str, Path]:
        paths = {}
        for key, fig in figures(page.df, page.suite).items():
            for ext in ("png", "svg"):
                paths[f"{key}_{ext}"] = save_figure(fig, out_dir / f"{key}.{ext}")
        return paths

    def write_sequential(self, page: Page, out_dir: Path) -> dict[str, Path]:
        paths = {}
        fig = sequential_figure(page.sequential[2], page.suite)
        for ext in ("png", "svg"):
            paths[f"sequential_curve_{ext}"] = save_figure(fig, out_dir / f"sequential_curve.{ext}")
        return paths


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
        line, = ax.plot(list(steps), mean, marker="o", ms=3, label=sequential_label(rec))
        ax.fill_between(list(steps), [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)],
                        color=line.get_color(), alpha=0.15, lw=0)
    ax.set_xlabel("experts arrived (tasks seen)")
    ax.set_ylabel("average accuracy on the tasks seen (%)")
    ax.set_title(f"{suite}: sequential merging, mean ± std over task orders", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


# one colour per kind of data a method uses, in the order of registry.NEEDS (nothing, unlabeled, labeled, sequential)
_NEEDS_COLOR = dict(zip(NEEDS, ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b")))


def _needs_of(row) -> str:
    kinds = row["Needs"].split(",")
    return max(kinds, key=needs_level)


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


def save_figure(fig, path: Path) -> Path:
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
