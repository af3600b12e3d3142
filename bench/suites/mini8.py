"""mini8: the embedded offline benchmark, built on a CPU and cached.

The protocol mirrors the real eight-task CLIP benchmark:

1. *Pretraining* (the analogue of CLIP's web-scale pretraining): a tiny open_clip
   VisionTransformer is trained with a cosine classifier on a broad mixture: a generic
   shape/color task plus a few hundred samples drawn from each task's generator with a seed
   disjoint from the benchmark splits, labels offset into one joint label space.
2. *Heads* (the analogue of zero-shot text heads): per task, the pretraining classifier's class
   vectors of that task (``heads="classifier"``), the vectors the image tower was trained
   against, as CLIP's image tower was trained against text embeddings. Learned from few
   examples, they are imperfect; they stay frozen and shared by every method. (The older
   ``heads="prototypes"`` embeds ``head_shots`` training images per class; measured: with
   those heads fine-tuning must re-shape features around noisy class vectors, and Task
   Arithmetic fell below the pretrained model.)
3. *Experts*: the whole encoder is fine-tuned per task with its head frozen (as in the
   task-vectors paper), AdamW with weight decay 0.1 and a cosine schedule.

The defaults were chosen by measurement so that mini8 shows what the real benchmark shows
(experts far above the pretrained model; Task Arithmetic below the experts but above the
pretrained model and Weight Averaging); the leaderboard's sanity section re-checks them.
Everything is deterministic given the config's seed and stored under a content-addressed
key (config + generator code) in ``$MERGEBENCH_CACHE`` (default ``~/.cache/mergebench``),
so a second run builds nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mergebench.io import atomic_save_tensors, atomic_write_text, cache_root, file_sha256
from mergebench.models import LOGIT_SCALE, build_encoder, encoder_weights
from mergebench.progress import progress
from mergebench.suites import artifact, mini8_tasks
from mergebench.suites.base import SPLITS, Suite, TaskData
from mergebench.weights import Weights


@dataclass(frozen=True)
class Mini8Config:
    seed: int = 0
    encoder: dict = field(default_factory=lambda: dict(
        image_size=32, patch_size=8, width=128, layers=6, heads=4, mlp_ratio=4.0, output_dim=128))
    tasks: tuple = tuple(t.name for t in mini8_tasks.TASKS)
    n_train: int = 2000
    n_val: int = 500
    n_test: int = 1000
    pretrain_per_task: int = 300
    pretrain_generic: int = 6000
    pretrain_epochs: int = 10
    pretrain_lr: float = 1e-3
    heads: str = "classifier"   # "classifier": the pretraining classifier's class vectors; "prototypes": image embeddings
    head_shots: int = 1         # images per class for "prototypes" heads
    finetune_epochs: int = 10
    finetune_lr: float = 1.5e-4
    batch_size: int = 128
    weight_decay: float = 0.1
    # AdamW's decoupled weight decay while fine-tuning the experts (None: weight_decay). Decay shrinks every weight
    # along -theta_0, a dense component shared by all task vectors; real fine-tuning's lr 1e-5 makes it negligible.
    finetune_weight_decay: float | None = None
    # Pretraining's view of the eight tasks ("web" images differ from the benchmark's, as for CLIP): each task's
    # pretraining images are hue-rotated by a fixed per-task angle drawn in [1 - s, 1 + s] x 180 degrees (s =
    # pretrain_hue_shift; 0: the benchmark's colors).
    pretrain_hue_shift: float = 0.0
    # "task": one angle per task (its shapes' colours are consistently permuted, so the zero-shot head is confidently
    # wrong on colour-defined classes); "image": each pretraining image draws its own angle in the same range (the
    # colours are inconsistent, so the zero-shot head is unsure between classes that differ by colour)
    pretrain_hue_per: str = "task"
    # {task: s}: that task's hue shift instead of pretrain_hue_shift (0: shown in the benchmark's colours)
    pretrain_hue_overrides: dict = field(default_factory=dict)
    pretrain_transpose: float = 0.0   # share of each task's pretraining images shown transposed (rows <-> columns)
    # {task: share}: that share of the task's pretraining images shown with inverted intensities (255 - x: a white
    # digit on black becomes a black digit on white; hue rotation leaves grays, and so digits, unchanged)
    pretrain_invert: dict = field(default_factory=dict)
    # {task: [lo, hi]}: each of the task's pretraining images zoomed in about its centre by a factor drawn in [lo, hi]
    # (bilinear, border pixels extended). Shapes are seen larger than the benchmark shows them, as hue rotation shows
    # colours other than the benchmark's: a transformation the features can absorb but the zero-shot head need not.
    pretrain_zoom: dict = field(default_factory=dict)
    pretrain_label_smoothing: float = 0.0
    # {task: n}: that task's number of pretraining images instead of pretrain_per_task (empty: pretrain_per_task for all)
    pretrain_per_task_overrides: dict = field(default_factory=dict)
    # Imperfect zero-shot heads (as CLIP's text heads are): each class vector is mixed with a fixed seeded random unit
    # direction, weight head_noise, and renormalised (0: the pretraining classifier's vectors as they are).
    head_noise: float = 0.0
    # dtype of the generators' drawing arithmetic and of the pretraining views' hue rotation: "float64" draws the
    # same bytes on every CPU measured, "float32" (the v1/v2 builds) does not (docs/mini8.md)
    generator_dtype: str = "float32"

    def key(self) -> str:
        """Content address of the whole suite: this config and the source of the generators and the builder."""
        h = hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode())
        for module in (mini8_tasks, __import__(__name__, fromlist=["_"])):
            h.update(Path(module.__file__).read_bytes())
        return h.hexdigest()[:16]

    def pretrain_key(self) -> str:
        """Content address of the pretrained backbone alone (reused when only fine-tuning settings change)."""
        values, defaults = dataclasses.asdict(self), dataclasses.asdict(Mini8Config())
        fields = {k: values[k] for k in PRETRAIN_FIELDS}
        # an option added later is keyed only when it is on (off: the key of the builds made before it existed)
        fields.update({k: values[k] for k in PRETRAIN_OPTIONS_ADDED if values[k] != defaults[k]})
        h = hashlib.sha256(json.dumps({**fields, "version": PRETRAIN_VERSION}, sort_keys=True).encode())
        h.update(Path(mini8_tasks.__file__).read_bytes())
        return h.hexdigest()[:16]


PRETRAIN_VERSION = 2  # bump when the pretraining code changes
# the fields that decide the pretrained backbone; those added later enter its key only when not at their defaults
PRETRAIN_FIELDS = ("seed", "encoder", "tasks", "pretrain_per_task", "pretrain_generic", "pretrain_epochs",
                   "pretrain_lr", "batch_size", "weight_decay", "pretrain_hue_shift", "pretrain_transpose",
                   "pretrain_label_smoothing")
PRETRAIN_OPTIONS_ADDED = ("pretrain_per_task_overrides", "pretrain_hue_per", "pretrain_hue_overrides",
                          "pretrain_invert", "generator_dtype", "pretrain_zoom")


CONFIGS = {
    # v4 (docs/mini8.md: the builds tried and what each choice did): each pretraining image under its own hue
    # rotation (signs in their true colours), more images of the colour-defined tasks, 20 pretraining epochs;
    # experts fine-tuned on 12,000 images per task for 10 epochs; generators drawn in float64 (the same bytes on
    # every CPU)
    "mini8": Mini8Config(
        pretrain_hue_shift=0.5, pretrain_hue_per="image", pretrain_hue_overrides={"signs": 0.0},
        pretrain_per_task_overrides={"scenes": 1500, "landcover": 1500, "signs": 300, "house_numbers": 1150,
                                     "vehicles": 800, "digits": 700, "aerial": 200, "textures": 500},
        pretrain_epochs=20, n_train=12000, finetune_epochs=10, generator_dtype="float64"),
    # Seconds-fast build for tests: the same code path with fewer, smaller everything.
    "micro": Mini8Config(
        encoder=dict(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2.0, output_dim=32),
        tasks=("digits", "textures", "signs"), n_train=96, n_val=32, n_test=64,
        pretrain_per_task=64, pretrain_generic=64, pretrain_epochs=1, finetune_epochs=2,
        finetune_lr=1e-3, batch_size=32),
}


def load_mini8(config: str | Mini8Config = "mini8", cache_dir: str | os.PathLike | None = None,
               build: bool = True, verbose: bool = True) -> Suite:
    """The mini8 suite (or its micro configuration): from its committed artifact (``bench/suites/artifacts``) when
    there is one, else built on first use and cached (custom configurations)."""
    cfg = CONFIGS[config] if isinstance(config, str) else config
    name = config if isinstance(config, str) else "mini8-custom"
    if isinstance(config, str) and artifact.exists(config):
        return _load_artifact(name, cfg, cache_dir)
    root = Path(cache_dir or cache_root()) / "mini8" / cfg.key()
    if not (root / "meta.json").exists():
        if not build:
            raise FileNotFoundError(f"mini8 ({name}) is not built in {root}; run `mergebench build {name}` first")
        _build(cfg, root, verbose)
    return _load(cfg, name, root)


def _load(cfg: Mini8Config, name: str, root: Path) -> Suite:
    meta = json.loads((root / "meta.json").read_text())
    data_file = load_file(root / "data.safetensors")
    return _suite(cfg, name, _splits(cfg, data_file), load_file(root / "pretrained.safetensors"),
                  load_file(root / "heads.safetensors"),
                  lambda task: load_file(root / "experts" / f"{task}.safetensors"),
                  {"cache_key": cfg.key(), "checkpoints": meta["sha256"], "build": meta["build"]})


def _load_artifact(name: str, cfg: Mini8Config, cache_dir) -> Suite:
    """The committed build: every file checked against its sha256, the data generated once and checked too."""
    meta = artifact.read(name)
    stored = stored_config(meta["config"])
    if stored != mini8_config_dict(cfg):
        expected = mini8_config_dict(cfg)
        changed = sorted(k for k in set(stored) | set(expected) if stored.get(k) != expected.get(k))
        raise artifact.ArtifactError(
            f"the {name} configuration in bench/suites/mini8.py differs from the one its committed artifact was built "
            f"from (fields {', '.join(changed)}); rebuild the artifact with `make {name}-artifact` (or restore the "
            f"configuration)")
    data, digest = _artifact_data(name, cfg, meta["data_sha256"], Path(cache_dir or cache_root()) / "mini8-data",
                                  meta["build"].get("torch"))
    checkpoints = {**meta["files"], "data": digest}
    identity_meta = {**meta, "data_sha256": digest}
    return _suite(cfg, name, _splits(cfg, data), artifact.load_tensors(name, "pretrained.safetensors"),
                  artifact.load_tensors(name, "heads.safetensors"),
                  lambda task: artifact.load_tensors(name, f"experts/{task}.safetensors"),
                  {"cache_key": artifact.identity(identity_meta), "checkpoints": checkpoints, "build": meta["build"],
                   "artifact": str(artifact.path(name)), "artifact_identity": artifact.identity(meta),
                   "built_accuracy": meta.get("accuracy"), "data_matches_artifact": digest == meta["data_sha256"]})


class ArtifactDataWarning(UserWarning):
    """The generators produced other bytes on this machine than the committed artifact's data."""


