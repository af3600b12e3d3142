"""Building mini8-lora's experts: per task, LoRA adapters on the base configuration's backbone fitted with mini8's
training routine against the frozen head, saved in PEFT's layout; ``build_artifact`` writes the committed artifact
that ``mergebench.suites.mini8.lora`` loads."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from mergebench.api import lora
from mergebench.build import artifact as artifact_writer
from mergebench.build.mini8 import build_jobs, parallel_map
from mergebench.build.train import train
from mergebench.engine.io import atomic_write_text, cache_root, file_sha256
from mergebench.api.lora import OPEN_CLIP_TARGETS, LoraFactor
from mergebench.api.models import build_encoder, load_weights
from mergebench.suites.base import Suite
from mergebench.suites.mini8 import lora as lora_suite_module
from mergebench.suites.mini8.config import CONFIGS, LORA_CONFIGS, LoraConfig, Mini8Config
from mergebench.suites.mini8.load import load_mini8
from mergebench.suites.mini8.lora import base_identity, load_built_lora


def open_clip_modules(layers: int) -> list[str]:
    """The adapted modules of an encoder with ``layers`` resblocks (open_clip names)."""
    return [f"transformer.resblocks.{i}.{m}" for i in range(layers) for m in OPEN_CLIP_TARGETS]


class LoraEncoder(nn.Module):
    """A frozen encoder whose adapted weights are ``W + scale * B @ A``; only A and B are parameters.

    Initialised as PEFT does (A Kaiming-uniform with a = sqrt(5), B zero), so it starts as the
    pretrained encoder.
    """

    def __init__(self, encoder: nn.Module, rank: int, alpha: float, layers: int, generator: torch.Generator):
        super().__init__()
        for p in encoder.parameters():
            p.requires_grad_(False)
        self._base = [encoder]  # a list: not a submodule, so parameters() are the factors only
        self.scale = alpha / rank
        self.names = open_clip_modules(layers)
        state = dict(encoder.named_parameters())
        self.A, self.B = nn.ParameterList(), nn.ParameterList()
        for name in self.names:
            out_f, in_f = state[self._target(name)].shape
            a = torch.empty(rank, in_f)
            bound = 1 / math.sqrt(in_f)  # kaiming_uniform_(a=sqrt(5)) on a (rank, in) matrix
            a.uniform_(-bound, bound, generator=generator)
            self.A.append(nn.Parameter(a))
            self.B.append(nn.Parameter(torch.zeros(out_f, rank)))

    @staticmethod
    def _target(name: str) -> str:
        prefix, module = name.rsplit(".", 2)[0], ".".join(name.rsplit(".", 2)[1:])
        return f"{prefix}.{OPEN_CLIP_TARGETS[module]}"

    def forward(self, x):
        base = self._base[0]
        params = dict(base.named_parameters())
        for name, a, b in zip(self.names, self.A, self.B):
            target = self._target(name)
            params[target] = params[target] + (b @ a) * self.scale
        return torch.func.functional_call(base, params, (x,))

    def train(self, mode: bool = True):
        super().train(mode)
        self._base[0].train(mode)
        return self

    def factors(self) -> dict[str, LoraFactor]:
        return {n: LoraFactor(self._target(n), a.detach().clone(), b.detach().clone(), self.scale)
                for n, a, b in zip(self.names, self.A, self.B)}


def key(cfg: LoraConfig, base_key: str) -> str:
    """Content address of a LoRA build: the base suite's identity, the settings and the source of this recipe and
    of the PEFT files' code."""
    h = hashlib.sha256(json.dumps({"base": base_key, **dataclasses.asdict(cfg)}, sort_keys=True).encode())
    for module in (lora, lora_suite_module, __import__(__name__, fromlist=["_"])):
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()[:16]


