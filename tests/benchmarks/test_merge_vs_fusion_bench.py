"""mergebench's data-free merges against fusion_bench's own implementations, timed side by side in one process.

Run on demand (skipped by ``make test``: ``--benchmark-skip``; needs the optional ``fusion-bench`` extra,
``pip install -e ".[fusion-bench]"``)::

    pytest tests/benchmarks/test_merge_vs_fusion_bench.py --benchmark-only -p no:cacheprovider

Per method, on ViT-B/32-shaped random experts (open_clip's ViT-B/32 image tower, 8 experts theta_0 + N(0, sigma^2)
noise: the ``synthetic-tiny`` suite with that encoder at ``DEPTH[method]`` residual blocks), the two sides run
interleaved (mergebench, fusion_bench, mergebench, ...; ``ROUNDS`` each, or ``ROUNDS_OF[method]``) with ``THREADS``
torch threads. Each side gets what it gets in its own pipeline: mergebench a ``MergeContext`` over the loaded
experts; fusion_bench a ``BaseModelPool`` of ``nn.Module`` s whose parameters are those same tensors (a fresh
pretrained module per run, and a fresh first expert for Simple Average, which it overwrites in place). Both return
a merged encoder.

Recorded in ``docs/benchmarks/merge_vs_fusion_bench.json`` (``OUT`` overrides), per method: the median seconds of
each side and their ratio (mergebench / fusion_bench), each side's peak resident memory above what the experts
already take (the lower of the rounds: what a merge holds shows in every round, the allocator's timing in one), as
bytes and as a multiple of the experts' own bytes, the largest relative difference of the merged weights (over the
tensors: max |ours - theirs| / max |theirs|), depth, threads, CPU and the load average. For Task Arithmetic and
Weight Averaging also the memory-bandwidth floor: summing the eight experts' tensors of the same sizes with torch in
the same process (``floor_s``, timed in the same interleaving), and each side as a multiple of it. DARE's masks are
independent draws on the two sides, so its weights agree only in distribution: its difference is reported, not
asserted.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

from mergebench.engine import memory
from mergebench.api.context import MergeContext
from mergebench.methods.baselines import cache_sized_parts
from mergebench.api.models import build_encoder
from mergebench.api.pipeline import MethodCall
from mergebench.engine.execution import execute, seed_everything
from mergebench.engine.runspec import RunSpec

# imported only by the test itself: importing fusion_bench (lightning, transformers) changes global state
pytestmark = pytest.mark.skipif(importlib.util.find_spec("fusion_bench") is None,
                                reason="the optional fusion-bench extra is not installed")

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(os.environ.get("MERGEBENCH_FB_OUT", ROOT / "docs" / "benchmarks" / "merge_vs_fusion_bench.json"))
THREADS = int(os.environ.get("MERGEBENCH_FB_THREADS", "2"))
ROUNDS = int(os.environ.get("MERGEBENCH_FB_ROUNDS", "3"))
WUDI_STEPS = 5   # the paper's 300 Adam steps per matrix take many minutes per side on a CPU; the same on both sides
WUDI = f"wudi_merging(steps={WUDI_STEPS}, others='mean')"   # fusion_bench's variant: every 2-D tensor optimized
MAX_DEPTH = int(os.environ.get("MERGEBENCH_FB_MAX_DEPTH", "12"))   # a quick trial run: fewer blocks
# Residual blocks per method: 12 (all of ViT-B/32) for the merges that take seconds. fusion_bench's TIES flattens
# every task vector (and copies them: about 7x the experts' bytes, 20 GB at 12 blocks) and WUDI holds every task
# vector at once; those, DARE and the SVD-based merges take minutes per block and side on two cores shared with other
# work, so they run at the depth given here (stated in the results).
DEPTH = {"weight_averaging": 12, "task_arithmetic": 12, "dare": 4, "ties_merging": 1,
         WUDI: 1, "tsv_merging": 1, "iso_c": 1, "iso_cts": 1}
# Rounds per side: fewer where one round takes minutes on two shared cores.
ROUNDS_OF = {WUDI: 1, "tsv_merging": 1, "iso_c": 1, "iso_cts": 1}
SVD_BASED = {"tsv_merging", "iso_c", "iso_cts"}
VIT_B32 = dict(image_size=224, patch_size=32, width=768, heads=12, mlp_ratio=4.0, output_dim=512, act="quick_gelu")
RESULTS: dict[str, dict] = {}


def _fb_algorithm(spec: str):
    """fusion_bench's algorithm for ``spec`` with mergebench's defaults (the same as fusion_bench's configs)."""
    import lightning
    from fusion_bench.method import (DareTaskArithmetic, ISO_C_Merge, ISO_CTS_Merge, SimpleAverageAlgorithm,
                                     TaskArithmeticAlgorithm, TaskSingularVectorMerging, TiesMergingAlgorithm,
                                     WUDIMerging)

    algorithm = {
        "weight_averaging": lambda: SimpleAverageAlgorithm(inplace=True),
        "task_arithmetic": lambda: TaskArithmeticAlgorithm(scaling_factor=0.3),
        "ties_merging": lambda: TiesMergingAlgorithm(scaling_factor=0.3, threshold=20, remove_keys=[],
                                                     merge_func="sum"),
        "dare": lambda: DareTaskArithmetic(scaling_factor=0.3, sparsity_ratio=0.5, only_on_linear_weights=False,
                                           rescale=True),
        "tsv_merging": lambda: TaskSingularVectorMerging(alpha=1.0, exclude_keys=[]),
        "iso_c": lambda: ISO_C_Merge(scaling_factor=1.5),
        "iso_cts": lambda: ISO_CTS_Merge(scaling_factor=1.5, common_space_fraction=0.8),
        WUDI: lambda: WUDIMerging(iter_num=WUDI_STEPS, exclude_keys=[]),
    }[spec]()
    if hasattr(type(algorithm), "fabric"):   # a CPU Fabric set here, so that none sets up loggers or directories
        algorithm.fabric = lightning.Fabric(accelerator="cpu", devices=1)
    return algorithm


@pytest.fixture(scope="module", autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


_SUITES: dict[int, object] = {}


def _suite(depth: int):
    """The experts at ``depth`` blocks, loaded (one depth held at a time)."""
    if depth not in _SUITES:
        _SUITES.clear()
        from mergebench.suites import get_suite

        suite = get_suite("synthetic-tiny", fraction=1e-4, verbose=False, encoder=dict(VIT_B32, layers=depth))
        for task in suite.tasks:
            suite.expert_weights(task)
        _SUITES[depth] = suite
    return _SUITES[depth]


def _module(suite, weights, clone: bool = False) -> torch.nn.Module:
    """An open_clip encoder whose parameters are ``weights`` themselves (``clone``: copies of them)."""
    with torch.device("meta"):
        encoder = build_encoder(suite.encoder_config)
    state = {**suite.pretrained, **weights}
    encoder.load_state_dict({k: v.clone() if clone else v for k, v in state.items()}, assign=True)
    return encoder.eval()


def _fb_pool(suite, spec: str):
    from fusion_bench import BaseModelPool

    models = {"_pretrained_": _module(suite, suite.pretrained, clone=True)}   # the merge is written into it
    for i, task in enumerate(suite.tasks):
        models[task] = _module(suite, suite.expert_weights(task), clone=spec == "weight_averaging" and i == 0)
    return BaseModelPool(models)


def _trim():
    if sys.platform.startswith("linux"):   # freed heap pages would otherwise absorb a merge's allocations unseen
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _measured(fn):
    """(result, seconds, peak resident bytes above the start)."""
    _trim()
    start = memory.rss_bytes() or 0
    memory.reset_peak("cpu")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
    return out, seconds, memory.peak_rss_bytes() - start


def _ours(suite, spec: str):
    call = MethodCall.parse(spec).resolve()
    ctx = MergeContext(suite, RunSpec.build(call, suite, device="cpu"), show_progress=False)
    seed_everything(0)
    return execute(call, ctx).encoder


def _floor(suite, parts: bool):
    """The eight experts' tensors summed per key: the reads and the write a merge of the eight cannot avoid. Whole
    tensors, or (``parts``) in the cache-sized parts of ``baselines.cache_sized_parts``; the floor is the faster."""
    experts = [suite.expert_weights(t) for t in suite.tasks]
    out = {}
    for key in experts[0]:
        tensors = [e[key] for e in experts]
        acc = torch.empty_like(tensors[0])
        for part, first, second, *rest in (cache_sized_parts(acc, *tensors) if parts else [[acc, *tensors]]):
            torch.add(first, second, out=part)
            for t in rest:
                part.add_(t)
        out[key] = acc
    return out


def _max_relative_difference(ours: torch.nn.Module, theirs: torch.nn.Module) -> float:
    mine = ours.state_dict()
    worst = 0.0
    for key, v in theirs.state_dict().items():
        if v.is_floating_point():
            scale = v.abs().max().item() or 1.0
            worst = max(worst, (mine[key].float() - v.float()).abs().max().item() / scale)
    return worst


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _write():
    meta = {"fusion_bench": _dist_version("fusion-bench"),
            "torch": torch.__version__, "cpu": _cpu_name(), "logical_cpus": os.cpu_count(), "threads": THREADS,
            "experts": "open_clip ViT-B/32 image tower, random weights, 8 experts "
                                        "theta_0 + N(0, (0.01 rms(theta_0))^2) per tensor (synthetic-tiny)",
            "time": "median wall seconds of the rounds, the two sides interleaved",
            "memory": "lower peak resident bytes of the rounds above the loaded experts; x: over the experts' bytes",
            "weights": "max over tensors of max |mergebench - fusion_bench| / max |fusion_bench|"}
    methods = {}
    if OUT.exists():   # a run of some of the methods (-k) replaces their entries and keeps the others'
        try:
            methods = json.loads(OUT.read_text())["methods"]
        except (ValueError, KeyError) as e:
            raise RuntimeError(f"{OUT} is not a comparison written by this benchmark ({e}); move it away") from e
    methods.update(RESULTS)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"meta": meta, "methods": methods}, indent=1) + "\n")


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


