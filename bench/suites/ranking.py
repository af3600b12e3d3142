"""A suite's ranking of merging methods against the published real-benchmark table (``datasets/mini8_calibration.yaml``).

mini8 stands in for the real eight-task CLIP benchmark, so the order in which it ranks methods must be the
published order: Kendall tau over the calibration set's methods, each at its defaults, and each method on the same
side of Task Arithmetic as published.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from scipy.stats import kendalltau

CALIBRATION_FILE = Path(__file__).resolve().parents[2] / "datasets" / "mini8_calibration.yaml"


def calibration_set(path: Path = CALIBRATION_FILE) -> dict:
    """The published averages a suite's ranking is compared with (``datasets/mini8_calibration.yaml``)."""
    data = yaml.safe_load(path.read_text())
    return {"reference": data["reference"], "published": {m["method"]: float(m["avg"]) for m in data["methods"]}}


def ranking_agreement(measured: dict[str, float], path: Path = CALIBRATION_FILE) -> dict:
    """Kendall tau (tau-b) between ``measured`` {method: average accuracy} and the published averages over the
    calibration set's methods present in both, and which methods sit on the other side of the reference method
    (Task Arithmetic) than published."""
    cal = calibration_set(path)
    published, ref = cal["published"], cal["reference"]
    common = [m for m in published if m in measured]
    tau = kendalltau([published[m] for m in common], [measured[m] for m in common]).statistic if len(common) > 1 \
        else float("nan")
    wrong_side = []
    if ref in measured:
        wrong_side = [m for m in common if m != ref
                      and (published[m] > published[ref]) != (measured[m] > measured[ref])]
    return {"tau": float(tau), "methods": len(common), "of": len(published),
            "missing": [m for m in published if m not in measured], "wrong_side": wrong_side,
            "measured": {m: measured[m] for m in common}, "published": {m: published[m] for m in common}}
