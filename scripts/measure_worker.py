"""The cost of running a method in its own worker process (docs/reliability.md): start-up seconds and memory.

    python scripts/measure_worker.py micro mini8

For each suite: the one-time cost per harness process (the fork server's start, which imports torch and the
methods; writing the inputs a worker maps), then per method the worker's start-up (from the request to the
method's first line) and its resident memory before the method runs (its own pages, and the proportional set
size that counts pages shared with the fork server by share), over ``--repeats`` workers of a method that returns
theta_0 at once.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from mergebench import Paper, register_method

from mergebench.engine import worker
from mergebench.api.pipeline import MethodCall
from mergebench.engine.run import merge_in_worker
from mergebench.suites import get_suite


def _memory_kib(field: str) -> int:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


@register_method("worker_cost_probe", display_name="Worker cost probe", paper=Paper("none", 2025, "0000.00000"),
                 needs="unlabeled")
def worker_cost_probe(ctx, started: float = 0.0):
    """theta_0, after noting when the method started and the worker's memory then."""
    ctx.log("start_s", time.time() - started)
    ctx.log("rss_mb", _memory_kib("Rss") / 1024)
    ctx.log("pss_mb", _memory_kib("Pss") / 1024)
    return ctx.shared_model(ctx.pretrained_weights)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("suites", nargs="+")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    os.environ.setdefault("MERGEBENCH_QUIET", "1")
    for name in args.suites:
        suite = get_suite(name, verbose=False)
        for level in ("nothing", "unlabeled", "labeled"):
            start = time.perf_counter()
            worker.method_inputs(suite, level)
            print(f"{name}: writing the inputs of level {level!r}: {time.perf_counter() - start:.2f} s")
        starts, rss, pss, total = [], [], [], []
        for i in range(args.repeats + 1):
            call = MethodCall("worker_cost_probe", {"started": time.time()}).resolve()
            begin = time.perf_counter()
            _, out = merge_in_worker(call, suite, "cpu")
            (starts if i else []).append(out["logs"]["start_s"][0])
            if i == 0:
                print(f"{name}: first worker (fork server start included): {out['logs']['start_s'][0]:.2f} s")
                continue
            total.append(time.perf_counter() - begin)
            rss.append(out["logs"]["rss_mb"][0])
            pss.append(out["logs"]["pss_mb"][0])
        print(f"{name}: per worker over {args.repeats}: start-up median {statistics.median(starts):.3f} s "
              f"(max {max(starts):.3f}); whole merge call median {statistics.median(total):.3f} s; resident "
              f"{statistics.median(rss):.0f} MB, proportional {statistics.median(pss):.0f} MB")


if __name__ == "__main__":
    main()
