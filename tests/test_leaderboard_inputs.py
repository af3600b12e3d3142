"""The leaderboard shows what it can of a results folder and names what it cannot: a record with an odd but
valid-looking field, a file that is not a regular file, record fields that look like Markdown, HTML or LaTeX; and it
lists every failed run and finds the records of a suite under the name a user types."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import threading
import warnings
from pathlib import Path

import pytest

from mergebench import leaderboard
from mergebench.records import write_record

RECORDS = Path(__file__).resolve().parent / "data" / "leaderboard" / "records" / "micro"
VICTIM = "task_arithmetic-2705668fdc1a079c.json"  # an ok record of the micro fixture (Task Arithmetic, 9.4)
TEXT_FORMATS = ("md", "csv", "latex", "html")


@pytest.fixture
def micro_results(tmp_path):
    """A results folder holding a copy of the micro fixture's records."""
    shutil.copytree(RECORDS, tmp_path / "micro")
    return tmp_path


def _edit(path: Path, change) -> None:
    rec = json.loads(path.read_text())
    change(rec)
    path.write_text(json.dumps(rec))


def _render_everything(results, suite="micro", write=False) -> dict[str, str]:
    """Every printable format (the HTML page draws the plots), the sequential table, and with ``write`` the files."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = {fmt: leaderboard.render(results, suite, fmt) for fmt in TEXT_FORMATS}
        out["sequential"] = leaderboard.render_sequential(results, suite)
        if write:
            paths = leaderboard.write(results, suite, out_dir=results / "out", plots=True)
            assert {"md", "html", "pareto_params_png"} <= set(paths)
    return out


def _delete(*keys):
    def change(rec):
        d = rec
        for k in keys[:-1]:
            d = d[k]
        del d[keys[-1]]
    return change


def _set(value, *keys):
    def change(rec):
        d = rec
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    return change


# Odd but valid-looking records: each passes records.check_record (so resume and sweeps read it); the leaderboard
# either shows it or lists it as unreadable, and shows everything else.
SHOWN = {
    "no display_name": _delete("method", "display_name"),
    "no hparams": _delete("method", "hparams"),
    "no flops": _delete("flops"),
    "no finished": _delete("finished"),
    "flops null": _set(None, "flops"),  # a run with count_flops=False
    "finished null": _set(None, "finished"),
    "selection null": _set(None, "selection"),
}
UNSHOWABLE = {
    "display_name a number": (_set(7, "method", "display_name"), "'method.display_name' is int"),
    "hparams a list": (_set([1, 2], "method", "hparams"), "'method.hparams' is list"),
    "needs a string": (_set("nothing", "method", "needs"), "'method.needs' is str"),
    "needs holding null": (_set([None], "method", "needs"), "method.needs[0] is NoneType"),
    "suite a string": (_set("micro", "suite"), "'suite' is str"),
    "tasks a number": (_set(3, "suite", "tasks"), "'suite.tasks' is int"),
    "flops a string": (_set("many", "flops"), "'flops' is str"),
    "flops.mean a string": (_set("431168", "flops", "mean"), "'flops.mean' is str"),
    "an accuracy a string": (_set("6.25", "metrics", "accuracy", "digits"), "metrics.accuracy['digits'] is str"),
    "finished a number": (_set(20261201, "finished"), "'finished' is int"),
    "selection a string": (_set("fixed", "selection"), "'selection' is str"),
    "below_paper a string": (_set("steps", "budget", "below_paper"), "'budget.below_paper' is str"),
    "config a list": (_set([], "config"), "'config' is list"),
    "timing.merge_s a bool": (_set(True, "timing", "merge_s"), None),  # records.check_record refuses it already
}


@pytest.mark.parametrize("variant", list(SHOWN))
def test_a_record_with_a_missing_optional_field_is_shown(micro_results, variant):
    _edit(micro_results / "micro" / VICTIM, SHOWN[variant])
    out = _render_everything(micro_results)
    assert re.search(r"^\| Task Arithmetic +\| +6\.2 \|", out["md"], re.M), out["md"]
    assert VICTIM not in out["md"]


@pytest.mark.parametrize("variant", list(UNSHOWABLE))
def test_a_record_that_cannot_be_shown_is_named_and_the_rest_is_shown(micro_results, variant):
    change, why = UNSHOWABLE[variant]
    _edit(micro_results / "micro" / VICTIM, change)
    out = _render_everything(micro_results, write=variant == "display_name a number")
    md = out["md"]
    unreadable = md.split("## Unreadable record files (skipped)")[1]
    line = next(ln for ln in unreadable.splitlines() if VICTIM in ln)
    assert why is None or why in line, line
    assert "Task Arithmetic" not in md.split("## Benchmark sanity")[0].split("## Runs over")[0]
    for other in ("TIES-Merging", "Weight Averaging", "Individual (fine-tuned experts)"):
        assert other in md and other in out["html"] and other in out["csv"] and other.split(" (")[0] in out["latex"]
    assert VICTIM in out["html"]


def _without_blocking(fifo: Path, call):
    """``call()``'s result; fails the test if it blocks on ``fifo`` (which is then opened for writing, so the blocked
    read ends and no thread is left behind)."""
    out: list = []
    worker = threading.Thread(target=lambda: out.append(call()), daemon=True)
    worker.start()
    worker.join(60)
    if worker.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(10)
        pytest.fail(f"reading the results folder blocked on the FIFO {fifo}")
    assert out, "the call raised (see the thread's traceback above)"
    return out[0]


def test_a_fifo_and_a_directory_named_json_are_listed_not_waited_on(micro_results):
    os.mkfifo(micro_results / "micro" / "pipe.json")
    (micro_results / "micro" / "folder.json").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        md = _without_blocking(micro_results / "micro" / "pipe.json", lambda: leaderboard.render(micro_results, "micro"))
    unreadable = md.split("## Unreadable record files (skipped)")[1]
    assert re.search(r"pipe\.json: ValueError: not a regular file \(a FIFO\)", unreadable), unreadable
    assert re.search(r"folder\.json: ValueError: not a regular file \(a directory\)", unreadable), unreadable
    assert "| TIES-Merging" in md


def test_a_record_is_never_written_over_a_fifo(tmp_path):
    target = tmp_path / "micro" / "x-0000000000000000.json"
    target.parent.mkdir()
    os.mkfifo(target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        written = _without_blocking(target, lambda: write_record({"status": "ok"}, target))
    assert written.name == "x-0000000000000000.1.json" and target.exists()


def test_a_folder_of_unreadable_files_lists_them(tmp_path):
    (tmp_path / "micro").mkdir()
    shutil.copy(RECORDS / "broken-0000000000000000.json", tmp_path / "micro")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        md = leaderboard.render(tmp_path, "micro")
    assert "broken-0000000000000000.json: JSONDecodeError" in md.split("## Unreadable record files (skipped)")[1]


# ------------------------------------------------------------------ escaping
HOSTILE_NAME = "<img src=x onerror=alert(1)> a|b & $x_1^2$ 100% #1 {c} ~ \\d"


def _hostile(micro_results):
    def change(rec):
        rec["method"]["display_name"] = rec["method"]["label"] = HOSTILE_NAME
    _edit(micro_results / "micro" / VICTIM, change)

    def fail(rec):
        rec["error"] = "RuntimeError: <script>alert(1)</script> | a\nsecond line"
        rec["method"]["pipeline"] = "dare(note='`x`|<b>')"
    _edit(micro_results / "micro" / "dare-0badc0de0badc0de.json", fail)


def _md_cells(line: str) -> list[str]:
    """The cells of a GitHub-flavoured Markdown table row (``\\|`` is a pipe inside a cell)."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def test_markdown_escapes_record_fields(micro_results):
    _hostile(micro_results)
    md = _render_everything(micro_results)["md"]
    assert "<img" not in md and "<script" not in md
    header = next(ln for ln in md.splitlines() if ln.startswith("| Method"))
    row = next(ln for ln in md.splitlines() if "onerror" in ln)
    assert len(_md_cells(row)) == len(_md_cells(header)), row
    assert _md_cells(row)[0].startswith("&lt;img src=x onerror=alert(1)> a\\|b")
    failed = md.split("## Failed runs")[1].split("\n## ")[0]
    items = [ln for ln in failed.splitlines() if ln.startswith("- ")]
    assert len(items) == 1 and "second line" in items[0], failed  # one item: the newline does not end it
    assert "``dare(note='`x`|<b>')``" in items[0]  # a code span longer than the backticks inside


