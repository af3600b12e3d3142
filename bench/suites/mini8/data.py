"""mini8's data splits, drawn by the task generators from the configuration's seeds."""

from __future__ import annotations

import hashlib

import torch

from mergebench.engine.progress import progress
from mergebench.suites.base import SPLITS
from mergebench.suites.mini8 import tasks
from mergebench.suites.mini8.config import Mini8Config


def split_seed(cfg: Mini8Config, task_index: int, split_index: int) -> int:
    """The seed of one task's split: disjoint per task and split (pretraining samples use yet other seeds)."""
    return cfg.seed * 1000 + 10 * task_index + split_index


def generate_split(cfg: Mini8Config, task: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One task's split, exactly as :func:`generate_data` draws it."""
    sizes = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}
    i, spec = next((i, s) for i, s in enumerate(cfg.specs()) if s.name == task)
    return tasks.generate(spec, sizes[split], seed=split_seed(cfg, i, SPLITS.index(split)), dtype=cfg.dtype)


def generate_data(cfg: Mini8Config) -> dict[str, torch.Tensor]:
    """The benchmark splits, ``{split}/{task}/images|labels``."""
    data = {}
    specs = cfg.specs()
    with progress(total=len(specs) * len(SPLITS), desc="generating the data (once per machine)", unit="split") as bar:
        for spec in specs:
            for split in SPLITS:
                bar.set_postfix_str(f"{spec.name}/{split}", refresh=False)
                data[f"{split}/{spec.name}/images"], data[f"{split}/{spec.name}/labels"] = \
                    generate_split(cfg, spec.name, split)
                bar.update(1)
    return data


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of named tensors' names, dtypes, shapes and bytes, in name order (independent of file layout)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
