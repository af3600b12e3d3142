"""The preprocessing cache: every image decoded, resized and center-cropped once, stored as uint8.

Layout: ``$MERGEBENCH_CACHE/real/data/<dataset>/<key>/<split>.{images,labels}.npy`` and
``<split>.meta.json`` (written last: it marks that split complete). Each split is built on first
use only, so a run caches what it touches: the test split always (evaluation), train and val only
for methods that ask for them (and ``--tune``). Images are ``(N, 3, S, S)`` uint8 arrays opened
memory-mapped, so evaluation pages them in from disk (or the page cache) and never decodes a JPEG
again. The preprocessing is open_clip's evaluation transform without its normalization: resize the
shorter side to S (bicubic), center crop S x S, RGB. Normalization happens in batches on the
device (``Suite.normalize``). An entry written as one piece by earlier versions (one ``meta.json``
for all three splits) is read as it is.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import CenterCrop, InterpolationMode, Resize

from mergebench.engine.io import atomic_write_text, cache_root, raise_if_disk_full
from mergebench.engine.progress import progress
from mergebench.suites.base import SPLITS, TaskData
from mergebench.suites.real.cards import (
    Card, DatasetError, open_source, protocol_sizes, source_id, split_specs, val_partition,
)

CACHE_VERSION = 1  # bump when the preprocessing changes


def preprocess(image, size: int) -> np.ndarray:
    """RGB PIL image -> (3, size, size) uint8: shorter side to ``size`` (bicubic), center crop."""
    image = CenterCrop(size)(Resize(size, interpolation=InterpolationMode.BICUBIC)(image.convert("RGB")))
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


def cache_key(card: Card, root: str | os.PathLike, size: int) -> str:
    payload = {"card": card.digest(), "root": str(Path(root).resolve()), "size": size, "version": CACHE_VERSION,
               "transform": "resize-shorter-bicubic+center-crop"}
    source = source_id(card, root)
    if source:  # read from a Hugging Face dataset (and which commit of it), not the card's own layout
        payload["source"] = source
    specs = split_specs(card, root)
    if specs != card.splits:  # that copy's own splits (EuroSAT's val carved from train)
        payload["splits"] = specs
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir(card: Card, root, size: int) -> Path:
    return cache_root() / "real" / "data" / card.name / cache_key(card, root, size)


def _done(directory: Path, split: str) -> bool:
    return (directory / f"{split}.meta.json").exists() or (directory / "meta.json").exists()


def _open(directory: Path, split: str) -> TaskData:
    # a read-only map, paged in lazily: no method can change the images (a write is refused by the OS)
    images = np.load(directory / f"{split}.images.npy", mmap_mode="r")
    labels = np.load(directory / f"{split}.labels.npy")
    with warnings.catch_warnings():  # torch warns that it cannot mark a tensor read-only; the map is
        warnings.simplefilter("ignore", UserWarning)
        return TaskData(torch.from_numpy(images), torch.from_numpy(labels), read_only=True,
                        file=str(directory / f"{split}.images.npy"))


def load_or_build(card: Card, root: str | os.PathLike, size: int, workers: int | None = None,
                  verbose: bool = True, splits=SPLITS) -> dict[str, TaskData]:
    """{split: TaskData} of ``card`` for ``splits``, each preprocessed once into the cache, memory-mapped afterwards."""
    directory = cache_dir(card, root, size)
    missing = [s for s in splits if not _done(directory, s)]
    if missing:
        build(card, root, size, directory, workers, verbose, splits=missing)
    return {split: _open(directory, split) for split in splits}


def cached_splits(card: Card, root, size: int) -> list[str]:
    directory = cache_dir(card, root, size)
    return [s for s in SPLITS if _done(directory, s)]


def _plan(card: Card, root, splits=SPLITS) -> dict[str, tuple]:
    """split -> (source, indices into the source) following the card's protocol; only the sources ``splits`` read
    are opened."""
    sources: dict = {}

    def source(name):
        if name not in sources:
            sources[name] = open_source(card, root, name)
        return sources[name]

    plan = {}
    specs = split_specs(card, root)
    for split in splits:
        spec = specs[split]
        if "from" in spec:  # carved: val from train
            src = source(spec["from"])
            plan[split] = (src, np.sort(val_partition(len(src), spec)[1]))
            continue
        src = source(spec["source"])
        carving = next((c for c in specs.values() if c.get("from") == spec["source"]), None)
        # what another split was carved from keeps the rest
        idx = np.sort(val_partition(len(src), carving)[0]) if carving else np.arange(len(src))
        plan[split] = (src, idx)
    return plan


def split_bytes(images: int, size: int) -> int:
    """Bytes one cached split takes: uint8 (3, size, size) images and int64 labels (plus the .npy headers)."""
    return images * (3 * size * size + 8) + 2 * 128


def space(card: Card, root, size: int, source_sizes: dict[str, int] | None = None, unavailable=()) -> dict:
    """What ``data prepare`` (and a first run) will write for ``card``: images and bytes per split, and which splits
    are cached already. Sizes from the files on disk when counted, else the card's protocol sizes; ``unavailable``
    splits (not in the data, e.g. a Hugging Face dataset without a val split) have none."""
    counted = protocol_sizes(card, root, source_sizes or {})
    sizes = {s: None if s in unavailable else counted.get(s, (card.sizes or {}).get(s)) for s in SPLITS}
    done = set(cached_splits(card, root, size))
    return {"size": size, "splits": {s: {"images": n, "bytes": split_bytes(n, size) if n is not None else None,
                                         "cached": s in done, "counted": s in counted,
                                         "available": s not in unavailable} for s, n in sizes.items()}}


def reserve(path: Path) -> None:
    """Allocate the whole (sparse) file now, so that a full filesystem is an error here rather than a bus error
    when the memory map is written."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
    except AttributeError:  # no posix_fallocate on this platform
        pass
    finally:
        os.close(fd)


