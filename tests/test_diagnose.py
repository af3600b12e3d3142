"""`mergebench diagnose`: each mechanism is computed from the suite, and the measures mean what they say."""

import json
import math

import torch

from mergebench import cli
from mergebench.diagnose import (DiagnoseSettings, _own_share, calibration, diagnose, low_rank, markdown, spearman,
                                 trimmed)
from mergebench.activations import lot_linear
from mergebench.records import load_records
from mergebench.weights import Weights

FAST = DiagnoseSettings(images=64, exemplars=8, coefficient_steps=2)


def test_trimming_and_low_rank_keep_what_they_say():
    g = torch.Generator().manual_seed(0)
    tau = Weights({"a": torch.randn(6, 5, generator=g), "b": torch.randn(7, generator=g)})
    assert all(torch.equal(trimmed(tau, 100)[k], tau[k]) for k in tau)
    kept = trimmed(tau, 20)
    nonzero = sum(int((v != 0).sum()) for v in kept.values())
    assert nonzero == round(0.2 * tau.numel())
    smallest_kept = min(v[v != 0].abs().min() for v in kept.values() if (v != 0).any())
    largest_dropped = max(v[(kept[k] == 0)].abs().max() for k, v in tau.items() if (kept[k] == 0).any())
    assert smallest_kept >= largest_dropped
    r1 = low_rank(tau, 1)  # ceil(1% of 5) = rank 1 for the matrix; the vector stays whole
    assert torch.linalg.matrix_rank(r1["a"]) == 1 and torch.equal(r1["b"], tau["b"])
    assert torch.allclose(low_rank(tau, 100)["a"], tau["a"], atol=1e-5)


def test_own_share_is_one_for_disjoint_inputs_and_the_mean_is_one_over_t():
    # two tasks whose inputs live in disjoint coordinates: LOT's closed form keeps each task's own update whole,
    # the plain mean keeps half of it when the other update does not act on them
    g1, g2 = torch.diag(torch.tensor([1.0, 1.0, 0.0, 0.0])), torch.diag(torch.tensor([0.0, 0.0, 1.0, 1.0]))
    t1, t2 = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    t2[:, :2] = 0  # task 2's update does not act on task 1's inputs
    merged = lot_linear([t1, t2], [g1, g2])
    assert math.isclose(_own_share(merged, t1, g1.double()), 1.0, rel_tol=1e-9)
    assert math.isclose(_own_share((t1 + t2) / 2, t1, g1.double()), 0.5, rel_tol=1e-9)


def test_calibration_and_spearman():
    logits = torch.tensor([[10.0, 0.0], [0.1, 0.0], [0.0, 0.2], [5.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])       # the two confident predictions right, one unsure one wrong
    c = calibration(logits, labels)
    assert c["accuracy"] == 75.0 and c["entropy_wrong"] > c["entropy_correct"]
    assert math.isclose(spearman(torch.arange(5.0), torch.arange(5.0) ** 3), 1.0)
    assert math.isclose(spearman(torch.arange(5.0), -torch.arange(5.0)), -1.0)


def test_diagnose_on_micro_computes_every_row(micro):
    report = diagnose(micro, FAST, verbose=False)
    json.dumps(report)  # the report is plain JSON
    tasks = micro.tasks
    for section, levels in (("trim", ("5", "10", "20", "50")), ("low_rank", ("3", "10", "30"))):
        assert set(report[section]) == set(levels)
        for row in report[section].values():
            assert set(row["tasks"]) == set(tasks)
    sub = report["subspace"]
    assert 0.0 <= sub["overlap"] <= 1.0 + 1e-9 and sub["union_over_one"] >= 1.0
    assert sub["sites"] and all(name.startswith("transformer.resblocks.") for name in sub["sites"])
    # the plain mean of T orthogonal-ish updates keeps about 1/T; Task Arithmetic's sum keeps more than the mean
    assert sub["own_share_sum"] > sub["own_share_mean"]
    cal = report["calibration"]
    assert set(cal["tasks"]) == set(tasks) and cal["entropy"] >= 0
    assert -1.0 <= report["entropy_loss"]["pooled"] <= 1.0
    heads = report["entropy_headroom"]
    for objective in ("labels", "entropy"):
        assert set(heads[objective]["lambda_mean"]) == set(tasks)
        assert all(0.0 <= v <= 1.0 for v in heads[objective]["lambda_mean"].values())
    text = markdown(report)
    assert text.count("\n| ") == 10  # the header and nine mechanisms
    assert "not published" in text


def test_cli_writes_the_report_next_to_the_leaderboard(tmp_path, capsys):
    code = cli.main(["diagnose", "--suite", "micro", "--write", "--results", str(tmp_path), "--images", "32",
                     "--exemplars", "4", "--steps", "1", "-q"])
    assert code == 0
    written = json.loads((tmp_path / "micro" / "diagnostics.json").read_text())
    assert written["suite"] == "micro" and "trim" in written
    assert (tmp_path / "micro" / "DIAGNOSTICS.md").read_text().startswith("# Mechanisms of micro")
    assert load_records(tmp_path, "micro").unreadable == []  # the report sits beside the records, not among them


def test_sanity_reports_the_mechanism_targets_from_the_report():
    from mergebench.suites.mini8 import RANKED

    def report(trim, lot):
        return {"trim": {"20": {"mean": trim, "min": trim}}, "low_rank": {"10": {"mean": 0.95, "min": 0.9}},
                "subspace": {"own_share_lot": lot}, "entropy_headroom": {"share_found_by_entropy": 0.7},
                "calibration": {"entropy_wrong": 0.9, "entropy_correct": 0.3}}
    mark = lambda ok: "holds" if ok else "FAILS"  # noqa: E731
    assert RANKED._mechanisms(report(0.95, 0.8), mark).endswith(": holds")
    failing = RANKED._mechanisms(report(0.76, 0.8), mark)
    assert "76% of the experts' gain" in failing and failing.endswith(": FAILS")
    assert RANKED._mechanisms(None, mark).endswith(": FAILS")