def _artifact_data(name: str, cfg: Mini8Config, expected: str, cache: Path, built_torch: str | None
                   ) -> tuple[dict, str]:
    """The artifact's splits, generated once per machine and cached (hash-checked on every load), with their sha256.

    Data whose sha256 differs from the artifact's (some CPUs' floating-point kernels round a few pixels the other
    way) is used, under its own digest: the suite's identity then differs, so records made on the committed data
    are not reused or pooled with it, and an ``ArtifactDataWarning`` says so."""
    stem = f"{name}-{expected[:16]}"
    data = digest = None
    for file in sorted(cache.glob(f"{stem}*.safetensors")):
        tensors = load_file(file)
        h = tensors_sha256(tensors)
        if (file.stem == stem and h == expected) or file.stem == f"{stem}-here-{h[:16]}":
            data, digest = tensors, h
            break
    if data is None:
        data = generate_data(cfg)
        digest = tensors_sha256(data)
        atomic_save_tensors(data, cache / f"{stem}{'' if digest == expected else '-here-' + digest[:16]}.safetensors")
    if digest != expected:
        warnings.warn(
            f"{name}: the generators produced data with sha256 {digest[:16]}... on this machine; the committed artifact "
            f"was built on {expected[:16]}... (its torch {built_torch}, this torch {torch.__version__}; the CPU's "
            f"floating-point kernels can round some pixels differently). The suite runs on this machine's data under "
            f"its own identity, so the committed records are not reused and results are not pooled with them.",
            ArtifactDataWarning, stacklevel=3)
    return data, digest


