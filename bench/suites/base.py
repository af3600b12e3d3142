"""The Suite: what is merged (backbone, experts, heads) and the data it is judged on.

Both suites (mini8 and real) return this one object, so every method and measurement runs
through the same code path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Mapping

import torch
from torch import Tensor

from mergebench.errors import MergebenchError, NotFoundError
from mergebench.api.models import LOGIT_SCALE, ClassificationHead, build_encoder, load_weights
from mergebench.api.weights import Weights
from mergebench.api.catalog import close_matches

SPLITS = ("train", "val", "test")


class NoLoraExpertsError(MergebenchError, ValueError):
    """A method needs LoRA factors but the suite's experts are full fine-tuned weights."""


@dataclass
class TaskData:
    """Images stored once, preprocessed to uint8 (N, 3, H, W), and their integer labels (``None`` in the worker
    of a method that declared no labels: :mod:`mergebench.engine.worker`)."""

    images: Tensor
    labels: Tensor | None
    read_only: bool = False  # images in a read-only memory map (the real suite's cache): the OS refuses writes
    file: str | None = None  # that memory map's .npy file (a worker maps the same file)

    def __len__(self):
        return len(self.images)


@dataclass
class Suite:
    name: str
    tasks: list[str]
    encoder_config: dict
    pretrained: Weights
    heads: dict[str, Tensor]                       # task -> (classes, embed_dim) class embeddings
    data: dict[str, dict[str, TaskData]]           # split -> task -> data
    load_expert: Callable[[str], Weights]
    mean: tuple = (0.5, 0.5, 0.5)
    std: tuple = (0.5, 0.5, 0.5)
    info: dict = field(default_factory=dict)       # ids and hashes that go into every record
    load_lora: Callable[[str], dict] | None = None  # LoRA experts: task -> {adapter: mergebench.api.lora.LoraFactor}
    # loads this suite again from its files (``get_suite`` sets it; picklable): restores it after a method changed
    # its inputs, and rebuilds it in a fresh process (a time-limited run on CUDA)
    reload: Callable[[], "Suite"] | None = None
    logit_scale: float = LOGIT_SCALE  # the heads' s: logits = s * cos(features, class vector)
    provides: frozenset = frozenset()  # requirements it meets beyond full weights (keys of registry.REQUIREMENTS)
    _norm: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # device -> (mean, std)

    def __post_init__(self):
        self._expert = lru_cache(maxsize=None)(self.load_expert)
        self._lora = lru_cache(maxsize=None)(self.load_lora) if self.load_lora else None

    def expert_weights(self, task: str) -> Weights:
        self._check_task(task)
        return self._expert(task)

    @property
    def has_lora(self) -> bool:
        """Whether every expert is a LoRA adapter whose factors the suite can give (``lora_factors``)."""
        return self.load_lora is not None

    @property
    def capabilities(self) -> frozenset:
        """The method requirements this suite meets (``register_method(requires=...)``): ``provides``, and
        ``"lora"`` when its experts are LoRA adapters with factors."""
        return frozenset(self.provides) | ({"lora"} if self.has_lora else set())

    def meets(self, requirement: str) -> bool:
        return requirement in self.capabilities

    def lora_factors(self, task: str) -> dict:
        """{adapter name: LoraFactor} of ``task``'s LoRA expert (its weights are pretrained + scale * B @ A)."""
        self._check_task(task)
        if self.load_lora is None:
            raise NoLoraExpertsError(f"suite {self.name!r} has no LoRA experts (full fine-tuned checkpoints); "
                                     f"LoRA factors come from mini8-lora, micro-lora or PEFT adapters in a real-suite "
                                     f"manifest")
        return self._lora(task)

    def build_encoder(self, weights: Mapping[str, Tensor] | None = None):
        """A fresh encoder holding ``weights`` (the pretrained ones by default)."""
        return load_weights(build_encoder(self.encoder_config), self.pretrained if weights is None else weights)

    def head(self, task: str) -> ClassificationHead:
        self._check_task(task)
        return ClassificationHead(self.heads[task], self.logit_scale)

    def split(self, split: str, task: str) -> TaskData:
        if split not in self.data:
            raise NotFoundError(f"suite {self.name!r} has no split {split!r}; it has {sorted(self.data)}")
        self._check_task(task)
        return self.data[split][task]

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 images -> float, normalized on the images' device (batched, no per-image work)."""
        if images.device not in self._norm:  # made once per device (no host-to-device copy per batch)
            self._norm[images.device] = (torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1),
                                         torch.tensor(self.std, device=images.device).view(1, 3, 1, 1))
        mean, std = self._norm[images.device]
        return images.to(torch.float32, copy=True).div_(255.0).sub_(mean).div_(std)  # (x / 255 - mean) / std

    def _check_task(self, task: str):
        if task not in self.tasks:
            raise NotFoundError(f"suite {self.name!r} has no task {task!r}{close_matches(task, self.tasks)}")