@pytest.mark.parametrize("spec", list(DEPTH))
def test_merge_vs_fusion_bench(benchmark, spec):
    depth = min(DEPTH[spec], MAX_DEPTH)
    suite = _suite(depth)
    expert_bytes = sum(v.numel() * v.element_size() for t in suite.tasks for v in suite.expert_weights(t).values())
    with_floor = spec in ("task_arithmetic", "weight_averaging")
    times = {"mergebench": [], "fusion_bench": [], "floor": [], "floor_whole_tensors": [],
             "floor_cache_sized_parts": []}
    peaks = {"mergebench": [], "fusion_bench": []}
    load = [os.getloadavg()[0]]
    outputs = {}

    rounds = ROUNDS_OF.get(spec, ROUNDS)

    def compare():
        for _ in range(rounds):
            outputs["mergebench"], s, peak = _measured(lambda: _ours(suite, spec))
            times["mergebench"].append(s)
            peaks["mergebench"].append(peak)
            algorithm, pool = _fb_algorithm(spec), _fb_pool(suite, spec)
            outputs["fusion_bench"], s, peak = _measured(lambda: algorithm.run(pool))
            times["fusion_bench"].append(s)
            peaks["fusion_bench"].append(peak)
            del algorithm, pool
            if with_floor:
                whole, parts = (_measured(lambda: _floor(suite, p))[1] for p in (False, True))
                times["floor"].append(min(whole, parts))
                times["floor_whole_tensors"].append(whole)
                times["floor_cache_sized_parts"].append(parts)

    benchmark.pedantic(compare, rounds=1, iterations=1, warmup_rounds=0)
    load.append(os.getloadavg()[0])
    ours_s, theirs_s = statistics.median(times["mergebench"]), statistics.median(times["fusion_bench"])
    entry = {
        "depth_blocks": depth, "threads": THREADS, "rounds": rounds, "experts_bytes": expert_bytes,
        "mergebench_s": round(ours_s, 3), "fusion_bench_s": round(theirs_s, 3), "ratio": round(ours_s / theirs_s, 3),
        "seconds_per_round": {k: [round(s, 3) for s in v] for k, v in times.items() if v},
        "mergebench_peak_bytes": min(peaks["mergebench"]), "fusion_bench_peak_bytes": min(peaks["fusion_bench"]),
        "mergebench_peak_x_experts": round(min(peaks["mergebench"]) / expert_bytes, 3),
        "fusion_bench_peak_x_experts": round(min(peaks["fusion_bench"]) / expert_bytes, 3),
        "max_relative_weight_difference": _max_relative_difference(outputs["mergebench"], outputs["fusion_bench"]),
        "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "svd_based": spec in SVD_BASED, "load_average_1min": [round(x, 2) for x in load], "cpu": _cpu_name(),
    }
    if with_floor:
        floor = statistics.median(times["floor"])
        entry.update({"floor_s": round(floor, 3), "mergebench_x_floor": round(ours_s / floor, 2),
                      "fusion_bench_x_floor": round(theirs_s / floor, 2)})
    RESULTS[spec] = entry
    benchmark.extra_info.update(entry)
    _write()
    if spec != "dare":   # DARE's masks are independent draws on the two sides
        assert entry["max_relative_weight_difference"] < 1e-4, entry
