"""The command line on bad input and long work: broken plugins, checked values, names in use, progress bars."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import textwrap
from pathlib import Path

import pytest
import yaml

from mergebench.api import registry
from mergebench.cli import main

REPO = Path(__file__).resolve().parents[1]

BROKEN = '''
def merge_fn(ctx, scaling: float = 0.3):
    """A plugin function whose entry point reuses a built-in's name."""
    return ctx.shared_model(ctx.pretrained_weights)


def no_context():
    """No merge-context argument."""
'''

EXITS = '''
import argparse

parser = argparse.ArgumentParser()
parser.add_argument("--required-thing", required=True)
parser.parse_args()  # at import: argparse ends the process (SystemExit)
'''


@pytest.fixture
def broken_plugins(install_plugin) -> Path:
    """One distribution of three broken entry points: a built-in's name, a function without a context, a module
    that exits at import."""
    return install_plugin("mb_broken_plugin", {"mb_broken_plugin": BROKEN, "mb_exiting_plugin": EXITS},
                          {"task_arithmetic": "mb_broken_plugin:merge_fn", "no_ctx_probe": "mb_broken_plugin:no_context",
                           "exiting_probe": "mb_exiting_plugin"})


def _cli(argv: list[str], path: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    code = textwrap.dedent(f"""
        import sys
        {f'sys.path.insert(0, {str(path)!r})' if path else ''}
        from mergebench.cli import main
        sys.exit(main({argv!r}))
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


# ------------------------------------------------------------------ broken plugins are never fatal
def test_each_broken_plugin_is_one_warning_and_the_commands_work(broken_plugins):
    out = _cli(["list-methods", "task_arith*"], broken_plugins)
    assert out.returncode == 0, out.stderr
    assert "task_arithmetic" in out.stdout and "built-in" in out.stdout  # the built-in keeps its name
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    for name in ("task_arithmetic", "no_ctx_probe", "exiting_probe"):
        named = [line for line in lines if f"plugin {name!r}" in line]
        assert len(named) == 1 and named[0].startswith("warning: "), (name, out.stderr)
    assert "already registered" in out.stderr and "context" in out.stderr and "exited with status 2" in out.stderr
    assert "Traceback" not in out.stderr


def test_discovery_reports_every_broken_plugin(broken_plugins):
    with pytest.warns(UserWarning):
        errors = registry.discover_plugins(force=True)
    assert {"task_arithmetic", "no_ctx_probe", "exiting_probe"} <= set(errors)
    assert registry.get_method("task_arithmetic").source == "built-in"
    assert "no_ctx_probe" not in registry.list_methods()


# ------------------------------------------------------------------ values checked when the arguments are parsed
@pytest.mark.parametrize("argv, named", [
    (["run", "task_arithmetic", "--suite", "micro", "--data-fraction", "-1"], "'-1'"),
    (["run", "task_arithmetic", "--suite", "micro", "--data-fraction", "0"], "'0'"),
    (["run", "task_arithmetic", "--suite", "micro", "--data-fraction", "nan"], "'nan'"),
    (["run", "task_arithmetic", "--suite", "micro", "--unlabeled-split", "nope"], "'nope'"),
    (["sweep", "task_arithmetic", "--suite", "micro", "--seeds", "0,x"], "'x'"),
])
def test_bad_values_are_argument_errors(argv, named, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEBENCH_RESULTS", str(tmp_path))  # had a value passed, nothing is written in the repo
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err and err.strip().splitlines()[-1].startswith("mergebench ")


def _no_suite(monkeypatch):
    from mergebench.cli import options

    def fail(args):
        raise AssertionError("the suite was loaded before the method specs were checked")

    monkeypatch.setattr(options, "load_suite", fail)


@pytest.mark.parametrize("spec, says", [
    ("task_arithmetc", "did you mean: task_arithmetic"),
    ("ties_merging(k=10, k=20)", "sets k more than once"),
    ("task_arithmetic(scalng=0.3)", "did you mean: scaling"),
])
def test_method_specs_are_checked_before_the_suite_loads(spec, says, monkeypatch, capsys):
    _no_suite(monkeypatch)
    assert main(["run", spec, "--suite", "micro", "-q"]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1


def test_tune_values_are_checked_before_the_suite_loads(monkeypatch, capsys):
    _no_suite(monkeypatch)
    assert main(["run", "task_arithmetic", "--tune", "scalng=0.1,0.2", "--suite", "micro", "-q"]) == 2
    assert "did you mean: scaling" in capsys.readouterr().err


def test_help_and_version_do_not_import_torch():
    code = textwrap.dedent("""
        import sys
        from mergebench.cli import main
        for argv in (["--help"], ["--version"]):
            try:
                main(argv)
            except SystemExit as e:
                assert e.code == 0, e.code
        assert "torch" not in sys.modules, "torch was imported"
        print("no torch")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    from mergebench import __version__
    assert f"mergebench {__version__}" in out.stdout and "no torch" in out.stdout
    assert "sweep" in out.stdout and "leaderboard" in out.stdout  # the help lists the commands


# ------------------------------------------------------------------ bad files: one line naming the file
def test_a_manifest_that_is_a_yaml_list_is_one_line(tmp_path, capsys):
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump([{"model": "ViT-B-32"}, {"backbone": "b.pt"}]))
    assert main(["run", "task_arithmetic", "--suite", "real", "--manifest", str(manifest), "--data-root",
                 str(tmp_path), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(manifest) in err and "not a mapping" in err


def test_dangling_symlinks_in_a_hugging_face_cache_name_the_file(tmp_path, capsys):
    snap = tmp_path / "hub" / "datasets--ylecun--mnist" / "snapshots" / "abc" / "mnist"
    snap.mkdir(parents=True)
    (tmp_path / "hub" / "datasets--ylecun--mnist" / "blobs").mkdir()
    link = snap / "test-00000-of-00001.parquet"
    link.symlink_to(Path("../../../blobs/0123456789abcdef"))
    assert main(["data", "check", "--root", str(tmp_path / "hub"), "--tasks", "MNIST"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(link) in err and "download ylecun/mnist again" in err


def test_a_full_filesystem_is_one_line_naming_the_file(tmp_path, monkeypatch):
    from mergebench.errors import DiskFullError
    from mergebench.engine.io import atomic_write_text

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(DiskFullError, match=r"no space left on the device writing .*record\.json.*MERGEBENCH_CACHE"):
        atomic_write_text(tmp_path / "record.json", "{}")
    assert not list(tmp_path.iterdir())  # the temporary file is gone


def test_data_check_with_a_wrong_root_says_where_it_looked(tmp_path, capsys):
    assert main(["data", "check", "--root", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Hugging Face cache" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["data", "check", "--root", str(empty), "--tasks", "EuroSAT,MNIST"]) == 1
    out = capsys.readouterr().out
    assert f"nothing found under {empty}" in out and str(empty / "huggingface" / "hub") in out
    assert "Hugging Face copies are accepted" in out and "datasets--tanganke--eurosat" in out


def test_zoo_init_on_a_missing_folder_says_so(tmp_path, capsys):
    assert main(["zoo", "init", str(tmp_path / "nope")]) == 2
    assert f"{tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    assert main(["zoo", "init", "--hf-cache", str(tmp_path / "nope")]) == 2
    assert f"{tmp_path / 'nope'} does not exist" in capsys.readouterr().err


def test_counting_flops_does_not_warn_about_torch_jit_script():
    code = textwrap.dedent("""
        import warnings
        import torch
        from mergebench.engine.metrics import count_macs
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            macs = count_macs(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 2)), (3, 4, 4))["macs"]
        assert macs == 96, macs
        print([str(w.message) for w in caught if "jit" in str(w.message)])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------ sweeps and workers
def test_a_sweep_name_in_use_is_refused(tmp_path):
    from mergebench.sweeps.sweep import Sweep, SweepNameError

    first = Sweep(methods=["task_arithmetic"], suites=["micro"], name="mine", results_dir=str(tmp_path))
    path = first.save()
    saved = path.read_text()
    first.save()  # the same sweep again: fine
    other = Sweep(methods=["ties_merging"], suites=["micro"], name="mine", results_dir=str(tmp_path))
    with pytest.raises(SweepNameError, match=r"'mine' is in use by .*mine\.yaml.*methods: saved"):
        other.save()
    assert path.read_text() == saved
    assert Sweep.load("mine", tmp_path).methods == ["task_arithmetic"]


def test_jobs_are_bounded_by_the_work_and_the_memory(micro, results_dir, monkeypatch, capsys):
    from mergebench.engine import memory
    from mergebench.engine import run as runner
    from mergebench.engine.run import bounded_workers, run_many

    started = []
    real_pool = runner.ProcessPoolExecutor

    def pool(max_workers=None, **kwargs):
        started.append(max_workers)
        return real_pool(max_workers, **kwargs)

    monkeypatch.setattr(runner, "ProcessPoolExecutor", pool)
    records = run_many(["weight_averaging", "task_arithmetic"], micro, jobs=1000, results_dir=results_dir,
                       device="cpu", show_progress=False, count_flops=False)
    assert [r["status"] for r in records] == ["ok", "ok"]
    assert started == [2]
    assert "--jobs 1000: running 2 workers" in capsys.readouterr().err
    monkeypatch.setattr(memory, "available_bytes", lambda: 3 * 2**30)
    monkeypatch.setattr(memory, "rss_bytes", lambda: 2**20)
    assert bounded_workers(1000, 100, [{"timing": {"peak_rss_mb": 1024}}]) == 3  # 3 GiB free, 1 GiB each


# ------------------------------------------------------------------ progress: on a terminal, and only there
def _run_on_pty(argv: list[str], env: dict) -> str:
    """Run ``mergebench argv`` with its standard output and error on a pseudo-terminal; everything it wrote."""
    main_fd, child_fd = pty.openpty()
    fcntl.ioctl(child_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal's size: 120 columns
    proc = subprocess.Popen([sys.executable, "-m", "mergebench.cli", *argv], stdin=child_fd, stdout=child_fd,
                            stderr=child_fd, env=env, close_fds=True)
    os.close(child_fd)
    chunks = []
    while True:
        ready, _, _ = select.select([main_fd], [], [], 300)
        if not ready:
            proc.kill()
            break
        try:
            data = os.read(main_fd, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=60)
    os.close(main_fd)
    assert proc.returncode == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode(errors="replace")


def test_progress_shows_on_a_terminal_and_is_quiet_with_q(micro, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MERGEBENCH_QUIET"}
    run = ["run", "task_arithmetic", "--suite", "micro", "--device", "cpu"]
    shown = _run_on_pty(run + ["--results", str(tmp_path / "a")], env)
    assert "evaluate (test)" in shown and "img/s" in shown, shown
    quiet = _run_on_pty(run + ["--results", str(tmp_path / "c"), "-q"], env)
    assert "evaluate (test)" not in quiet and "ok " in quiet
    assert json.loads(next((tmp_path / "c" / "micro").glob("*.json")).read_text())["status"] == "ok"


def test_progress_is_quiet_off_a_terminal(micro, tmp_path, monkeypatch, capsys):
    from mergebench.engine.progress import progress

    monkeypatch.delenv("MERGEBENCH_QUIET")
    assert not sys.stderr.isatty() and progress(total=3).disable
    assert main(["run", "task_arithmetic", "--suite", "micro", "--device", "cpu", "--results", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert "ok " in out.out and "evaluate (test)" not in out.err + out.out
