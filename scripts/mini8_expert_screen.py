"""Screen a mini8 build cheaply, before building all eight experts (docs/mini8.md: how builds are chosen).

    python scripts/mini8_expert_screen.py NAME '{"finetune_weight_decay": 0.0}' --tasks landcover textures
    python scripts/mini8_expert_screen.py NAME '{"pretrain_label_smoothing": 0.2}' --zero-shot

Uses the configuration's pretraining from $MERGEBENCH_CACHE (as `mergebench build` caches it), or the committed
mini8 artifact's when the configuration keeps mini8's pretraining. With ``--tasks``: fine-tunes those tasks'
experts exactly as the build does and measures `mergebench diagnose`'s per-expert rows on them (trimming and
low-rank retention, the lambda curve). With ``--zero-shot``: the pretrained model's calibration on all eight
test sets (no fine-tuning). Writes NAME.json to --out.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from mergebench.suites.diagnose import DiagnoseSettings, accuracy, retention, zero_shot_calibration
from mergebench.engine.io import cache_root
from mergebench.api.models import build_encoder
from mergebench.build import mini8 as build_mini8
from mergebench.suites import artifact
from mergebench.suites.base import Suite, TaskData
from mergebench.suites.mini8 import CONFIGS
from mergebench.suites.mini8.data import generate_split
from mergebench.api.weights import Weights

import mini8_args


def pretraining(cfg) -> tuple[dict, dict]:
    """The cached pretrained backbone and classifier of ``cfg`` (or mini8's committed ones when they are the same
    pretraining)."""
    stem = Path(cache_root()) / "pretrain" / build_mini8.pretrain_key(cfg)
    if stem.with_suffix(".safetensors").exists():
        return load_file(stem.with_suffix(".safetensors")), load_file(stem.with_suffix(".classifier.safetensors"))
    if build_mini8.pretrain_key(cfg) == build_mini8.pretrain_key(CONFIGS["mini8"]):
        return ({k: v.float() for k, v in artifact.load_tensors("mini8", "pretrained.safetensors").items()},
                {k: v.float() for k, v in artifact.load_tensors("mini8", "heads.safetensors").items()})
    raise SystemExit(f"no cached pretraining {stem}.safetensors: build the configuration first")


def task_data(cfg, task: str, split: str) -> TaskData:
    """The split exactly as the build draws it (same seed)."""
    return TaskData(*generate_split(cfg, task, split))


def main():
    ap = mini8_args.parser("screens")
    ap.add_argument("--tasks", nargs="*", default=[])
    ap.add_argument("--zero-shot", action="store_true")
    args = ap.parse_args()
    cfg = mini8_args.configuration(args)
    t0 = time.perf_counter()
    pretrained, classifier = pretraining(cfg)
    heads = build_mini8.zero_shot_heads(cfg, classifier)
    tasks = list(cfg.tasks) if args.zero_shot else args.tasks
    data = {"train": {}, "val": {}, "test": {t: task_data(cfg, t, "test") for t in tasks}}
    experts = {}
    for t in args.tasks:
        data["train"][t] = task_data(cfg, t, "train")
        path = Path(args.out) / args.name / f"{t}.safetensors"
        if not path.exists():
            build_mini8.finetune_expert(cfg, pretrained, heads[t], data["train"][t].images,
                                        data["train"][t].labels, f"fine-tune {t}", path, True)
        experts[t] = load_file(path)
    suite = Suite(name=f"screen-{args.name}", tasks=tasks, encoder_config=dict(cfg.encoder), logit_scale=cfg.logit_scale,
                  pretrained=Weights(pretrained), heads={t: heads[t] for t in tasks}, data=data,
                  load_expert=lambda t: Weights(experts[t]))
    s = DiagnoseSettings()
    out = {"name": args.name, "overrides": args.overrides, "pretrain_key": build_mini8.pretrain_key(cfg)}
    theta0 = Weights({k: v.float() for k, v in pretrained.items()})
    if args.zero_shot:
        out["calibration"] = zero_shot_calibration(suite, theta0, s)
    if experts:
        encoder = build_encoder(cfg.encoder)
        experts_w = {t: Weights({k: experts[t][k].float() for k in theta0}) for t in experts}
        def acc(w, t):
            encoder.load_state_dict(w)
            return accuracy(encoder.eval(), suite, t, s)
        pre = {t: acc(theta0, t) for t in experts}
        exp = {t: acc(experts_w[t], t) for t in experts}
        out.update(pretrained=pre, experts=exp,
                   **retention(suite, theta0, {t: experts_w[t] - theta0 for t in experts}, pre, exp, s))
        out["norm_ratio"] = {t: ((experts_w[t] - theta0).flatten().norm() / theta0.flatten().norm()).item()
                             for t in experts}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"{args.name}.json").write_text(json.dumps(out, indent=1))
    brief = {k: v for k, v in out.items() if k in ("pretrained", "experts", "norm_ratio", "seconds")}
    for key in ("trim", "low_rank", "lambda"):
        if key in out:
            brief[key] = {p: {t: round(r, 3) for t, r in row["tasks"].items()} for p, row in out[key].items()}
    if "calibration" in out:
        brief["calibration"] = {k: round(v, 3) for k, v in out["calibration"].items() if k != "tasks"}
    print(json.dumps(brief, indent=1))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
