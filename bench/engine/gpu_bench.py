"""``make bench-gpu``: what the real benchmark costs on this machine, measured on a shape-exact synthetic suite.

    python -m mergebench.engine.gpu_bench [--out results/bench/gpu.json] [--suite synthetic-vitb32] [--fraction F]
                                   [--batch-size N] [--compile auto|off|default|reduce-overhead] [--methods A B ...]

On a CUDA device (full mode): the eight ViT-B/32 test sets at their real sizes (87,433 random uint8 images,
about 13 GB, generated on the device and kept there), evaluated by the harness's ``evaluate`` with bf16
autocast (attention through PyTorch's fused scaled_dot_product_attention) and large batches, eagerly and through
``torch.compile``; then the merge time and peak memory of the shared data-free methods, on the device. Without
one (reduced mode) the same steps run on the CPU at a small fraction of the test sets, and the JSON says so:
those are not GPU figures. The run keeps to ``--time-budget`` seconds (default 480): a step that would start
after it is recorded as skipped.

The JSON holds images/s, seconds and peak memory of each evaluation, merge seconds and peak memory per method,
the device, the suite (its ``synthetic`` info) and the versions.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from mergebench.api.context import MergeContext
from mergebench.engine import memory
from mergebench.engine.evaluate import evaluate
from mergebench.engine.execution import execute, seed_everything
from mergebench.engine.runspec import RunSpec, resolve_device
from mergebench.suites import get_suite

GPU_METHODS = ["task_arithmetic", "weight_averaging", "ties_merging", "tsv_merging", "iso_c", "wudi_merging"]
CPU_METHODS = ["task_arithmetic", "weight_averaging", "ties_merging"]
CPU_FRACTION = 0.002   # reduced mode: 0.2 % of the test sets (175 images for the eight ViT-B/32 tasks)


def _log(msg: str):
    print(msg, flush=True)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def measure_eval(model, suite, device, batch_size: int, compile_mode: str | None) -> dict:
    """One warm-up pass on the smallest task (compiles the graph), then the timed pass over every test set."""
    kwargs = dict(batch_size=batch_size, bf16=True, resident=True, compile=compile_mode or False)
    smallest = min(suite.tasks, key=lambda t: len(suite.split("test", t)))
    start = time.perf_counter()
    evaluate(model, suite, "test", device, tasks=[smallest], **kwargs)
    warmup_s = time.perf_counter() - start
    memory.reset_peak(device)
    result = evaluate(model, suite, "test", device, **kwargs)
    out = {"images": result["images"], "seconds": round(result["seconds"], 3),
           "images_per_s": round(result["images_per_s"], 1), "warmup_s": round(warmup_s, 2),
           "batch_size": batch_size, "bf16_autocast": True, "compile": compile_mode or "off",
           "peak_host_rss_mb": round(memory.peak_rss_bytes() / 2**20, 1)}
    if device.type == "cuda":
        out["peak_gpu_mb"] = round(memory.peak_cuda_bytes(device) / 2**20, 1)
    return out


def measure_merge(suite, spec: str, device) -> dict:
    """Merge once with ``spec`` (harness path: MergeContext + execute) on ``device``; seconds and peak memory."""
    run = RunSpec.build(spec, suite, device=device)
    seed_everything(0)
    ctx = MergeContext(suite, run, show_progress=False)
    memory.reset_peak(device)
    start = time.perf_counter()
    model = execute(run.call, ctx)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    out = {"merge_s": round(time.perf_counter() - start, 3),
           "peak_host_rss_mb": round(memory.peak_rss_bytes() / 2**20, 1)}
    if device.type == "cuda":
        out["peak_gpu_mb"] = round(memory.peak_cuda_bytes(device) / 2**20, 1)
    return out, model


def run(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m mergebench.engine.gpu_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results/bench/gpu.json", help="where the JSON goes")
    p.add_argument("--suite", default="synthetic-vitb32", help="synthetic-vitb32 (default), -vitb16, -vitl14, -tiny")
    p.add_argument("--fraction", type=float, default=None,
                   help=f"share of the real test-set sizes (default: 1 on a GPU, {CPU_FRACTION} on the CPU)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cuda, cuda:1, cpu")
    p.add_argument("--batch-size", type=int, default=None, help="evaluation batch (default 2048 on a GPU, 64 on CPU)")
    p.add_argument("--compile", default="auto", choices=["auto", "off", "default", "reduce-overhead"],
                   help="also evaluate through torch.compile (auto: on a GPU, mode default)")
    p.add_argument("--methods", nargs="*", default=None, help="merge specs to time (default: the shared "
                                                             "data-free methods on a GPU, three on the CPU)")
    p.add_argument("--time-budget", type=float, default=480.0, help="seconds; later steps are skipped")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    device = resolve_device(args.device)
    full = device.type == "cuda"
    fraction = args.fraction if args.fraction is not None else (1.0 if full else CPU_FRACTION)
    batch = args.batch_size or (2048 if full else 64)
    methods = args.methods if args.methods is not None else (GPU_METHODS if full else CPU_METHODS)
    compile_modes = [None] + ({"auto": ["default"] if full else [], "off": []}.get(args.compile, [args.compile]))
    mode = "full (GPU)" if full else "reduced (no CUDA device: CPU, small fraction; these are not GPU figures)"
    _log(f"mergebench gpu_bench: {mode}; {args.suite} at fraction {fraction:g} on {_device_name(device)}")

    suite = get_suite(args.suite, fraction=fraction, device=device, verbose=False)
    report = {"mode": "full" if full else "reduced", "note": mode, "device": _device_name(device),
              "suite": {k: suite.info[k] for k in ("suite", "synthetic", "backbone", "fraction", "test_images")},
              "torch": torch.__version__, "python": sys.version.split()[0], "threads": torch.get_num_threads(),
              "eval": {}, "merge": {}, "skipped": []}
    prep = time.perf_counter()
    test_images = sum(len(suite.split("test", t)) for t in suite.tasks)   # generated now, on the device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    report["data"] = {"test_images": test_images, "generated_s": round(time.perf_counter() - prep, 2),
                      "resident_on": str(device)}
    _log(f"  {test_images:,} test images ready on {device} in {report['data']['generated_s']} s")

    def in_budget(step: str) -> bool:
        if time.perf_counter() - t0 > args.time_budget:
            report["skipped"].append(step)
            _log(f"  skipped {step}: past the time budget of {args.time_budget:g} s")
            return False
        return True

    model = None
    for spec in methods:
        if not in_budget(f"merge {spec}"):
            continue
        try:
            report["merge"][spec], merged = measure_merge(suite, spec, device)
            model = merged if model is None else model   # the first merge's model is the one evaluated
            _log(f"  merge {spec}: {report['merge'][spec]}")
        except Exception as e:  # a method's failure is a result, the rest go on
            report["merge"][spec] = {"error": f"{type(e).__name__}: {e}"}
            _log(f"  merge {spec} failed: {e}")
    if model is None:   # the pretrained model, as a run's context builds it
        ctx = MergeContext(suite, RunSpec.build("weight_averaging", suite, device=device), show_progress=False)
        model = ctx.shared_model(ctx.pretrained_weights)
    for cm in compile_modes:
        name = "eager" if cm is None else f"compile-{cm}"
        if not in_budget(f"eval {name}"):
            continue
        try:
            report["eval"][name] = measure_eval(model, suite, device, batch, cm)
            _log(f"  eval {name}: {report['eval'][name]}")
        except Exception as e:  # e.g. no compiler toolchain for torch.compile
            report["eval"][name] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
            _log(f"  eval {name} failed: {e}")
    best = max((v["images_per_s"] for v in report["eval"].values() if "images_per_s" in v), default=None)
    if best:
        report["full_eval_projected_s"] = round(87433 / best, 2)
    report["total_s"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    _log(f"wrote {out} ({report['total_s']} s)")
    return report


def main(argv: list[str] | None = None) -> int:
    report = run(argv)
    failed = [k for k, v in {**report["eval"], **report["merge"]}.items() if "error" in v]
    return 1 if failed or not report["eval"] else 0


if __name__ == "__main__":
    sys.exit(main())
