"""Building a mini8 configuration: the recipe behind the committed artifacts.

1. *Pretraining* (the analogue of CLIP's web-scale pretraining): the tiny open_clip VisionTransformer is trained
   with a cosine classifier on a broad mixture: a generic shape/colour task plus samples drawn from each task's
   generator with seeds disjoint from the benchmark splits (hue-rotated as the configuration says), labels offset
   into one joint label space.
2. *Heads* (the analogue of zero-shot text heads): per task, the pretraining classifier's class vectors of that
   task, the vectors the image tower was trained against, as CLIP's image tower was trained against text
   embeddings. They stay frozen and shared by every method.
3. *Experts*: the whole encoder fine-tuned per task with its head frozen (as in the task-vectors paper), in a pool
   of processes.

Everything is deterministic given the configuration's seed. A build is stored under a content address (the
configuration and the source of the generators and of this recipe) in ``$MERGEBENCH_CACHE/mini8``, the pretrained
backbone under its own (reused when only fine-tuning settings change); ``build_artifact`` writes the committed
artifact that ``mergebench.suites.mini8`` loads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mergebench.build import artifact as artifact_writer
from mergebench.build import train as train_module
from mergebench.build.train import train
from mergebench.engine.io import atomic_save_tensors, atomic_write_text, cache_root, file_sha256
from mergebench.api.models import SharedModel, build_encoder, encoder_weights
from mergebench.suites.base import Suite
from mergebench.suites.mini8 import data as data_module
from mergebench.suites.mini8 import tasks
from mergebench.suites.mini8.config import CONFIGS, Mini8Config, mini8_config_dict
from mergebench.suites.mini8.data import generate_data, tensors_sha256
from mergebench.suites.mini8.load import load_built, load_mini8
from mergebench.engine.evaluate import evaluate

# the fields that decide the pretrained backbone
PRETRAIN_FIELDS = ("seed", "encoder", "tasks", "pretrain_per_task", "pretrain_per_task_overrides", "pretrain_generic",
                   "pretrain_epochs", "pretrain_lr", "pretrain_label_smoothing", "logit_scale", "batch_size", "weight_decay",
                   "pretrain_hue_shift", "pretrain_hue_per", "pretrain_hue_overrides", "generator_dtype")


def _hash(values: dict, modules) -> str:
    h = hashlib.sha256(json.dumps(values, sort_keys=True).encode())
    for module in modules:
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()[:16]


def key(cfg: Mini8Config) -> str:
    """Content address of a build: the configuration and the source of the generators and of this recipe."""
    return _hash(mini8_config_dict(cfg), (tasks, data_module, train_module, _this()))


def pretrain_key(cfg: Mini8Config) -> str:
    """Content address of the pretrained backbone alone (reused when only fine-tuning settings change)."""
    values = mini8_config_dict(cfg)
    return _hash({k: values[k] for k in PRETRAIN_FIELDS}, (tasks, data_module, train_module, _this()))


def _this():
    return __import__(__name__, fromlist=["_"])


def load_or_build(cfg: Mini8Config, cache_dir: str | os.PathLike | None = None, build: bool = True,
                  verbose: bool = True, jobs: int | None = None, name: str = "mini8-custom") -> Suite:
    """The suite of configuration ``cfg``, built on first use into ``$MERGEBENCH_CACHE/mini8/<key>`` and loaded from
    there afterwards."""
    root = Path(cache_dir or cache_root()) / "mini8" / key(cfg)
    if not (root / "meta.json").exists():
        if not build:
            raise FileNotFoundError(f"{name} is not built in {root}; build it with "
                                    f"mergebench.build.mini8.load_or_build(cfg) (scripts/mini8_probe.py)")
        build_into(cfg, root, verbose, jobs)
    return load_built(cfg, root, name)


def build_into(cfg: Mini8Config, root: Path, verbose: bool, jobs: int | None = None):
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    specs = cfg.specs()
    log = print if verbose else (lambda *a, **k: None)
    log(f"building mini8 into {root} (once; cached afterwards)")

    data = generate_data(cfg)

    encoder = build_encoder(cfg.encoder)
    t0 = time.perf_counter()
    pretrained_file = root.parent.parent / "pretrain" / f"{pretrain_key(cfg)}.safetensors"
    classifier_file = pretrained_file.with_suffix(".classifier.safetensors")
    if pretrained_file.exists() and classifier_file.exists():
        encoder.load_state_dict(load_file(pretrained_file))
        classifier = load_file(classifier_file)
    else:
        classifier = pretrain(cfg, encoder, verbose)
        atomic_save_tensors(classifier, classifier_file)
        atomic_save_tensors(encoder_weights(encoder), pretrained_file)
    pretrain_s = time.perf_counter() - t0
    pretrained = encoder_weights(encoder)

    heads = zero_shot_heads(cfg, classifier)

    (root / "experts").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    jobs = build_jobs(jobs, len(specs))
    runs = [(cfg, pretrained, heads[s.name], data[f"train/{s.name}/images"], data[f"train/{s.name}/labels"],
             f"fine-tune {s.name}", root / "experts" / f"{s.name}.safetensors") for s in specs]
    if jobs > 1:
        log(f"fine-tuning {len(runs)} experts in {jobs} processes of {torch.get_num_threads()} thread(s) each")
    parallel_map(finetune_expert, [(*run, verbose and jobs == 1) for run in runs], jobs,
                 lambda desc: jobs > 1 and log(f"{desc}: done"))
    finetune_s = time.perf_counter() - t0

    atomic_save_tensors(pretrained, root / "pretrained.safetensors")
    atomic_save_tensors(heads, root / "heads.safetensors")
    atomic_save_tensors(data, root / "data.safetensors")
    files = ["pretrained.safetensors", "heads.safetensors", "data.safetensors"] + [f"experts/{s.name}.safetensors" for s in specs]
    meta = {"config": dataclasses.asdict(cfg), "sha256": {f: file_sha256(root / f) for f in files},
            "build": {"pretrain_s": round(pretrain_s, 1), "finetune_s": round(finetune_s, 1),
                      "total_s": round(time.perf_counter() - t_start, 1), "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "jobs": jobs}}
    atomic_write_text(root / "meta.json", json.dumps(meta, indent=1))  # written last: marks the build complete
    log(f"mini8 built in {meta['build']['total_s']} s")


def build_jobs(jobs: int | None, tasks: int) -> int:
    """Processes that fine-tune experts at once: ``jobs``, else $MERGEBENCH_BUILD_JOBS, else 1; at most one per
    task."""
    if jobs is None:
        value = os.environ.get("MERGEBENCH_BUILD_JOBS", "1")
        try:
            jobs = int(value)
        except ValueError:
            raise ValueError(f"MERGEBENCH_BUILD_JOBS={value!r}: use a whole number of processes (e.g. 2)") from None
    if jobs < 1:
        raise ValueError(f"build jobs must be at least 1, got {jobs}")
    return min(jobs, tasks)


def _worker_threads(threads: int):
    torch.set_num_threads(threads)


def parallel_map(fn, calls: list[tuple], jobs: int, on_done=lambda result: None) -> list:
    """``[fn(*call) for call in calls]``, calling ``on_done(result)`` as each finishes: in this process for one job,
    else in ``jobs`` fresh (spawned) processes with this process's thread count each. Spawned, not forked: the
    parent has used its OpenMP pool (pretraining), which a forked child cannot use again."""
    if jobs == 1:
        results = []
        for call in calls:
            results.append(fn(*call))
            on_done(results[-1])
        return results

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_threads,
                             initargs=(torch.get_num_threads(),)) as pool:
        futures = [pool.submit(fn, *call) for call in calls]
        for future in as_completed(futures):
            on_done(future.result())
        return [future.result() for future in futures]


def finetune_expert(cfg, pretrained, head, x, y, desc, path, verbose):
    """One expert: the pretrained backbone fine-tuned on a task's training split, saved to ``path``. Each expert's
    run is independent and seeded, so the bytes are the same whether the experts train in turn or in parallel."""
    expert = build_encoder(cfg.encoder)
    expert.load_state_dict(pretrained)
    train(expert, head, x, y, cfg.finetune_epochs, cfg.finetune_lr, cfg, desc, verbose,
          weight_decay=cfg.finetune_weight_decay)
    atomic_save_tensors(encoder_weights(expert), path)
    return desc


def zero_shot_heads(cfg: Mini8Config, classifier: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One frozen head per task: the pretraining classifier's unit class vectors of that task (like CLIP's text
    embeddings: the vectors the image tower was trained against)."""
    return {s.name: F.normalize(classifier[s.name].float(), dim=-1) for s in cfg.specs()}


