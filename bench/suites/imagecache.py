"""The preprocessing cache: every image decoded, resized and center-cropped once, stored as uint8.

Layout: ``$MERGEBENCH_CACHE/real/data/<dataset>/<key>/{train,val,test}.{images,labels}.npy`` and
``meta.json`` (written last: it marks the entry complete). Images are ``(N, 3, S, S)`` uint8 arrays
opened memory-mapped, so evaluation pages them in from disk (or the page cache) and never
decodes a JPEG again. The preprocessing is open_clip's evaluation transform without its
normalization: resize the shorter side to S (bicubic), center crop S x S, RGB. Normalization
happens in batches on the device (``Suite.normalize``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from mergebench.io import atomic_write_text, cache_root
from mergebench.progress import progress
from mergebench.suites.base import SPLITS, TaskData
from mergebench.suites.cards import Card, open_source, val_partition

CACHE_VERSION = 1  # bump when the preprocessing changes


def preprocess(image, size: int) -> np.ndarray:
    """RGB PIL image -> (3, size, size) uint8: shorter side to ``size`` (bicubic), center crop."""
    from torchvision.transforms import CenterCrop, InterpolationMode, Resize

    image = CenterCrop(size)(Resize(size, interpolation=InterpolationMode.BICUBIC)(image.convert("RGB")))
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


def cache_key(card: Card, root: str | os.PathLike, size: int) -> str:
    payload = {"card": card.digest(), "root": str(Path(root).resolve()), "size": size, "version": CACHE_VERSION,
               "transform": "resize-shorter-bicubic+center-crop"}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir(card: Card, root, size: int) -> Path:
    return cache_root() / "real" / "data" / card.name / cache_key(card, root, size)


def _open(directory: Path) -> dict[str, TaskData]:
    out = {}
    for split in SPLITS:
        images = np.load(directory / f"{split}.images.npy", mmap_mode="c")  # copy-on-write map: writable, lazy
        labels = np.load(directory / f"{split}.labels.npy")
        out[split] = TaskData(torch.from_numpy(images), torch.from_numpy(labels))
    return out


def load_or_build(card: Card, root: str | os.PathLike, size: int, workers: int | None = None,
                  verbose: bool = True) -> dict[str, TaskData]:
    """{split: TaskData} of ``card``, preprocessed once into the cache and memory-mapped afterwards."""
    directory = cache_dir(card, root, size)
    if not (directory / "meta.json").exists():
        build(card, root, size, directory, workers, verbose)
    return _open(directory)


def _plan(card: Card, root) -> dict[str, tuple]:
    """split -> (source, indices into the source) following the card's protocol."""
    sources, plan = {}, {}
    for split in SPLITS:
        spec = card.splits[split]
        src_name = spec.get("source") or spec["from"]
        if src_name not in sources:
            sources[src_name] = open_source(card, root, src_name)
    for split in SPLITS:
        spec = card.splits[split]
        if "from" in spec:  # carved: val from train, and the rest of train stays train
            tr, va = val_partition(len(sources[spec["from"]]), spec)
            plan[split] = (sources[spec["from"]], np.sort(va))
            plan["train"] = (sources[spec["from"]], np.sort(tr))
    for split in SPLITS:
        if split not in plan:
            src = sources[card.splits[split]["source"]]
            plan[split] = (src, np.arange(len(src)))
    return plan


def build(card: Card, root, size: int, directory: Path, workers: int | None = None, verbose: bool = True):
    start = time.perf_counter()
    plan = _plan(card, root)
    tmp = directory.with_name(f".{directory.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    workers = workers or min(8, os.cpu_count() or 1)
    sizes = {}
    try:
        for split in SPLITS:
            source, idx = plan[split]
            images = np.lib.format.open_memmap(tmp / f"{split}.images.npy", mode="w+", dtype=np.uint8,
                                               shape=(len(idx), 3, size, size))
            bar = progress(total=len(idx), desc=f"preprocess {card.name}/{split}", disable=not verbose)

            def one(j, images=images, source=source, idx=idx):
                images[j] = preprocess(source.image(int(idx[j])), size)

            with ThreadPoolExecutor(workers) as pool:
                for _ in pool.map(one, range(len(idx)), chunksize=64):
                    bar.update(1)
            bar.close()
            images.flush()
            del images
            np.save(tmp / f"{split}.labels.npy", source.labels[idx].astype(np.int64))
            labels = source.labels[idx]
            if len(labels) and (labels.min() < 0 or labels.max() >= card.num_classes):
                raise ValueError(f"{card.name}/{split}: label {int(labels.max())} outside the card's {card.num_classes} classes")
            sizes[split] = int(len(idx))
        meta = {"dataset": card.name, "size": size, "sizes": sizes, "root": str(Path(root).resolve()),
                "card": str(card.path), "card_digest": card.digest(), "version": CACHE_VERSION,
                "seconds": round(time.perf_counter() - start, 1)}
        atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=1))
        if directory.exists():  # another process finished first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            directory.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


class LazyTasks(dict):
    """task -> TaskData of one split, building (or memory-mapping) a dataset's cache on first access."""

    def __init__(self, split: str, tasks: list[str], loader):
        super().__init__()
        self.split, self.tasks, self.loader = split, list(tasks), loader

    def __missing__(self, task):
        if task not in self.tasks:
            raise KeyError(task)
        value = self.loader(task)[self.split]
        self[task] = value
        return value

    def __contains__(self, task):
        return task in self.tasks
