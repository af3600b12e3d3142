"""Leaderboard budget views, the Pareto front, plots and the HTML export, on micro records."""

import re

import pytest

from mergebench import leaderboard
from mergebench.cli import main
from mergebench.engine.run import run_many


@pytest.fixture(scope="module")
def records(micro, tmp_path_factory):
    results = tmp_path_factory.mktemp("budgets") / "results"
    recs = run_many(["pretrained", "individual", "weight_averaging", "task_arithmetic",
                     "lot_merging"], micro, results_dir=results, show_progress=False)
    assert all(r["status"] == "ok" for r in recs), [r.get("error") for r in recs]
    return results


def test_pareto_front_definition():
    acc = [70.0, 80.0, 75.0, 80.0, 60.0, 90.0]
    cost = [0, 0, 100, 50, 0, 1000]
    assert leaderboard.pareto_front(acc, cost) == [False, True, False, False, False, True]
    assert leaderboard.pareto_front([1.0, 1.0], [0, 0]) == [True, True], "ties are both on the front"


def test_parse_budget():
    assert leaderboard.parse_budget("1%") == ("pct", 1.0)
    assert leaderboard.parse_budget("500k") == ("count", 500_000)
    assert leaderboard.parse_budget("2M") == ("count", 2_000_000)
    assert leaderboard.parse_budget("1e6") == ("count", 1e6)
    assert leaderboard.parse_budget(0) == ("count", 0)
    with pytest.raises(ValueError, match="'1%'"):
        leaderboard.parse_budget("lots")


def test_budget_views(micro, records):
    df = leaderboard.table(records, micro.name)[0]
    assert len(df) == 5 and "Pareto" in df
    backbone_pct = df.set_index("Pipeline")["Added %"]
    assert backbone_pct["individual"] == pytest.approx(100.0 * (len(micro.tasks) - 1))

    within = leaderboard.view(df, max_added_params="1%")
    assert "individual" not in set(within["Pipeline"]) and len(within) == 4
    assert set(leaderboard.view(df, max_added_params=0)["Pipeline"]) == set(within["Pipeline"])
    assert len(leaderboard.view(df, max_added_params="10M")) == 5

    free = leaderboard.view(df, needs="data-free")
    assert not any("lot_merging" in p for p in free["Pipeline"]) and len(free) == 4
    assert len(leaderboard.view(df, needs="unlabeled")) == 5  # at most unlabeled data: LOT's exemplars count

    by_cost = leaderboard.view(df, sort="Added params:desc")
    assert by_cost["Pipeline"][0] == "individual"
    by_norm = leaderboard.view(df, sort="norm")
    assert list(by_norm["Norm"]) == sorted(by_norm["Norm"], reverse=True)
    with pytest.raises(ValueError, match="did you mean: Norm"):
        leaderboard.view(df, sort="Nrom")

    # the front is recomputed on the rows kept, and agrees with its definition
    for v in (df, within, free):
        expect = leaderboard.pareto_front(v["Avg"], v["Added params"])
        assert list(v["Pareto"]) == expect and any(expect)
    best_free = within["Avg"].max()
    assert within.loc[within["Avg"] == best_free, "Pareto"].all()


def test_rendered_views_plots_and_html(micro, records, tmp_path, capsys):
    md = leaderboard.render(records, micro.name, max_added_params="1%", needs="data-free", sort="Avg")
    assert "View: added parameters <= 1% of the backbone; data: none (data-free); sorted by Avg." in md
    assert "Individual" not in md.split("## ")[0] and "| Pareto" in md

    paths = leaderboard.write(records, micro.name, out_dir=tmp_path)
    for key in ("md", "csv", "latex", "html", "pareto_params_png", "pareto_params_svg"):
        assert paths[key].exists() and paths[key].stat().st_size > 500, key
    # every micro method costs the same MACs per image: that plot is not drawn, and the page says why
    assert "accuracy_flops_png" not in paths and "Accuracy vs MACs per image is not plotted" in paths["md"].read_text()
    assert paths["pareto_params_png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = paths["pareto_params_svg"].read_text()
    assert "<svg" in svg and "Task Arithmetic" in svg and "Pareto front" in svg
    assert "![Accuracy vs added parameters](pareto_params.svg)" in paths["md"].read_text()
    page = paths["html"].read_text()
    assert page.count("<svg") == 1 and "<table class='lb'>" in page and "addEventListener('click'" in page
    assert not re.search(r"<(img|script|link)[^>]+(src|href)=", page), "self-contained: nothing loaded from outside"
    rows = re.findall(r"<tr( class='pareto')?><td>([^<]+)</td>", page)
    assert len(rows) == 5 and any(cls for cls, _ in rows)
    # the second write gives the same SVG bytes (no dates, fixed ids): committed plots do not churn
    again = leaderboard.write(records, micro.name, out_dir=tmp_path)
    assert again["pareto_params_svg"].read_text() == svg

    assert main(["leaderboard", "--suite", micro.name, "--results", str(records), "--format", "csv",
                 "--max-added-params", "1%", "--sort", "Added params"]) == 0
    csv = capsys.readouterr().out.splitlines()
    assert len(csv) == 5 and csv[0].endswith(",Pareto")
    assert main(["leaderboard", "--suite", micro.name, "--results", str(records), "--needs", "everything"]) == 2
    assert "unknown data budget" in capsys.readouterr().err