def _splits(cfg, data_file):
    return {s: {t: TaskData(data_file[f"{s}/{t}/images"], data_file[f"{s}/{t}/labels"]) for t in cfg.tasks}
            for s in SPLITS}


def _suite(cfg, name, data, pretrained, heads, load_expert, info) -> Suite:
    return Suite(
        name=name, tasks=list(cfg.tasks), encoder_config=dict(cfg.encoder),
        pretrained=Weights(pretrained), heads=dict(heads), data=data,
        load_expert=lambda task: Weights(load_expert(task)),
        info={"suite": name, "backbone": "open_clip VisionTransformer " + json.dumps(cfg.encoder, sort_keys=True),
              "mini8_config": mini8_config_dict(cfg), **info},
    )


def mini8_config_dict(cfg: Mini8Config) -> dict:
    """The configuration as JSON values (tuples as lists), as a record or an artifact's suite.json stores it."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def stored_config(stored: dict) -> dict:
    """An artifact's stored configuration with the fields it predates (added to Mini8Config after it was built) at
    their defaults, which are the values those builds had."""
    defaults = mini8_config_dict(Mini8Config())
    return {**{k: v for k, v in defaults.items() if k not in stored}, **stored}


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of named tensors' names, dtypes, shapes and bytes, in name order (independent of file layout)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ------------------------------------------------------------------ build
def _specs(cfg):
    by_name = {t.name: t for t in mini8_tasks.TASKS}
    return [by_name[t] for t in cfg.tasks]


def _build(cfg: Mini8Config, root: Path, verbose: bool, jobs: int | None = None):
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    specs = _specs(cfg)
    log = print if verbose else (lambda *a, **k: None)
    log(f"building mini8 into {root} (once; cached afterwards)")

    data = generate_data(cfg)

    encoder = build_encoder(cfg.encoder)
    t0 = time.perf_counter()
    pretrained_file = root.parent.parent / "pretrain" / f"{cfg.pretrain_key()}.safetensors"
    classifier_file = pretrained_file.with_suffix(".classifier.safetensors")
    if pretrained_file.exists() and classifier_file.exists():
        encoder.load_state_dict(load_file(pretrained_file))
        classifier = load_file(classifier_file)
    else:
        classifier = _pretrain(cfg, encoder, specs, log)
        atomic_save_tensors(classifier, classifier_file)
        atomic_save_tensors(encoder_weights(encoder), pretrained_file)
    pretrain_s = time.perf_counter() - t0
    pretrained = encoder_weights(encoder)

    heads = _heads(cfg, encoder, specs, classifier, data)

    (root / "experts").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    jobs = build_jobs(jobs, len(specs))
    runs = [(cfg, pretrained, heads[s.name], data[f"train/{s.name}/images"], data[f"train/{s.name}/labels"],
             f"fine-tune {s.name}", root / "experts" / f"{s.name}.safetensors") for s in specs]
    if jobs > 1:
        log(f"fine-tuning {len(runs)} experts in {jobs} processes of {torch.get_num_threads()} thread(s) each")
    parallel_map(_finetune_expert, [(*run, verbose and jobs == 1) for run in runs], jobs,
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
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

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


def _finetune_expert(cfg, pretrained, head, x, y, desc, path, verbose):
    """One expert: the pretrained backbone fine-tuned on a task's training split, saved to ``path``. Each expert's
    run is independent and seeded, so the bytes are the same whether the experts train in turn or in parallel."""
    expert = build_encoder(cfg.encoder)
    expert.load_state_dict(pretrained)
    _train(expert, head, x, y, cfg.finetune_epochs, cfg.finetune_lr, cfg, desc, verbose,
           weight_decay=cfg.finetune_weight_decay)
    atomic_save_tensors(encoder_weights(expert), path)
    return desc


def generate_data(cfg: Mini8Config) -> dict[str, torch.Tensor]:
    """The benchmark splits, ``{split}/{task}/images|labels``: disjoint seeds per task and split (pretraining
    samples use yet other seeds)."""
    sizes = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}
    data = {}
    specs = _specs(cfg)
    with progress(total=len(specs) * len(SPLITS), desc="generating the data (once per machine)", unit="split") as bar:
        for i, spec in enumerate(specs):
            for j, split in enumerate(SPLITS):
                bar.set_postfix_str(f"{spec.name}/{split}", refresh=False)
                x, y = mini8_tasks.generate(spec, sizes[split], seed=cfg.seed * 1000 + 10 * i + j,
                                            dtype=generator_dtype(cfg))
                data[f"{split}/{spec.name}/images"], data[f"{split}/{spec.name}/labels"] = x, y
                bar.update(1)
    return data


def _heads(cfg, encoder, specs, classifier, data):
    """One frozen head per task: unit class vectors in the encoder's output space."""
    if cfg.heads == "classifier":  # like CLIP's text embeddings: the vectors the image tower was trained against
        heads = {s.name: F.normalize(classifier[s.name].float(), dim=-1) for s in specs}
        if cfg.head_noise:
            g = torch.Generator().manual_seed(cfg.seed * 1000 + 777)
            for s in specs:
                noise = F.normalize(torch.randn(heads[s.name].shape, generator=g), dim=-1)
                heads[s.name] = F.normalize(heads[s.name] + cfg.head_noise * noise, dim=-1)
        return heads
    if cfg.heads != "prototypes":
        raise ValueError(f"heads must be 'classifier' or 'prototypes', got {cfg.heads!r}")
    heads = {}
    with torch.no_grad():
        encoder.eval()
        for spec in specs:
            x, y = data[f"train/{spec.name}/images"], data[f"train/{spec.name}/labels"]
            protos = []
            for c in range(spec.num_classes):
                idx = (y == c).nonzero()[: cfg.head_shots, 0]
                if len(idx) == 0:
                    raise ValueError(f"{spec.name}: class {c} has no training image; raise n_train (now {cfg.n_train})")
                protos.append(F.normalize(encoder(_normalize(x[idx])), dim=-1).mean(0))
            heads[spec.name] = F.normalize(torch.stack(protos), dim=-1)
    return heads


