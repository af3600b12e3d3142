"""Dataset cards (``datasets/*.yaml``) and the readers of the on-disk layouts they name.

A card states a dataset's class names, prompt templates (the task-vectors set), the layout it is
read from (relative to a data root), how train / val / test are made and the expected sizes.
Nothing here downloads: a missing file is an error that says what is missing and how to get it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

CARD_DIR_ENV = "MERGEBENCH_CARDS"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# The task order of the task-vectors paper (and of every merging paper since).
REAL_TASKS = ("SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD")


class DatasetMissingError(FileNotFoundError):
    """A dataset (or part of it) is not on disk; the message says what and how to get it."""


def card_dir() -> Path:
    if os.environ.get(CARD_DIR_ENV):
        return Path(os.environ[CARD_DIR_ENV])
    return Path(__file__).resolve().parents[2] / "datasets"


@dataclass
class Card:
    name: str
    classnames: list[str]
    templates: list[str]
    template_set: str
    layout: dict
    splits: dict
    sizes: dict
    checksums: dict
    how_to_get: str
    aliases: list[str] = field(default_factory=list)
    path: Path | None = None
    raw: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def prompts(self, classname: str) -> list[str]:
        return [t.replace("{c}", classname) for t in self.templates]

    def digest(self) -> str:
        """Hash of what the heads and the data depend on (class names, templates, layout, splits)."""
        payload = yaml.safe_dump({"c": self.classnames, "t": self.templates, "l": self.layout, "s": self.splits},
                                 sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def load_card(path: str | os.PathLike) -> Card:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"dataset card {path} is not valid YAML: {e}") from e
    for key in ("name", "classnames", "templates", "layout", "splits"):
        if key not in (raw or {}):
            raise ValueError(f"dataset card {path} lacks the field {key!r}")
    names = raw["classnames"]["list"]
    if raw["classnames"].get("count", len(names)) != len(names):
        raise ValueError(f"dataset card {path}: classnames.count is {raw['classnames']['count']} but the list has {len(names)}")
    templates = raw["templates"]["list"]
    bad = [t for t in templates if "{c}" not in t]
    if bad:
        raise ValueError(f"dataset card {path}: template {bad[0]!r} has no '{{c}}' placeholder")
    return Card(name=raw["name"], classnames=[str(n) for n in names], templates=list(templates),
                template_set=raw["templates"].get("set", "?"), layout=raw["layout"], splits=raw["splits"],
                sizes=raw.get("sizes", {}), checksums=raw.get("checksums", {}), how_to_get=raw.get("how_to_get", ""),
                aliases=list(raw.get("aliases", [])), path=path, raw=raw)


def load_cards(directory: str | os.PathLike | None = None) -> dict[str, Card]:
    directory = Path(directory or card_dir())
    cards = {}
    for p in sorted(directory.glob("*.yaml")):
        raw = yaml.safe_load(p.read_text()) or {}
        if "classnames" not in raw:  # other data files (reference results) live beside the cards
            continue
        card = load_card(p)
        cards[card.name] = card
    if not cards:
        raise FileNotFoundError(f"no dataset cards in {directory}")
    return cards


def resolve_task(name: str, cards: dict[str, Card]) -> Card:
    for card in cards.values():
        if name == card.name or name.lower() in {a.lower() for a in card.aliases} | {card.name.lower()}:
            return card
    from mergebench.registry import close_matches
    raise KeyError(f"no dataset card for task {name!r}{close_matches(name, list(cards))} (cards: {', '.join(cards)})")


# ------------------------------------------------------------------ sources (one split as stored on disk)
class Source:
    """One stored split: ``len``, ``labels`` (int64 numpy) and ``image(i)`` -> RGB PIL image."""

    labels: np.ndarray

    def __len__(self):
        return len(self.labels)

    def image(self, i: int):  # pragma: no cover - interface
        raise NotImplementedError


class FileSource(Source):
    def __init__(self, samples: list[tuple[str, int]]):
        self.paths = [p for p, _ in samples]
        self.labels = np.asarray([y for _, y in samples], dtype=np.int64)

    def image(self, i):
        from PIL import Image
        with Image.open(self.paths[i]) as im:
            return im.convert("RGB")


class ArraySource(Source):
    """Images held as a uint8 array (N, H, W) or (N, H, W, C) (MNIST, SVHN)."""

    def __init__(self, images: np.ndarray, labels):
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)

    def image(self, i):
        from PIL import Image
        return Image.fromarray(np.ascontiguousarray(self.images[i])).convert("RGB")


def _missing(card: Card, root: Path, what: str) -> DatasetMissingError:
    return DatasetMissingError(f"{card.name}: {what} under data root {root}. How to get it: {card.how_to_get}")


def _need(card: Card, root: Path, rel: str) -> Path:
    p = root / rel
    if not p.exists():
        raise _missing(card, root, f"missing {rel}")
    return p


def _classnames_from_folders(card: Card, folders: list[str]) -> list[str]:
    rule = card.layout.get("classname_rule", "underscore_to_space")
    if rule == "underscore_to_space":
        return [f.replace("_", " ") for f in folders]
    if rule == "strip_prefix2_underscore_to_space":
        return [f[2:].replace("_", " ") for f in folders]
    if rule == "map":
        mapping = card.layout["folder_to_classname"]
        unknown = [f for f in folders if f not in mapping]
        if unknown:
            raise ValueError(f"{card.name}: class folder {unknown[0]!r} is not in the card's folder_to_classname")
        return [mapping[f] for f in folders]
    raise ValueError(f"{card.name}: unknown classname_rule {rule!r}")


def _check_classes(card: Card, derived: list[str], where: Path):
    if derived != card.classnames:
        diff = next((i for i, (a, b) in enumerate(zip(derived, card.classnames)) if a != b), min(len(derived), card.num_classes))
        got = derived[diff] if diff < len(derived) else "<none>"
        want = card.classnames[diff] if diff < card.num_classes else "<none>"
        raise ValueError(f"{card.name}: the classes found in {where} ({len(derived)}) do not match the card "
                         f"({card.num_classes}); first difference at index {diff}: found {got!r}, card has {want!r}")


def _image_folder(card: Card, root: Path, rel: str, keep=None) -> FileSource:
    from torchvision.datasets.folder import find_classes, make_dataset

    directory = _need(card, root, rel)
    folders, class_to_idx = find_classes(str(directory))
    _check_classes(card, _classnames_from_folders(card, folders), directory)
    is_valid = None
    if keep is not None:
        is_valid = lambda p: os.path.basename(p) in keep and p.lower().endswith(IMAGE_EXTENSIONS)  # noqa: E731
    samples = make_dataset(str(directory), class_to_idx, extensions=None if is_valid else IMAGE_EXTENSIONS,
                           is_valid_file=is_valid, allow_empty=True)
    if not samples:
        raise _missing(card, root, f"no images in {rel}")
    return FileSource(samples)


def open_source(card: Card, root: str | os.PathLike, split: str) -> Source:
    """The stored split ``split`` (a ``splits.*.source`` value: train, val or test) of ``card`` under ``root``."""
    root = Path(root)
    reader = card.layout["reader"]
    if reader == "imagefolder":
        folders = card.layout["folders"]
        if split not in folders:
            raise ValueError(f"{card.name}: the layout has no stored {split!r} split (it has {sorted(folders)})")
        return _image_folder(card, root, folders[split])
    if reader == "resisc45":
        split_file = _need(card, root, card.layout["split_files"][split])
        keep = {line.strip() for line in split_file.read_text().splitlines() if line.strip()}
        return _image_folder(card, root, card.layout["image_dir"], keep=keep)
    if reader == "torchvision.MNIST":
        from torchvision.datasets import MNIST
        for rel in card.layout["files"]:
            _need(card, root, rel)
        ds = MNIST(str(root), train=(split == "train"), download=False)
        return ArraySource(ds.data.numpy(), ds.targets.numpy())
    if reader == "svhn_mat":
        import scipy.io as sio
        mat = sio.loadmat(str(_need(card, root, f"{card.layout['root']}/{split}_32x32.mat")))
        labels = mat["y"].astype(np.int64).squeeze()
        labels[labels == 10] = 0  # as torchvision: label 10 is the digit 0
        return ArraySource(np.transpose(mat["X"], (3, 0, 1, 2)), labels)
    if reader == "torchvision.GTSRB":
        from torchvision.datasets import GTSRB
        _need(card, root, "gtsrb/GTSRB/Training" if split == "train" else "gtsrb/GT-final_test.csv")
        ds = GTSRB(str(root), split=split, download=False)
        source = FileSource(ds._samples)
        if split == "train":
            n = len({Path(p).parent.name for p in source.paths})
            if n != card.num_classes:
                raise ValueError(f"{card.name}: {n} class folders in gtsrb/GTSRB/Training, the card has {card.num_classes}")
        return source
    if reader == "torchvision.StanfordCars":
        from torchvision.datasets import StanfordCars
        for rel in ("stanford_cars/devkit/cars_meta.mat",
                    "stanford_cars/devkit/cars_train_annos.mat" if split == "train" else "stanford_cars/cars_test_annos_withlabels.mat",
                    "stanford_cars/cars_train" if split == "train" else "stanford_cars/cars_test"):
            _need(card, root, rel)
        ds = StanfordCars(str(root), split=split, download=False)
        _check_classes(card, [str(c) for c in ds.classes], root / "stanford_cars/devkit/cars_meta.mat")
        return FileSource(ds._samples)
    raise ValueError(f"{card.name}: unknown reader {reader!r} in {card.path}")


def val_partition(n_train: int, spec: dict) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices) of the task-vectors protocol: a seeded random_split of the train set."""
    n_val = int(n_train * spec.get("fraction", 0.1))
    if spec.get("max") is not None:
        n_val = min(n_val, int(spec["max"]))
    if n_val <= 0 or n_val >= n_train:
        raise ValueError(f"cannot carve a validation split from {n_train} training images (n_val={n_val})")
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(int(spec.get("seed", 0)))).numpy()
    return perm[: n_train - n_val], perm[n_train - n_val:]