def test_html_escapes_record_fields_in_the_table_and_the_plots(micro_results):
    _hostile(micro_results)
    page = _render_everything(micro_results)["html"]
    assert "<img" not in page and "<script>alert" not in page and "<b>" not in page
    assert page.count("&lt;img src=x onerror=alert(1)&gt;") >= 2  # the table and the plot's label
    assert "$x_1^2$" in page[page.index("<svg"):]  # the plot's label as typed, not read as mathtext


def test_latex_escapes_record_fields(micro_results):
    _hostile(micro_results)
    tex = _render_everything(micro_results)["latex"]
    row = next(ln for ln in tex.splitlines() if "onerror" in ln)
    assert row.startswith(r"$<$img src=x onerror=alert(1)$>$ a$|$b \& \$x\_1\^{}2\$ 100\% "
                          r"\#1 \{c\} \textasciitilde{} \textbackslash{}d &"), row
    cells = re.split(r"(?<!\\)&", row.removesuffix(r"\\"))
    assert len(cells) == len(re.split(r"(?<!\\)&", next(ln for ln in tex.splitlines() if ln.startswith("Method"))))
    assert "†" not in tex  # the budget mark is \dag{}, which every LaTeX engine sets


# ------------------------------------------------------------------ failed runs, suite names
def _failed_copy(folder: Path, source: str, name: str, change) -> None:
    rec = json.loads((folder / source).read_text())
    rec.update(status="failed", error="MethodFailed: probe failure")
    for key in ("metrics", "params", "flops"):
        rec.pop(key, None)
    change(rec)
    (folder / name).write_text(json.dumps(rec))


