"""Build a mini8 configuration and print its headline numbers (docs/mini8.md's table of builds).

    python scripts/mini8_probe.py NAME '{"finetune_lr": 5e-5, ...}' [--methods tsv_merging iso_cts ...]
    python scripts/mini8_probe.py NAME '{}' --lora '{"epochs": 10}'     # LoRA experts (mini8-lora) on that build

Builds the configuration (``--base``, default mini8, plus the JSON overrides) into $MERGEBENCH_CACHE, then runs
through the harness (records not written) the pretrained model, the experts, Weight Averaging, Task Arithmetic and
any further ``--methods`` (with ``--lora``: on LoRA experts trained on that build, mini8-lora's settings plus
the ``--lora`` overrides), and reports each one's per-task test accuracy, with the per-task AUROC of prediction
entropy on the Task Arithmetic model. Writes NAME.json to --out (default $MERGEBENCH_CACHE/mini8-builds), which
``scripts/mini8_builds_table.py`` turns into docs/mini8.md's table of builds.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from mergebench.build import mini8 as build_mini8
from mergebench.build import mini8_lora as build_lora
from mergebench.engine.run import run_one
from mergebench.suites.mini8 import CONFIGS, LORA_CONFIGS, Mini8Config, load_mini8, mini8_config_dict

import mini8_args

HEADLINE = ["pretrained", "individual", "weight_averaging", "task_arithmetic"]


def main():
    ap = mini8_args.parser("mini8-builds")
    ap.add_argument("--methods", nargs="*", default=[])
    ap.add_argument("--lora", help="JSON overrides of mini8-lora's LoraConfig: probe LoRA experts on the build")
    args = ap.parse_args()
    overrides = args.overrides
    cfg = mini8_args.configuration(args)
    t0 = time.perf_counter()
    # the base itself by name, so its committed artifact is read rather than rebuilt
    suite = load_mini8(args.base) if cfg == CONFIGS[args.base] else build_mini8.load_or_build(cfg, name=args.name)
    if args.lora is not None:  # LoRA experts, mini8-lora's settings plus the overrides, on that build
        lora_cfg = dataclasses.replace(LORA_CONFIGS["mini8-lora"], base=args.base, **json.loads(args.lora))
        suite = build_lora.load_or_build(lora_cfg, suite, base_cfg=cfg, name=f"{args.name}-lora")
    # the table's "changes": every field that differs from Mini8Config(), whatever the base
    defaults = mini8_config_dict(Mini8Config())
    changes = {k: v for k, v in mini8_config_dict(cfg).items() if v != defaults[k]}
    out = {"name": args.name, "base": args.base, "delta": overrides, "overrides": changes,
           **({"lora": dataclasses.asdict(lora_cfg)} if args.lora is not None else {}), "cache_key": build_mini8.key(cfg),
           "build": suite.info["build"], "load_s": round(time.perf_counter() - t0, 1), "methods": {}}
    for method in HEADLINE + args.methods:
        rec = run_one(method, suite, write=False, show_progress=False, count_flops=False)
        if rec["status"] != "ok":
            out["methods"][method] = rec["status"]
            continue
        m = rec["metrics"]
        out["methods"][method] = {"avg": round(m["avg_accuracy"], 2),
                                  "tasks": {t: round(a, 1) for t, a in m["accuracy"].items()},
                                  "entropy_auroc": {t: round(a, 3) for t, a in m["entropy_auroc"].items()},
                                  "merge_s": rec["timing"]["merge_s"]}
    acc = {k: v["avg"] for k, v in out["methods"].items() if isinstance(v, dict)}
    pre, ind, wa, ta = (acc[k] for k in HEADLINE)
    tasks = out["methods"]["pretrained"]["tasks"]
    merged = [acc[m] for m in ["weight_averaging", "task_arithmetic"] + args.methods if m in acc]
    out["summary"] = {
        "pretrained": pre, "experts": ind, "gap": round(ind - pre, 1),
        "min_task_gap": round(min(out["methods"]["individual"]["tasks"][t] - tasks[t] for t in tasks), 1),
        "ta": ta, "wa": wa, "ta_recovery": round((ta - pre) / (ind - pre), 3),
        "ta_min_auroc": min(out["methods"]["task_arithmetic"]["entropy_auroc"].values()),
        "span": round(max(merged) - min(merged), 1),
    }
    path = Path(args.out)
    path.mkdir(parents=True, exist_ok=True)
    (path / f"{args.name}.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out["summary"]), json.dumps({k: v["tasks"] if isinstance(v, dict) else v for k, v in out["methods"].items()}), json.dumps(out["methods"]["task_arithmetic"]["entropy_auroc"]), sep="\n")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
