"""mini8-lora: the mini8 benchmark with LoRA experts instead of fully fine-tuned ones.

Built on the mini8 suite (or micro for ``micro-lora``): the same pretrained backbone, frozen
heads and data splits. Per task, LoRA adapters (``mergebench.lora``: rank ``rank``, ``alpha``,
on ``attn.in_proj`` (the fused q/k/v weight), ``attn.out_proj``, ``mlp.c_fc`` and ``mlp.c_proj``
of every resblock; nothing else trains) are fitted with mini8's fine-tuning routine
(``mini8._train``: cosine classifier against the frozen head, AdamW with mini8's weight decay,
warmup + cosine schedule, same batches) at LoRA's usual higher learning rate.

The suite's experts are full weights, ``pretrained + scale * B @ A``, so every method runs on it
unchanged; ``suite.lora_factors(task)`` (``ctx.lora_factors(task)``) gives the factors to the
methods that merge LoRA adapters as such (CoPA-Merging). Adapters are stored in PEFT's layout
(one folder per task, ``adapter_config.json`` + ``adapter_model.safetensors``) under
``$MERGEBENCH_CACHE/mini8-lora/<key>``, the key covering the mini8 build, the LoRA settings and
this code, so a second load builds nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mergebench import lora
from mergebench.io import atomic_write_text, cache_root, file_sha256
from mergebench.models import build_encoder, load_weights
from mergebench.suites import artifact
from mergebench.suites.base import Suite
from mergebench.suites.mini8 import CONFIGS as MINI8_CONFIGS
from mergebench.suites.mini8 import _train, build_jobs, load_mini8, parallel_map


@dataclass(frozen=True)
class LoraConfig:
    base: str = "mini8"        # the mini8 configuration whose backbone, heads and data are used
    rank: int = 8
    alpha: float = 16.0        # scale alpha / r = 2, LLaVA's LoRA convention (r=128, alpha=256)
    epochs: int = 10           # mini8's fine-tuning epochs (CONFIGS['mini8'].finetune_epochs)
    lr: float = 1e-3           # LoRA's usual higher rate (mini8 fine-tunes fully at 1.5e-4, micro at 1e-3)

    def key(self, base_key: str) -> str:
        h = hashlib.sha256(json.dumps({"base": base_key, **dataclasses.asdict(self)}, sort_keys=True).encode())
        for module in (lora, __import__(__name__, fromlist=["_"])):
            h.update(Path(module.__file__).read_bytes())
        return h.hexdigest()[:16]


CONFIGS = {
    "mini8-lora": LoraConfig(),
    "micro-lora": LoraConfig(base="micro", rank=2, alpha=4.0, epochs=2, lr=1e-2),
}


def _base_identity(base: Suite) -> str:
    """The identity of the base suite as committed (its artifact's, with the committed data), which a LoRA artifact
    names: the same on machines whose generators draw other bytes."""
    return base.info.get("artifact_identity", base.info["cache_key"])


def load_mini8_lora(config: str | LoraConfig = "mini8-lora", build: bool = True, verbose: bool = True) -> Suite:
    """The mini8 (or micro) suite with LoRA experts, built on first use and cached."""
    cfg = CONFIGS[config] if isinstance(config, str) else config
    name = config if isinstance(config, str) else f"{cfg.base}-lora-custom"
    base = load_mini8(cfg.base, build=build, verbose=verbose)
    if isinstance(config, str) and artifact.exists(config):  # the committed adapters, checked file by file
        meta = artifact.read(config)
        base_artifact = _base_identity(base)
        if meta["config"] != dataclasses.asdict(cfg) or meta["base"] != base_artifact:
            raise artifact.ArtifactError(
                f"the committed {config} artifact was built from LoRA settings {meta['config']} on base "
                f"{meta['base']}, the code asks for {dataclasses.asdict(cfg)} on base {base_artifact}; "
                f"rebuild it with `make {config}-artifact`")
        root = artifact.path(config)
        meta = {**meta, "sha256": {k: v for k, v in meta["files"].items() if k.startswith("adapters/")}}
        key = base.info["cache_key"] + "+" + artifact.identity(meta)  # the base's identity: its data on this machine
    else:
        root = cache_root() / "mini8-lora" / cfg.key(base.info["cache_key"])
        if not (root / "meta.json").exists():
            if not build:
                raise FileNotFoundError(f"{name} is not built in {root}; run `mergebench build {name}` first")
            _build(cfg, base, root, verbose)
        meta = json.loads((root / "meta.json").read_text())
        key = f"{base.info['cache_key']}+lora-{cfg.key(base.info['cache_key'])}"
    reference = dict(base.pretrained)

    def load_lora(task: str) -> dict:
        return lora.read_peft(root / "adapters" / task, reference)

    def load_expert(task: str):
        return lora.apply_lora(base.pretrained, load_lora(task))

    targets = ", ".join(lora.OPEN_CLIP_TARGETS)
    info = {**base.info, "suite": name, "cache_key": key,
            "checkpoints": {**{k: v for k, v in base.info["checkpoints"].items() if not k.startswith("experts/")},
                            **meta["sha256"]},
            "experts": f"LoRA r={cfg.rank} alpha={cfg.alpha:g} on {targets} of every resblock (PEFT layout); "
                       f"{cfg.epochs} epochs at lr {cfg.lr:g}",
            "lora": dataclasses.asdict(cfg), "build": {**base.info["build"], "lora": meta["build"]}}
    return Suite(name=name, tasks=list(base.tasks), encoder_config=dict(base.encoder_config),
                 pretrained=base.pretrained, heads=base.heads, data=base.data, load_expert=load_expert,
                 mean=base.mean, std=base.std, info=info, load_lora=load_lora)


def _build(cfg: LoraConfig, base: Suite, root: Path, verbose: bool, jobs: int | None = None):
    t0 = time.perf_counter()
    log = print if verbose else (lambda *a, **k: None)
    log(f"building {cfg.base}-lora LoRA experts into {root} (once; cached afterwards)")
    jobs = build_jobs(jobs, len(base.tasks))
    train = {task: base.split("train", task) for task in base.tasks}
    runs = [(cfg, MINI8_CONFIGS[cfg.base], base.encoder_config, dict(base.pretrained), base.heads[task],
             train[task].images, train[task].labels, i, task, root / "adapters" / task)
            for i, task in enumerate(base.tasks)]
    if jobs > 1:
        log(f"fitting {len(runs)} adapters in {jobs} processes of {torch.get_num_threads()} thread(s) each")
    files = dict(parallel_map(_fit_adapter, [(*run, verbose and jobs == 1) for run in runs], jobs,
                              lambda file: jobs > 1 and log(f"{file[0].split('/')[1]}: done")))
    meta = {"config": dataclasses.asdict(cfg), "sha256": files,
            "build": {"total_s": round(time.perf_counter() - t0, 1), "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "jobs": jobs}}
    atomic_write_text(root / "meta.json", json.dumps(meta, indent=1))  # written last: marks the build complete
    log(f"{cfg.base}-lora built in {meta['build']['total_s']} s")


def _fit_adapter(cfg: LoraConfig, mini8_cfg, encoder_config, pretrained, head, images, labels, index, task, folder,
                 verbose):
    """One task's adapters, fitted on its training split and saved (PEFT layout) in ``folder``; returns the
    adapter file's relative path and sha256. Seeded per task: the same bytes in turn or in parallel."""
    torch.manual_seed(mini8_cfg.seed)
    g = torch.Generator().manual_seed(mini8_cfg.seed * 1000 + index)
    encoder = load_weights(build_encoder(encoder_config), pretrained)
    model = lora.LoraEncoder(encoder, cfg.rank, cfg.alpha, encoder_config["layers"], g)
    _train(model, head, images, labels, cfg.epochs, cfg.lr, mini8_cfg, f"LoRA {task}", verbose)
    lora.save_peft(folder, model.factors(), cfg.rank, cfg.alpha, base_model=f"mergebench {cfg.base} pretrained")
    return f"adapters/{task}/adapter_model.safetensors", file_sha256(folder / "adapter_model.safetensors")


def build_artifact(name: str = "mini8-lora", verbose: bool = True, jobs: int | None = None) -> Path:
    """Train ``CONFIGS[name]``'s adapters on the committed base artifact (in a temporary cache) and store them as the
    committed artifact ``bench/suites/artifacts/<name>`` (PEFT folders as written, sha256 in ``suite.json``)."""
    import tempfile

    cfg = CONFIGS[name]
    base = load_mini8(cfg.base, verbose=verbose)
    with tempfile.TemporaryDirectory(prefix="mergebench-artifact-") as tmp:
        root = Path(tmp) / "lora"
        _build(cfg, base, root, verbose, jobs)
        copies = {p.relative_to(root).as_posix(): p for p in (root / "adapters").rglob("*") if p.is_file()}
        built = json.loads((root / "meta.json").read_text())["build"]
        return artifact.write(name, {}, {"suite": name, "config": dataclasses.asdict(cfg),
                                         "base": _base_identity(base),
                                         "build": {**built, "command": f"make {name}-artifact"}}, copies=copies)
