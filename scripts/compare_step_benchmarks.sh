#!/usr/bin/env bash
# Compare the adaptation-loop benchmarks (tests/benchmarks/test_bench_steps.py) of two versions of the code on
# this machine: one thread, CPU time, old and new alternating method by method and round by round, so that both
# see the same load and a slow spell of the machine falls on both.
#   scripts/compare_step_benchmarks.sh OLD_COMMIT [OUT_DIR]
#   ROUNDS=5 METHODS="adamerging_layerwise adarank" scripts/compare_step_benchmarks.sh OLD_COMMIT
# Writes OUT_DIR/{old,new}-<method>-r<round>.json (pytest-benchmark JSON) and prints per method the medians over
# the rounds: the cost of a step, the setup and the projected time of the official schedule, old vs new, and the
# range of the per-round step ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
old_commit=$1
rounds=${ROUNDS:-3}
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
methods=${METHODS:-$($py -c "import sys; sys.path.insert(0, 'tests/benchmarks'); import test_bench_steps as b; print(' '.join(b.SPECS))")}
for round in $(seq 1 "$rounds"); do
  for name in $methods; do
    # the side that runs first alternates from round to round
    if [ $((round % 2)) = 1 ]; then sides="old new"; else sides="new old"; fi
    for side in $sides; do
      if [ $side = old ]; then dir=$tree; path=$tree/_import; else dir=$root; path=; fi
      (cd "$dir" && OMP_NUM_THREADS=1 PYTHONPATH=$path "$py" -m pytest -q -p no:cacheprovider \
         tests/benchmarks/test_bench_steps.py -k "[$name]" --benchmark-only --benchmark-timer=time.process_time \
         --benchmark-json="$out/$side-$name-r$round.json" >/dev/null)
    done
  done
done
$py - "$out" <<'PY'
import json, pathlib, statistics, sys
out = pathlib.Path(sys.argv[1])
runs: dict[tuple[str, str], list[dict]] = {}
for path in sorted(out.glob("*-r*.json")):
    side, rest = path.stem.split("-", 1)
    name = rest.rsplit("-r", 1)[0]
    runs.setdefault((side, name), []).append(json.loads(path.read_text())["benchmarks"][0]["extra_info"])
med = lambda infos, key: statistics.median(i[key] for i in infos)  # noqa: E731
ratio = lambda x, y: f"{x / y:6.2f}" if y > 0 else "   inf"  # noqa: E731 - a step below the timer's noise
print(f"{'method':28s} {'rounds':>6s} {'s/step old':>10s} {'new':>8s} {'x':>6s} {'x range':>11s} "
      f"{'setup old':>9s} {'new':>7s} {'paper old':>9s} {'new':>8s} {'x':>6s}")
for name in sorted({n for _, n in runs}):
    old, new = runs.get(("old", name), []), runs.get(("new", name), [])
    if not old or not new:
        continue
    per_round = [a["seconds_per_step"] / b["seconds_per_step"] for a, b in zip(old, new) if b["seconds_per_step"] > 0]
    spread = f"{min(per_round):.2f}-{max(per_round):.2f}" if per_round else "-"
    a, b = med(old, "seconds_per_step"), med(new, "seconds_per_step")
    pa, pb = med(old, "projected_paper_s"), med(new, "projected_paper_s")
    print(f"{name:28s} {min(len(old), len(new)):6d} {a:10.3f} {b:8.3f} {ratio(a, b)} {spread:>11s} "
          f"{med(old, 'setup_s'):9.1f} {med(new, 'setup_s'):7.1f} {pa:9.0f} {pb:8.0f} {ratio(pa, pb)}")
PY
