"""mini8's frozen configurations: the settings its committed artifacts were built from (``suite.json`` stores them
and every load checks them; docs/mini8.md says how each value was chosen)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import torch

from mergebench.suites.mini8 import tasks


@dataclass(frozen=True)
class Mini8Config:
    seed: int = 0
    encoder: dict = field(default_factory=lambda: dict(
        image_size=32, patch_size=8, width=128, layers=6, heads=4, mlp_ratio=4.0, output_dim=128))
    tasks: tuple = tuple(t.name for t in tasks.TASKS)
    n_train: int = 2000
    n_val: int = 500
    n_test: int = 1000
    # pretraining: a cosine classifier over one joint label space (a generic shape task plus each task's generator
    # under seeds disjoint from the benchmark's splits)
    pretrain_per_task: int = 300
    # {task: n}: that task's number of pretraining images instead of pretrain_per_task
    pretrain_per_task_overrides: dict = field(default_factory=dict)
    pretrain_generic: int = 6000
    pretrain_epochs: int = 10
    pretrain_lr: float = 1e-3
    pretrain_label_smoothing: float = 0.0
    # the cosine classifier's logit scale s (logits = s * cos), in pretraining, fine-tuning and every use of the
    # heads (CLIP's learned scale is 100; a lower s leaves the zero-shot heads unsure off their training data)
    logit_scale: float = 100.0
    # Pretraining's view of the eight tasks ("web" images differ from the benchmark's, as for CLIP): the tasks'
    # pretraining images are hue-rotated by an angle drawn in [1 - s, 1 + s] x 180 degrees (s = pretrain_hue_shift;
    # 0: the benchmark's colours), one angle per task ("task") or per image ("image")
    pretrain_hue_shift: float = 0.0
    pretrain_hue_per: str = "task"
    # {task: s}: that task's hue shift instead of pretrain_hue_shift (0: shown in the benchmark's colours)
    pretrain_hue_overrides: dict = field(default_factory=dict)
    # experts: the whole encoder fine-tuned per task against its frozen head (the pretraining classifier's class
    # vectors of that task), AdamW with a warmup + cosine schedule
    finetune_epochs: int = 10
    finetune_lr: float = 1.5e-4
    batch_size: int = 128
    weight_decay: float = 0.1
    # AdamW's decoupled weight decay while fine-tuning the experts (None: weight_decay)
    finetune_weight_decay: float | None = None
    # dtype of the generators' drawing arithmetic and of the pretraining views' hue rotation: "float64" draws the
    # same bytes on every CPU measured, "float32" does not (docs/mini8.md)
    generator_dtype: str = "float32"

    def __post_init__(self):
        if self.pretrain_hue_per not in ("task", "image"):
            raise ValueError(f"Mini8Config.pretrain_hue_per={self.pretrain_hue_per!r}: use 'task' or 'image'")
        if self.generator_dtype not in ("float32", "float64"):
            raise ValueError(f"Mini8Config.generator_dtype={self.generator_dtype!r}: use 'float32' or 'float64'")
        known = {t.name for t in tasks.TASKS}
        for option in ("tasks", "pretrain_per_task_overrides", "pretrain_hue_overrides"):
            unknown = sorted(set(getattr(self, option)) - known)
            if unknown:
                raise ValueError(f"Mini8Config.{option} names {unknown}, not mini8 tasks ({sorted(known)})")

    @property
    def dtype(self) -> torch.dtype:
        """The generators' drawing dtype."""
        return getattr(torch, self.generator_dtype)

    def specs(self) -> list[tasks.TaskSpec]:
        by_name = {t.name: t for t in tasks.TASKS}
        return [by_name[t] for t in self.tasks]


CONFIGS = {
    # each pretraining image under its own hue rotation (signs in their true colours), more pretraining images of
    # the colour-defined tasks, 20 pretraining epochs; experts fine-tuned on 12,000 images per task
    "mini8": Mini8Config(
        pretrain_hue_shift=0.5, pretrain_hue_per="image", pretrain_hue_overrides={"signs": 0.0},
        pretrain_per_task_overrides={"scenes": 1500, "landcover": 1500, "signs": 300, "house_numbers": 1150,
                                     "vehicles": 800, "digits": 700, "aerial": 200, "textures": 500},
        pretrain_epochs=20, n_train=12000, finetune_epochs=10, generator_dtype="float64"),
    # seconds-fast build for tests: the same code path with fewer, smaller everything
    "micro": Mini8Config(
        encoder=dict(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2.0, output_dim=32),
        tasks=("digits", "textures", "signs"), n_train=96, n_val=32, n_test=64,
        pretrain_per_task=64, pretrain_generic=64, pretrain_epochs=1, finetune_epochs=2,
        finetune_lr=1e-3, batch_size=32),
}


def mini8_config_dict(cfg: Mini8Config) -> dict:
    """The configuration as JSON values (tuples as lists), as a record or an artifact's suite.json stores it."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def stored_config(stored: dict) -> dict:
    """A stored configuration (an artifact's suite.json) as :class:`Mini8Config` reads it today: a field it lacks,
    added to the class after it was written, at that field's default (the value the artifact was built with)."""
    return {**mini8_config_dict(Mini8Config()), **stored}


@dataclass(frozen=True)
class LoraConfig:
    """LoRA experts on a mini8 configuration's backbone, heads and data: adapters of rank ``rank`` (scale
    ``alpha / rank``) on every resblock's attention and MLP weights, fitted with mini8's fine-tuning routine."""
    base: str = "mini8"        # the mini8 configuration whose backbone, heads and data are used
    rank: int = 8
    alpha: float = 16.0        # scale alpha / r = 2, LLaVA's LoRA convention (r=128, alpha=256)
    epochs: int = 10           # mini8's fine-tuning epochs
    lr: float = 1e-3           # LoRA's usual higher rate (mini8 fine-tunes fully at 1.5e-4, micro at 1e-3)


LORA_CONFIGS = {
    "mini8-lora": LoraConfig(),
    "micro-lora": LoraConfig(base="micro", rank=2, alpha=4.0, epochs=2, lr=1e-2),
}