def hue_rotate(x, degrees, dtype: torch.dtype = torch.float32):
    """uint8 images rotated about the gray axis of RGB by ``degrees`` (a number, or one angle per image; luminance
    kept, grays unchanged), computed in ``dtype``."""
    if isinstance(degrees, torch.Tensor):  # one angle per image
        a = torch.deg2rad(degrees.to(torch.float64))
        c, s, k, r = a.cos(), a.sin(), 1.0 / 3.0, math.sqrt(1.0 / 3.0)
        m = torch.stack([torch.stack([c + (1 - c) * k, k * (1 - c) - r * s, k * (1 - c) + r * s], -1),
                         torch.stack([k * (1 - c) + r * s, c + k * (1 - c), k * (1 - c) - r * s], -1),
                         torch.stack([k * (1 - c) - r * s, k * (1 - c) + r * s, c + k * (1 - c)], -1)], -2)
        out = torch.einsum("nij,njhw->nihw", m.to(dtype), x.to(dtype))
        return out.round().clamp(0, 255).to(torch.uint8)
    a = math.radians(degrees)
    c, s, k = math.cos(a), math.sin(a), 1.0 / 3.0
    m = torch.tensor([[c + (1 - c) * k, k * (1 - c) - math.sqrt(k) * s, k * (1 - c) + math.sqrt(k) * s],
                      [k * (1 - c) + math.sqrt(k) * s, c + k * (1 - c), k * (1 - c) - math.sqrt(k) * s],
                      [k * (1 - c) - math.sqrt(k) * s, k * (1 - c) + math.sqrt(k) * s, c + k * (1 - c)]], dtype=dtype)
    out = torch.einsum("ij,njhw->nihw", m, x.to(dtype))
    return out.round().clamp(0, 255).to(torch.uint8)