def _normalize(x):
    return (x.float() / 255.0 - 0.5) / 0.5


def generator_dtype(cfg: Mini8Config) -> torch.dtype:
    if cfg.generator_dtype not in ("float32", "float64"):
        raise ValueError(f"generator_dtype must be 'float32' or 'float64', got {cfg.generator_dtype!r}")
    return getattr(torch, cfg.generator_dtype)


def hue_rotate(x, degrees: float, dtype: torch.dtype = torch.float32):
    """uint8 images rotated about the gray axis of RGB by ``degrees`` (luminance kept; grays unchanged), computed
    in ``dtype``."""
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


def zoom(x, factors, dtype: torch.dtype = torch.float32):
    """uint8 images zoomed about their centres, one factor per image (> 1: in), bilinear with the border pixels
    extended, computed in ``dtype``."""
    theta = torch.zeros(len(x), 2, 3, dtype=dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / factors.to(dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x.to(dtype), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


def _pretrain(cfg, encoder, specs, log):
    if cfg.pretrain_hue_per not in ("task", "image"):
        raise ValueError(f"Mini8Config.pretrain_hue_per={cfg.pretrain_hue_per!r}: use 'task' or 'image'")
    for option in ("pretrain_per_task_overrides", "pretrain_hue_overrides", "pretrain_invert", "pretrain_zoom"):
        unknown = sorted(set(getattr(cfg, option)) - {s.name for s in specs})
        if unknown:
            raise ValueError(f"Mini8Config.{option} names {unknown}, not tasks of this suite "
                             f"({[s.name for s in specs]})")
    for task, (lo, hi) in cfg.pretrain_zoom.items():
        if not 0 < lo <= hi:
            raise ValueError(f"Mini8Config.pretrain_zoom[{task!r}]={[lo, hi]}: use [lo, hi] with 0 < lo <= hi")
    xs, ys, offset = [], [], 0
    g = torch.Generator().manual_seed(cfg.seed * 1000 + 999)
    for i, spec in enumerate(specs + [mini8_tasks.GENERIC]):
        n = (cfg.pretrain_generic if spec is mini8_tasks.GENERIC
             else cfg.pretrain_per_task_overrides.get(spec.name, cfg.pretrain_per_task))
        x, y = mini8_tasks.generate(spec, n, seed=cfg.seed * 1000 + 500 + i, dtype=generator_dtype(cfg))
        hue_shift = cfg.pretrain_hue_overrides.get(spec.name, cfg.pretrain_hue_shift)
        shift = 180.0 * (1 + hue_shift * (2 * torch.rand((), generator=g).item() - 1))
        if hue_shift and spec is not mini8_tasks.GENERIC:
            if cfg.pretrain_hue_per == "image":
                shift = 180.0 * (1 + hue_shift * (2 * torch.rand(len(x), generator=g, dtype=torch.float64) - 1))
            x = hue_rotate(x, shift, generator_dtype(cfg))
        if cfg.pretrain_transpose and spec is not mini8_tasks.GENERIC:
            flip = torch.rand(len(x), generator=g) < cfg.pretrain_transpose
            x = torch.where(flip.view(-1, 1, 1, 1), x.transpose(-1, -2), x)
        if cfg.pretrain_invert.get(spec.name):
            invert = torch.rand(len(x), generator=g) < cfg.pretrain_invert[spec.name]
            x = torch.where(invert.view(-1, 1, 1, 1), 255 - x, x)
        if spec.name in cfg.pretrain_zoom:
            lo, hi = cfg.pretrain_zoom[spec.name]
            x = zoom(x, lo + (hi - lo) * torch.rand(len(x), generator=g, dtype=torch.float64), generator_dtype(cfg))
        xs.append(x)
        ys.append(y + offset)
        offset += spec.num_classes
    classifier = torch.nn.Parameter(torch.randn(offset, cfg.encoder["output_dim"]) * 0.02)
    _train(encoder, classifier, torch.cat(xs), torch.cat(ys), cfg.pretrain_epochs, cfg.pretrain_lr, cfg,
           "pretrain", log is not None and log is print, label_smoothing=cfg.pretrain_label_smoothing)
    rows = classifier.detach().split([s.num_classes for s in specs + [mini8_tasks.GENERIC]])
    return {s.name: r.clone().contiguous() for s, r in zip(specs, rows)}  # the generic classes have no task


def _train(encoder, head_weight, x, y, epochs, lr, cfg, desc, verbose, label_smoothing=0.0, weight_decay=None):
    """Cross-entropy with a cosine classifier; ``head_weight`` trains only if it is a Parameter."""
    params = list(encoder.parameters()) + ([head_weight] if isinstance(head_weight, torch.nn.Parameter) else [])
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay if weight_decay is None else weight_decay)
    steps = epochs * math.ceil(len(y) / cfg.batch_size)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    g = torch.Generator().manual_seed(cfg.seed)
    encoder.train()
    bar = progress(total=steps, desc=desc, disable=not verbose)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(cfg.batch_size):
            feats = F.normalize(encoder(_normalize(x[idx])), dim=-1)
            logits = LOGIT_SCALE * feats @ F.normalize(head_weight, dim=-1).t()
            loss = F.cross_entropy(logits, y[idx], label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    encoder.eval()


# ------------------------------------------------------------------ the committed artifact
def build_artifact(name: str = "mini8", verbose: bool = True, jobs: int | None = None) -> Path:
    """Build ``CONFIGS[name]`` from nothing (a fresh temporary cache: no cached pretraining reused) and store it as
    the committed artifact ``bench/suites/artifacts/<name>``: the pretrained backbone, the heads and the experts in
    float16 when that changes no accuracy by more than 0.5 points (else float32), with the configuration, the
    data's sha256 and the accuracies of the pretrained model and of each expert as loaded from the artifact."""
    import tempfile

    from mergebench.evaluate import evaluate
    from mergebench.models import SharedModel

    cfg = CONFIGS[name]

    def accuracies(suite):
        pre = evaluate(SharedModel(suite.build_encoder()), suite)["accuracy"]
        experts = {t: evaluate(SharedModel(suite.build_encoder({**suite.pretrained, **suite.expert_weights(t)})),
                               suite, tasks=[t])["accuracy"][t] for t in suite.tasks}
        return {"pretrained": pre, "experts": experts}

    with tempfile.TemporaryDirectory(prefix="mergebench-artifact-") as tmp:
        root = Path(tmp) / "mini8" / cfg.key()
        _build(cfg, root, verbose, jobs)
        built = _load(cfg, name, root)
        exact = accuracies(built)
        meta_build = json.loads((root / "meta.json").read_text())["build"]
        files = {"pretrained.safetensors": dict(built.pretrained), "heads.safetensors": dict(built.heads),
                 **{f"experts/{t}.safetensors": dict(built.expert_weights(t)) for t in cfg.tasks}}
        data_sha = tensors_sha256(load_file(root / "data.safetensors"))
        meta = {"suite": name, "config": mini8_config_dict(cfg), "data_sha256": data_sha,
                "build": {**meta_build, "command": f"make {name}-artifact"}}
        for dtype in (torch.float16, torch.float32):
            artifact.write(name, files, {**meta, "dtype": str(dtype).removeprefix("torch.")}, dtype)
            stored = accuracies(_load_artifact(name, cfg, tmp))
            worst = max(abs(stored[k][t] - exact[k][t]) for k in ("pretrained", "experts") for t in cfg.tasks)
            if worst <= 0.5 or dtype == torch.float32:
                break
        meta = {**meta, "dtype": str(dtype).removeprefix("torch."), "accuracy": stored,
                "accuracy_float32": exact}
        return artifact.write(name, files, meta, dtype)