def build(card: Card, root, size: int, directory: Path, workers: int | None = None, verbose: bool = True,
          splits=SPLITS):
    """Preprocess ``splits`` into ``directory``: each split's files are written under temporary names and renamed;
    its ``<split>.meta.json`` comes last, so a killed build leaves nothing that reads as complete."""
    start = time.perf_counter()
    plan = _plan(card, root, splits)
    directory.mkdir(parents=True, exist_ok=True)
    workers = workers or min(8, os.cpu_count() or 1)
    tag = f"{os.getpid()}.tmp"
    for split in splits:
        source, idx = plan[split]
        labels = source.labels[idx].astype(np.int64)
        if len(labels) and (labels.min() < 0 or labels.max() >= card.num_classes):
            raise DatasetError(f"{card.name}/{split}: label {int(labels.max())} outside the card's {card.num_classes} "
                             f"classes")
        tmp_images, tmp_labels = directory / f".{split}.images.npy.{tag}", directory / f".{split}.labels.npy.{tag}"
        try:
            images = np.lib.format.open_memmap(tmp_images, mode="w+", dtype=np.uint8, shape=(len(idx), 3, size, size))
            reserve(tmp_images)
            bar = progress(total=len(idx), desc=f"preprocess {card.name}/{split}", disable=not verbose)

            def one(j, images=images, source=source, idx=idx):
                images[j] = preprocess(source.image(int(idx[j])), size)

            with ThreadPoolExecutor(workers) as pool:
                for _ in pool.map(one, range(len(idx)), chunksize=64):
                    bar.update(1)
            bar.close()
            images.flush()
            del images
            with open(tmp_labels, "wb") as f:
                np.save(f, labels)
            os.replace(tmp_images, directory / f"{split}.images.npy")
            os.replace(tmp_labels, directory / f"{split}.labels.npy")
        except BaseException as e:
            tmp_images.unlink(missing_ok=True)
            tmp_labels.unlink(missing_ok=True)
            raise_if_disk_full(e, directory / f"{split}.images.npy")
            raise
        meta = {"dataset": card.name, "split": split, "size": size, "images": int(len(idx)),
                "root": str(Path(root).resolve()), "card": str(card.path), "card_digest": card.digest(),
                "source": getattr(source, "description", None), "version": CACHE_VERSION,
                "seconds": round(time.perf_counter() - start, 1)}
        atomic_write_text(directory / f"{split}.meta.json", json.dumps(meta, indent=1))
        start = time.perf_counter()
    return directory


class LazyTasks(dict):
    """task -> TaskData of one split, building (or memory-mapping) that split's cache on first access:
    ``loader(task, split)``."""

    def __init__(self, split: str, tasks: list[str], loader):
        super().__init__()
        self.split, self.tasks, self.loader = split, list(tasks), loader

    def __missing__(self, task):
        if task not in self.tasks:
            raise KeyError(task)
        value = self.loader(task, self.split)
        self[task] = value
        return value

    def __contains__(self, task):
        return task in self.tasks
