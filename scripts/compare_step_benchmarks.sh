#!/usr/bin/env bash
# Compare the adaptation-loop benchmarks (tests/benchmarks/test_bench_steps.py) of two versions of the code on
# this machine, interleaved method by method so that both see the same load: one thread, CPU time.
#   scripts/compare_step_benchmarks.sh OLD_COMMIT [OUT_DIR]
# Writes OUT_DIR/{old,new}-<method>.json (pytest-benchmark JSON) and prints per method: the cost of a step, the
# setup and the projected time of the official schedule, old vs new.
set -euo pipefail
cd "$(dirname "$0")/.."
old_commit=$1
out=${2:-.benchmarks/steps-$(git rev-parse --short HEAD)-vs-$(git rev-parse --short "$old_commit")}
mkdir -p "$out"
out=$(realpath "$out")
root=$PWD
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
git archive "$old_commit" | tar -x -C "$tree"
ln -s "$tree/methods" "$tree/bench/methods"          # import the old tree as the package `mergebench`
mkdir -p "$tree/_import" && ln -s "$tree/bench" "$tree/_import/mergebench"
cp tests/benchmarks/test_bench_steps.py "$tree/tests/benchmarks/"
py=${PYTHON:-$PWD/.venv/bin/python}
for name in $($py -c "import sys; sys.path.insert(0, 'tests/benchmarks'); import test_bench_steps as b; print(' '.join(b.SPECS))"); do
  for side in old new; do
    if [ $side = old ]; then dir=$tree; path=$tree/_import; else dir=$root; path=; fi
    (cd "$dir" && OMP_NUM_THREADS=1 PYTHONPATH=$path "$py" -m pytest -q -p no:cacheprovider \
       tests/benchmarks/test_bench_steps.py -k "[$name]" --benchmark-only --benchmark-timer=time.process_time \
       --benchmark-json="$out/$side-$name.json" >/dev/null)
  done
done
$py - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print(f"{'method':28s} {'s/step old':>10s} {'new':>8s} {'x':>6s} {'setup old':>9s} {'new':>7s} {'paper old':>9s} {'new':>8s} {'x':>6s}")
for new in sorted(out.glob("new-*.json")):
    old = out / new.name.replace("new-", "old-")
    a, b = (json.loads(p.read_text())["benchmarks"][0]["extra_info"] for p in (old, new))
    name = new.stem[4:]
    ratio = lambda x, y: f"{x / y:6.2f}" if y > 0 else "   inf"  # noqa: E731 - a step below the timer's noise
    print(f"{name:28s} {a['seconds_per_step']:10.3f} {b['seconds_per_step']:8.3f} "
          f"{ratio(a['seconds_per_step'], b['seconds_per_step'])} {a['setup_s']:9.1f} {b['setup_s']:7.1f} "
          f"{a['projected_paper_s']:9.0f} {b['projected_paper_s']:8.0f} "
          f"{ratio(a['projected_paper_s'], b['projected_paper_s'])}")
PY
