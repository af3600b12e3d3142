"""The leaderboard's figures (PNG and SVG, written beside it by ``write``): accuracy versus added parameters with
the Pareto front, accuracy versus MACs per image, and the sequential runs' accuracy after each expert."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import pandas as pd

from mergebench.leaderboard.formats import Format, Page, register_format
from mergebench.leaderboard.model import FIGURES, equal_costs_note, needs_level, pareto_front, sequential_label
from mergebench.api.needs import NEEDS


@register_format("figures")
class Figures(Format):
    """Not printable: ``write`` saves the figures (with plots, next to the tables)."""

    with_plots = True

    def write(self, page: Page, out_dir: Path) -> dict[str, Path]:
        paths = {}
        drawn = figures(page.df, page.suite)
        for key, fig in drawn.items():
            for ext in ("png", "svg"):
                paths[f"{key}_{ext}"] = save_figure(fig, out_dir / f"{key}.{ext}")
        for key in set(FIGURES) - set(drawn):  # a figure this page does not draw (its note says why) is not left stale
            for ext in ("png", "svg"):
                (out_dir / f"{key}.{ext}").unlink(missing_ok=True)
        return paths

    def write_sequential(self, page: Page, out_dir: Path) -> dict[str, Path]:
        paths = {}
        fig = sequential_figure(page.sequential[2], page.suite)
        for ext in ("png", "svg"):
            paths[f"sequential_curve_{ext}"] = save_figure(fig, out_dir / f"sequential_curve.{ext}")
        return paths


def sequential_figure(ok: list[dict], suite: str):
    """Per method, the accuracy on the tasks seen after each expert: mean over orders, ± std band."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: matplotlib loads only for pages with plots
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
        line, = ax.plot(list(steps), mean, marker="o", ms=3, label=plain(sequential_label(rec)))
        ax.fill_between(list(steps), [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)],
                        color=line.get_color(), alpha=0.15, lw=0)
    ax.set_xlabel("experts arrived (tasks seen)")
    ax.set_ylabel("average accuracy on the tasks seen (%)")
    ax.set_title(f"{suite}: sequential merging, mean ± std over task orders", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


# one colour per kind of data a method uses, in the order of needs.NEEDS (nothing, unlabeled, labeled, sequential)
_NEEDS_COLOR = dict(zip(NEEDS, ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b")))


def _needs_of(row) -> str:
    kinds = row["Needs"].split(",")
    return max(kinds, key=needs_level)


def plain(text: str) -> str:
    """``text`` as matplotlib draws it literally (a ``$`` in a method's name does not start mathtext)."""
    return str(text).replace("$", r"\$")


def _scatter(ax, x, y, labels, colors, front_mask, xlabel, title):
    """The points, the front as a step line, and one label per point (methods at the same point share it), placed
    by ``place_labels``."""
    ax.scatter(x, y, c=colors, s=28, zorder=3, edgecolors="none")
    fx = [(xi, yi) for xi, yi, f in zip(x, y, front_mask) if f]
    if fx:
        fx.sort()
        xs, ys = zip(*fx)
        ax.step(xs, ys, where="post", color="black", lw=1, zorder=2, label="Pareto front")
        ax.scatter(xs, ys, s=70, facecolors="none", edgecolors="black", zorder=4)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("average accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.yaxis.get_major_formatter().set_useOffset(False)
    grouped: dict = {}
    for xi, yi, label in zip(x, y, labels):
        grouped.setdefault((xi, yi), []).append(label)
    ax.figure.tight_layout()  # the final axes size first: the placement works in display coordinates
    place_labels(ax, [" / ".join(names) for names in grouped.values()], list(grouped))


def place_labels(ax, labels: list[str], points: list[tuple[float, float]], pad_px: float = 8.0,
                 gap_px: float = 24.0, fontsize: float = 6.5):
    """Label each point so that no two labels overlap and every label stays inside the axes.

    Each label starts right of its point (left of it where it would leave the axes); labels whose spans would meet on
    the x axis (within ``gap_px``: every method that adds no parameters, and whatever label reaches them) form one
    stack, one line apart in the order of their points, centred on them and kept inside the axes, and a thin line
    joins a label that moved to its point."""
    renderer = ax.figure.canvas.get_renderer()
    to_px, to_data = ax.transData.transform, ax.transData.inverted().transform
    box = ax.get_window_extent(renderer)
    texts = [ax.text(*p, label, fontsize=fontsize, parse_math=False, zorder=5, va="center")
             for label, p in zip(labels, points)]
    px = [to_px(p) for p in points]
    widths = [t.get_window_extent(renderer).width for t in texts]
    line = max(t.get_window_extent(renderer).height for t in texts) * 1.15
    left = []  # each label's left edge: right of its point, or left of it where it would leave the axes
    for i, text in enumerate(texts):
        if px[i][0] + pad_px + widths[i] <= box.x1 - 2:
            left.append(px[i][0] + pad_px)
        else:
            text.set_horizontalalignment("right")
            left.append(px[i][0] - pad_px - widths[i])
    stacks: list[list[int]] = []
    for i in sorted(range(len(texts)), key=lambda i: left[i]):
        meets = [s for s in stacks if any(left[i] <= left[j] + widths[j] + gap_px and left[j] <= left[i] + widths[i]
                                          for j in s)]
        stacks = [s for s in stacks if s not in meets] + [[i] + [j for s in meets for j in s]]
    for stack in stacks:
        stack.sort(key=lambda i: px[i][1])
        ys = [px[i][1] for i in stack]
        placed: list[float] = []
        for y in ys:  # at its point, or one line above the label below it
            placed.append(max(y, placed[-1] + line) if placed else y)
        shift = (sum(placed) - sum(ys)) / len(ys)  # centred on the points
        shift = min(shift, placed[0] - box.y0 - line / 2)  # the lowest label inside the axes
        shift = max(shift, placed[-1] - box.y1 + line / 2)  # and the highest
        for i, y in zip(stack, placed):
            anchor = px[i][0] + (pad_px if texts[i].get_horizontalalignment() == "left" else -pad_px)
            texts[i].set_position(to_data((anchor, y - shift)))
            if abs(y - shift - px[i][1]) > line / 2:
                ax.annotate("", xy=points[i], xytext=to_data((anchor, y - shift)), zorder=1,
                            arrowprops=dict(arrowstyle="-", color="0.6", lw=0.4, shrinkA=0, shrinkB=3))
    return texts


def _legend(ax, handles):
    """The legend outside the axes, on the right, where no label is placed."""
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def figures(df: pd.DataFrame, suite: str) -> dict:
    """{'pareto_params': Figure, 'accuracy_flops': Figure} (Agg canvas; no pyplot state); accuracy versus MACs only
    where the methods' costs differ (``equal_costs_note``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: matplotlib loads only for pages with plots
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    if df.empty:
        return {}
    labels = list(df["Method"])
    colors = [_NEEDS_COLOR.get(_needs_of(r), "gray") for _, r in df.iterrows()]
    legend = [Line2D([], [], marker="o", ls="", color=c, label="data-free" if k == "nothing" else k)
              for k, c in _NEEDS_COLOR.items() if c in colors]
    legend.append(Line2D([], [], color="black", lw=1, label="Pareto front"))
    height = max(4.8, 1.6 + 0.12 * len(df))  # room for a stack of one label per row
    out = {}

    fig = Figure(figsize=(9.5, height))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    added = [float(v) for v in df["Added params"]]
    positive = [v for v in added if v > 0]
    # log axis; methods adding nothing sit at a "0" tick one decade left of the smallest positive count
    zero_x = 10 ** (math.floor(math.log10(min(positive))) - 1) if positive else 1.0
    xs = [v if v > 0 else zero_x for v in added]
    ax.set_xscale("log")
    ticks = [zero_x] + [10 ** k for k in range(int(math.log10(zero_x)) + 1, int(math.log10(max(xs))) + 2)]
    ax.set_xticks(ticks, ["0"] + [f"$10^{{{int(round(math.log10(t)))}}}$" for t in ticks[1:]])
    ax.set_xlim(zero_x / 2, max(xs) * 3)
    _legend(ax, legend)
    _scatter(ax, xs, list(df["Avg"]), labels, colors, list(df["Pareto"]),
             "added parameters stored beyond one backbone (log; 0 at the left)", f"{suite}: accuracy vs added parameters")
    out["pareto_params"] = fig

    if equal_costs_note(df):
        return out
    fig = Figure(figsize=(9.5, height))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    macs = [float(v) for v in df["MMACs/img"]]
    finite = [m for m in macs if m > 0 and not math.isnan(m)]
    if max(finite) / min(finite) > 20:
        ax.set_xscale("log")
    else:
        ax.xaxis.get_major_formatter().set_useOffset(False)
    _legend(ax, legend)
    _scatter(ax, macs, list(df["Avg"]), labels, colors, pareto_front(df["Avg"], macs),
             "MMACs per image (mean over tasks)", f"{suite}: accuracy vs inference cost")
    out["accuracy_flops"] = fig
    return out


def save_figure(fig, path: Path) -> Path:
    """Save through a temporary file (atomic); SVG without dates and with fixed ids (reproducible files)."""
    import matplotlib  # lazy: loaded only where plots are drawn

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fmt = path.suffix[1:]
    metadata = {"Date": None} if fmt == "svg" else {"Software": None}
    with matplotlib.rc_context({"svg.hashsalt": "mergebench", "svg.fonttype": "none"}):
        fig.savefig(tmp, format=fmt, dpi=150, metadata=metadata)
    os.replace(tmp, path)
    return path


def svg_text(fig) -> str:
    """``fig`` as inline SVG (for the HTML page): reproducible like ``save_figure``'s files."""
    import matplotlib  # lazy: loaded only where plots are drawn

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": "mergebench", "svg.fonttype": "none"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg"):]


def plot_svgs(df: pd.DataFrame, suite: str) -> dict[str, str]:
    """The plots as SVG text (for the HTML page)."""
    return {key: svg_text(fig) for key, fig in figures(df, suite).items()}


def sequential_svg(ok: list[dict], suite: str) -> str:
    """The sequential runs' curve as SVG text (for the HTML page)."""
    return svg_text(sequential_figure(ok, suite))