def load_or_build(cfg: LoraConfig, base: Suite, base_cfg: Mini8Config | None = None, build: bool = True,
                  verbose: bool = True, jobs: int | None = None, name: str | None = None) -> Suite:
    """``base`` (built from ``base_cfg``, default ``CONFIGS[cfg.base]``) with LoRA experts of settings ``cfg``, built
    on first use into ``$MERGEBENCH_CACHE/mini8-lora/<key>`` and loaded from there afterwards."""
    name = name or f"{cfg.base}-lora-custom"
    root = cache_root() / "mini8-lora" / key(cfg, base.info["cache_key"])
    if not (root / "meta.json").exists():
        if not build:
            raise FileNotFoundError(f"{name} is not built in {root}; build it with "
                                    f"mergebench.build.mini8_lora.load_or_build(cfg, base)")
        build_into(cfg, base, root, verbose, jobs, base_cfg)
    return load_built_lora(cfg, base, root, name)


def build_into(cfg: LoraConfig, base: Suite, root: Path, verbose: bool, jobs: int | None = None,
               base_cfg: Mini8Config | None = None):
    t0 = time.perf_counter()
    log = print if verbose else (lambda *a, **k: None)
    log(f"building {cfg.base}-lora LoRA experts into {root} (once; cached afterwards)")
    jobs = build_jobs(jobs, len(base.tasks))
    train_split = {task: base.split("train", task) for task in base.tasks}
    runs = [(cfg, base_cfg or CONFIGS[cfg.base], base.encoder_config, dict(base.pretrained), base.heads[task],
             train_split[task].images, train_split[task].labels, i, task, root / "adapters" / task)
            for i, task in enumerate(base.tasks)]
    if jobs > 1:
        log(f"fitting {len(runs)} adapters in {jobs} processes of {torch.get_num_threads()} thread(s) each")
    files = dict(parallel_map(fit_adapter, [(*run, verbose and jobs == 1) for run in runs], jobs,
                              lambda file: jobs > 1 and log(f"{file[0].split('/')[1]}: done")))
    meta = {"config": dataclasses.asdict(cfg), "sha256": files,
            "build": {"total_s": round(time.perf_counter() - t0, 1), "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "jobs": jobs}}
    atomic_write_text(root / "meta.json", json.dumps(meta, indent=1))  # written last: marks the build complete
    log(f"{cfg.base}-lora built in {meta['build']['total_s']} s")


def fit_adapter(cfg: LoraConfig, mini8_cfg, encoder_config, pretrained, head, images, labels, index, task, folder,
                verbose):
    """One task's adapters, fitted on its training split and saved (PEFT layout) in ``folder``; returns the
    adapter file's relative path and sha256. Seeded per task: the same bytes in turn or in parallel."""
    torch.manual_seed(mini8_cfg.seed)
    g = torch.Generator().manual_seed(mini8_cfg.seed * 1000 + index)
    encoder = load_weights(build_encoder(encoder_config), pretrained)
    model = LoraEncoder(encoder, cfg.rank, cfg.alpha, encoder_config["layers"], g)
    train(model, head, images, labels, cfg.epochs, cfg.lr, mini8_cfg, f"LoRA {task}", verbose)
    lora.save_peft(folder, model.factors(), cfg.rank, cfg.alpha, base_model=f"mergebench {cfg.base} pretrained")
    return f"adapters/{task}/adapter_model.safetensors", file_sha256(folder / "adapter_model.safetensors")


def build_artifact(name: str = "mini8-lora", verbose: bool = True, jobs: int | None = None) -> Path:
    """Train ``LORA_CONFIGS[name]``'s adapters on the committed base artifact (in a temporary cache) and store them
    as the committed artifact ``bench/suites/artifacts/<name>`` (PEFT folders as written, sha256 in
    ``suite.json``)."""
    cfg = LORA_CONFIGS[name]
    base = load_mini8(cfg.base)
    with tempfile.TemporaryDirectory(prefix="mergebench-artifact-") as tmp:
        root = Path(tmp) / "lora"
        build_into(cfg, base, root, verbose, jobs)
        copies = {p.relative_to(root).as_posix(): p for p in (root / "adapters").rglob("*") if p.is_file()}
        built = json.loads((root / "meta.json").read_text())["build"]
        return artifact_writer.write(name, {}, {"suite": name, "config": dataclasses.asdict(cfg),
                                                "base": base_identity(base),
                                                "build": {**built, "command": f"make {name}-artifact"}},
                                     copies=copies)
