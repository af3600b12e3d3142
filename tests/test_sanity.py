"""The suite sanity checks and the entropy AUROC they read."""

import math

import pandas as pd
import torch

from mergebench.engine.evaluate import auroc, evaluate
from mergebench.api.models import SharedModel
from mergebench.suites.registry import MergingSanity


def test_auroc_counts_ties_half_and_needs_both_classes():
    assert auroc(torch.tensor([1.0, 2, 3, 4]), torch.tensor([0, 0, 1, 1])) == 1.0
    assert auroc(torch.tensor([4.0, 3, 2, 1]), torch.tensor([0, 0, 1, 1])) == 0.0
    assert auroc(torch.tensor([1.0, 1, 1, 1]), torch.tensor([0, 1, 0, 1])) == 0.5
    assert auroc(torch.tensor([1.0, 2, 2, 3]), torch.tensor([0, 0, 1, 1])) == 0.875  # (1 + 0.5 + 1 + 1) / 4
    assert math.isnan(auroc(torch.tensor([1.0, 2]), torch.tensor([1, 1])))


def test_evaluation_reports_each_tasks_entropy_auroc(micro):
    result = evaluate(SharedModel(micro.build_encoder()), micro)
    assert set(result["entropy_auroc"]) == set(micro.tasks)
    for task, value in result["entropy_auroc"].items():
        assert math.isnan(value) or 0.0 <= value <= 1.0, task


def _rows(ta_digits=40.0):
    rows = [("pretrained", 20.0, 20.0), ("individual", 80.0, 80.0), ("weight_averaging", 30.0, 30.0),
            ("task_arithmetic(scaling=0.3)", ta_digits, 50.0), ("tsv_merging(scaling=1.0)", 60.0, 60.0)]
    return pd.DataFrame([{"Method": p, "Pipeline": p, "digits": d, "signs": s, "Avg": (d + s) / 2}
                         for p, d, s in rows])


def _records(aurocs):
    """Task Arithmetic's record with its entropy AUROC, and the other merges' records: each carries its family."""
    others = [{"method": {"pipeline": p, "family": "data-free"}} for p in ("weight_averaging", "tsv_merging(scaling=1.0)")]
    return [{"method": {"pipeline": "task_arithmetic(scaling=0.3)", "family": "data-free"},
             "metrics": {"accuracy": {"digits": 40.0, "signs": 50.0}, "entropy_auroc": aurocs}}] + others


def test_sanity_checks_every_target_and_says_which_hold():
    check = MergingSanity(expert_gap=35, task_gap=20, recovery=0.35, auroc=0.75, span=10)
    lines = check(_rows(), _records({"digits": 0.8, "signs": 0.7}))
    text = "\n".join(lines)
    assert lines[0].startswith("(a)") and lines[0].endswith("holds") and "least: digits +60.0" in lines[0]
    assert "recovers 42%" in lines[2] and lines[2].endswith("holds")
    assert "(d)" in text and "signs 0.70" in lines[3] and lines[3].endswith("FAILS")
    assert lines[4].startswith("(e)") and "span 30.0 points, 30.0 (weight_averaging)" in lines[4] and lines[4].endswith("holds")
    assert check(_rows(), _records({"digits": 0.8, "signs": 0.9}))[3].endswith("holds")
    assert check(_rows(ta_digits=20.0), _records({"digits": 0.8, "signs": 0.9}))[2].endswith("FAILS")
    assert "no entropy AUROC" in check(_rows(), [])[3]
    assert MergingSanity(span=40)(_rows(), _records({}))[-1].endswith("FAILS")