def test_a_failed_run_is_listed_beside_an_ok_run_of_the_same_method_over_other_tasks(micro_results):
    folder = micro_results / "micro"

    def other_tasks(rec):  # the same method settings over two of the three tasks: another configuration
        rec["suite"]["tasks"] = ["digits", "signs"]
        rec["config_hash"] = "fa11ed0000000001"
    _failed_copy(folder, VICTIM, "task_arithmetic-fa11ed0000000001.json", other_tasks)

    def same_configuration(rec):  # superseded: the same configuration (config hash) has an ok record
        rec["error"] = "MethodFailed: an earlier failure of the configuration that ran ok"
    _failed_copy(folder, "ties_merging-1533541cad7892c2.json", "ties_merging-1533541cad7892c2.1.json",
                 same_configuration)
    md = leaderboard.render(micro_results, "micro")
    failed = md.split("## Failed runs")[1].split("\n## ")[0]
    assert "`task_arithmetic(scaling=0.3)` (over digits, signs): MethodFailed: probe failure" in failed
    assert "`dare(" in failed and "ties_merging" not in failed
    assert "| Task Arithmetic" in md  # the ok run is still shown
    assert "probe failure" in leaderboard.render(micro_results, "micro", "html")


def test_the_suite_name_a_user_types_finds_its_folder(tmp_path, capsys):
    from mergebench.cli import main
    from mergebench.errors import MissingFileError

    real = Path(__file__).resolve().parent / "data" / "leaderboard" / "records" / "real-ViT-B-32"
    shutil.copytree(real, tmp_path / "real-ViT-B-32")
    assert leaderboard.resolve_suite(tmp_path, "real") == "real-ViT-B-32"
    assert leaderboard.resolve_suite(tmp_path, "real-ViT-B-32") == "real-ViT-B-32"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["leaderboard", "--suite", "real", "--results", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert "# mergebench leaderboard: real-ViT-B-32" in out.out and "| Task Arithmetic" in out.out
    assert f"suite real: the records in {tmp_path / 'real-ViT-B-32'}" in out.err
    shutil.copytree(real, tmp_path / "real-ViT-L-14")
    assert main(["leaderboard", "--suite", "real", "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "suite 'real' has records in 2 folders" in err and "real-ViT-B-32, real-ViT-L-14" in err
    with pytest.raises(MissingFileError, match=r"no records for suite 'mini8' .*\(folders with records: real-ViT-B-32, "
                                               r"real-ViT-L-14\)"):
        leaderboard.resolve_suite(tmp_path, "mini8")
    assert main(["leaderboard", "--suite", "nothing-here", "--results", str(tmp_path)]) == 2