def pretrain(cfg: Mini8Config, encoder, verbose: bool) -> dict[str, torch.Tensor]:
    """Train ``encoder`` and a joint cosine classifier on the pretraining mixture; returns each task's classifier
    rows."""
    specs = cfg.specs()
    xs, ys, offset = [], [], 0
    g = torch.Generator().manual_seed(cfg.seed * 1000 + 999)
    for i, spec in enumerate(specs + [tasks.GENERIC]):
        n = (cfg.pretrain_generic if spec is tasks.GENERIC
             else cfg.pretrain_per_task_overrides.get(spec.name, cfg.pretrain_per_task))
        x, y = tasks.generate(spec, n, seed=cfg.seed * 1000 + 500 + i, dtype=cfg.dtype)
        hue_shift = cfg.pretrain_hue_overrides.get(spec.name, cfg.pretrain_hue_shift)
        shift = 180.0 * (1 + hue_shift * (2 * torch.rand((), generator=g).item() - 1))
        if hue_shift and spec is not tasks.GENERIC:
            if cfg.pretrain_hue_per == "image":
                shift = 180.0 * (1 + hue_shift * (2 * torch.rand(len(x), generator=g, dtype=torch.float64) - 1))
            x = hue_rotate(x, shift, cfg.dtype)
        xs.append(x)
        ys.append(y + offset)
        offset += spec.num_classes
    classifier = torch.nn.Parameter(torch.randn(offset, cfg.encoder["output_dim"]) * 0.02)
    train(encoder, classifier, torch.cat(xs), torch.cat(ys), cfg.pretrain_epochs, cfg.pretrain_lr, cfg,
          "pretrain", verbose, label_smoothing=cfg.pretrain_label_smoothing)
    rows = classifier.detach().split([s.num_classes for s in specs + [tasks.GENERIC]])
    return {s.name: r.clone().contiguous() for s, r in zip(specs, rows)}  # the generic classes have no task


def build_artifact(name: str = "mini8", verbose: bool = True, jobs: int | None = None) -> Path:
    """Build ``CONFIGS[name]`` from nothing (a fresh temporary cache: no cached pretraining reused) and store it as
    the committed artifact ``bench/suites/artifacts/<name>``: the pretrained backbone, the heads and the experts in
    float16 when that changes no accuracy by more than 0.5 points (else float32), with the configuration, the
    data's sha256 and the accuracies of the pretrained model and of each expert as loaded from the artifact."""
    cfg = CONFIGS[name]

    def accuracies(suite):
        pre = evaluate(SharedModel(suite.build_encoder()), suite)["accuracy"]
        experts = {t: evaluate(SharedModel(suite.build_encoder({**suite.pretrained, **suite.expert_weights(t)})),
                               suite, tasks=[t])["accuracy"][t] for t in suite.tasks}
        return {"pretrained": pre, "experts": experts}

    with tempfile.TemporaryDirectory(prefix="mergebench-artifact-") as tmp:
        root = Path(tmp) / "mini8" / key(cfg)
        build_into(cfg, root, verbose, jobs)
        built = load_built(cfg, root, name)
        exact = accuracies(built)
        meta_build = json.loads((root / "meta.json").read_text())["build"]
        files = {"pretrained.safetensors": dict(built.pretrained), "heads.safetensors": dict(built.heads),
                 **{f"experts/{t}.safetensors": dict(built.expert_weights(t)) for t in cfg.tasks}}
        data_sha = tensors_sha256(load_file(root / "data.safetensors"))
        meta = {"suite": name, "config": mini8_config_dict(cfg), "data_sha256": data_sha,
                "build": {**meta_build, "command": f"make {name}-artifact"}}
        for dtype in (torch.float16, torch.float32):
            artifact_writer.write(name, files, {**meta, "dtype": str(dtype).removeprefix("torch.")}, dtype)
            stored = accuracies(load_mini8(name, cache_dir=tmp))
            worst = max(abs(stored[k][t] - exact[k][t]) for k in ("pretrained", "experts") for t in cfg.tasks)
            if worst <= 0.5 or dtype == torch.float32:
                break
        meta = {**meta, "dtype": str(dtype).removeprefix("torch."), "accuracy": stored,
                "accuracy_float32": exact}
        return artifact_writer.write(name, files, meta, dtype)


__all__ = ["key", "pretrain_key", "load_or_build", "build_into", "build_artifact", "build_jobs", "parallel_map",
           "finetune_expert", "zero_shot_heads", "hue_rotate", "pretrain"]