# ------------------------------------------------------------------ data check (no downloads)
def _md5(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_dataset(card: Card, root: str | os.PathLike, verify: bool = False, count: bool = True) -> dict:
    """What of ``card`` is present under ``root``: files, split sizes against the card, checksums (``verify``)."""
    root = Path(root)
    report = {"name": card.name, "present": [], "missing": [], "problems": [], "sizes": {}, "checksums": {},
              "how_to_get": card.how_to_get}
    for rel in card.layout.get("files", []):
        (report["present"] if (root / rel).exists() else report["missing"]).append(rel)
    if verify:
        for rel, md5 in (card.checksums.get("md5") or {}).items():
            p = root / rel
            if not p.exists() and (root / card.layout.get("root", "") / "raw" / rel).exists():
                p = root / card.layout.get("root", "") / "raw" / rel
            if p.exists() and p.is_file():
                report["checksums"][rel] = "ok" if _md5(p) == md5 else "MISMATCH"
                if report["checksums"][rel] != "ok":
                    report["problems"].append(f"{rel}: md5 mismatch (expected {md5})")
    if count and not report["missing"]:
        expected = (card.sizes or {}).get("source", {})
        stored = sorted({s.get("source") for s in card.splits.values() if s.get("source")})
        for split in stored:
            try:
                n = len(open_source(card, root, split))
            except Exception as e:  # noqa: BLE001 - reported, not raised
                report["problems"].append(f"{split}: {e}")
                continue
            report["sizes"][split] = n
            if split in expected and expected[split] != n:
                report["problems"].append(f"{split}: {n} images, the protocol has {expected[split]}")
    report["status"] = "missing" if report["missing"] else ("problems" if report["problems"] else "ok")
    return report


def format_check(reports: list[dict]) -> str:
    lines = []
    for r in reports:
        lines.append(f"{r['name']}: {r['status'].upper()}")
        if r["sizes"]:
            lines.append("  sizes: " + ", ".join(f"{k} {v:,}" for k, v in r["sizes"].items()))
        for rel in r["present"]:
            lines.append(f"  present  {rel}")
        for rel in r["missing"]:
            lines.append(f"  MISSING  {rel}")
        for rel, st in r["checksums"].items():
            lines.append(f"  md5 {st:<8} {rel}")
        for p in r["problems"]:
            lines.append(f"  problem: {p}")
        if r["status"] != "ok":
            lines.append(f"  how to get it: {r['how_to_get']}")
    return "\n".join(lines) + "\n"

