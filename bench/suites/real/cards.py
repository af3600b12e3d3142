"""Dataset cards (``datasets/*.yaml``) and the readers of the on-disk layouts they name.

A card states a dataset's class names, prompt templates (the task-vectors set), the layout it is
read from (relative to a data root), how train / val / test are made and the expected sizes.
Nothing here downloads: a missing file is an error that says what is missing and how to get it.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import yaml
from PIL import Image
from torchvision.datasets import GTSRB, MNIST, StanfordCars
from torchvision.datasets.folder import find_classes, make_dataset

from mergebench.errors import InputError, MissingFileError, NotFoundError
from mergebench.api.catalog import close_matches
from mergebench.suites.checkpoints import hf_cache

CARD_DIR_ENV = "MERGEBENCH_CARDS"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# The task order of the task-vectors paper (and of every merging paper since).
REAL_TASKS = ("SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD")


class DatasetMissingError(MissingFileError):
    """A dataset (or part of it) is not on disk; the message says what and how to get it."""


class DatasetError(InputError):
    """A dataset card, or the dataset on disk, does not follow the protocol (the message names the file)."""


def card_dir() -> Path:
    if os.environ.get(CARD_DIR_ENV):
        return Path(os.environ[CARD_DIR_ENV])
    return Path(__file__).resolve().parents[3] / "datasets"


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
        raise DatasetError(f"dataset card {path} is not valid YAML: {e}") from e
    for key in ("name", "classnames", "templates", "layout", "splits"):
        if key not in (raw or {}):
            raise DatasetError(f"dataset card {path} lacks the field {key!r}")
    names = raw["classnames"]["list"]
    if raw["classnames"].get("count", len(names)) != len(names):
        raise DatasetError(f"dataset card {path}: classnames.count is {raw['classnames']['count']} but the list has {len(names)}")
    templates = raw["templates"]["list"]
    bad = [t for t in templates if "{c}" not in t]
    if bad:
        raise DatasetError(f"dataset card {path}: template {bad[0]!r} has no '{{c}}' placeholder")
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
        raise MissingFileError(f"no dataset cards in {directory}")
    return cards


def resolve_task(name: str, cards: dict[str, Card]) -> Card:
    for card in cards.values():
        if name == card.name or name.lower() in {a.lower() for a in card.aliases} | {card.name.lower()}:
            return card
    raise NotFoundError(f"no dataset card for task {name!r}{close_matches(name, list(cards))} (cards: {', '.join(cards)})")


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
        with Image.open(self.paths[i]) as im:
            return im.convert("RGB")


class ArraySource(Source):
    """Images held as a uint8 array (N, H, W) or (N, H, W, C) (MNIST, SVHN)."""

    def __init__(self, images: np.ndarray, labels):
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)

    def image(self, i):
        return Image.fromarray(np.ascontiguousarray(self.images[i])).convert("RGB")


class ParquetSource(Source):
    """A split of a Hugging Face dataset stored as parquet files (an HF cache): ``image`` cells ({bytes, path} or
    bytes) decoded on demand, one row group at a time; labels read up front (remapped by ``label_map``)."""

    def __init__(self, files: list[Path], image_column: str = "image", label_column: str = "label",
                 label_map: np.ndarray | None = None, description: str = ""):
        self.files, self.image_column, self.description = [Path(f) for f in files], image_column, description
        self._groups = []  # (first row, rows, file index, row group)
        labels, start = [], 0
        for i, f in enumerate(self.files):
            pf = pq.ParquetFile(f)
            missing = [c for c in (image_column, label_column) if c not in pf.schema_arrow.names]
            if missing:
                raise DatasetError(f"{f}: no column {missing[0]!r} (columns: {', '.join(pf.schema_arrow.names)})")
            labels.append(pf.read(columns=[label_column]).column(0).to_numpy().astype(np.int64))
            for g in range(pf.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                self._groups.append((start, n, i, g))
                start += n
        self.labels = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
        if label_map is not None:
            if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(label_map)):
                raise DatasetError(f"{self.files[0].parent}: label {int(self.labels.max())} outside the dataset's "
                                 f"{len(label_map)} class names")
            self.labels = label_map[self.labels]
        self._starts = [g[0] for g in self._groups]
        self._lock, self._cache = threading.Lock(), {}

    def _rows(self, k: int) -> list:
        with self._lock:  # pyarrow file handles are not shared across threads; a few row groups stay decoded
            if k not in self._cache:
                _, _, i, g = self._groups[k]
                self._cache[k] = pq.ParquetFile(self.files[i]).read_row_group(g, columns=[self.image_column]) \
                    .column(0).to_pylist()
                while len(self._cache) > 4:
                    self._cache.pop(next(iter(self._cache)))
            return self._cache[k]

    def image(self, i):
        k = bisect.bisect_right(self._starts, i) - 1
        cell = self._rows(k)[i - self._groups[k][0]]
        data = cell.get("bytes") if isinstance(cell, dict) else cell
        if data is None and isinstance(cell, dict) and cell.get("path"):
            with Image.open(cell["path"]) as im:
                return im.convert("RGB")
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")


# ------------------------------------------------------------------ Hugging Face datasets in an HF cache
HF_SPLIT_NAMES = {"train": ("train",), "val": ("validation", "val", "valid"), "test": ("test",)}


def hf_spec(card: Card) -> dict | None:
    """The card's ``hf_dataset`` section with defaults: repos (fusion_bench's copies), config, columns."""
    spec = card.raw.get("hf_dataset")
    if not spec:
        return None
    repos = spec["repo"] if isinstance(spec["repo"], list) else [spec["repo"]]
    return {"repos": repos, "config": spec.get("config"), "image": spec.get("image_column", "image"),
            "label": spec.get("label_column", "label"), "splits": spec.get("splits") or {}}


def split_specs(card: Card, root) -> dict:
    """The card's protocol splits (train, val, test: a stored ``source`` or carved ``from`` another) for the data
    under ``root``: a Hugging Face copy may declare its own (``hf_dataset.splits``; fusion_bench's EuroSAT has no
    val split, so val is carved from its train split as for the datasets without one)."""
    spec = hf_spec(card)
    if spec and spec["splits"] and hf_location(card, root) is not None:
        return {**card.splits, **spec["splits"]}
    return card.splits


def protocol_sizes(card: Card, root, source_sizes: dict[str, int] | None = None) -> dict[str, int]:
    """Images per protocol split (train, val, test) for the stored splits' sizes ``source_sizes`` (default: the
    card's published ones, ``sizes.source``), following :func:`split_specs`."""
    specs = split_specs(card, root)
    source_sizes = dict((card.sizes or {}).get("source") or {}) if source_sizes is None else source_sizes
    out = {}
    for split, spec in specs.items():
        if "from" in spec:
            n = source_sizes.get(spec["from"])
            if n is not None:
                out[split] = len(val_partition(n, spec)[1])
        elif spec.get("source") in source_sizes:
            n = source_sizes[spec["source"]]
            carving = next((c for c in specs.values() if c.get("from") == spec["source"]), None)
            out[split] = len(val_partition(n, carving)[0]) if carving else n
    return out


def native_present(card: Card, root: Path) -> bool:
    return all((Path(root) / rel).exists() for rel in card.layout.get("files", []))


def hf_location(card: Card, root) -> tuple[str, Path] | None:
    """(repo id, snapshot folder) of the card's Hugging Face dataset in an HF cache under ``root``, when the card's
    own layout is not there (the native layout wins when both are)."""
    spec = hf_spec(card)
    if spec is None or native_present(card, root):
        return None
    for repo in spec["repos"]:
        snap = hf_cache.find_repo(root, "dataset", repo)
        if snap is not None:
            return repo, snap
    return None


def hf_split_files(card: Card, snap: Path, split: str) -> list[Path]:
    """The parquet files of stored split ``split`` (train, val, test) in a dataset snapshot: ``[config/]<split>-*``,
    ``<split>/*`` or ``<split>.parquet`` anywhere below it (``val`` also as ``validation``)."""
    spec = hf_spec(card)
    base = snap / spec["config"] if spec["config"] else snap
    files = sorted(p for p in base.rglob("*.parquet"))
    for name in HF_SPLIT_NAMES.get(split, (split,)):
        chosen = [p for p in files if p.name.startswith(f"{name}-") or p.stem == name or p.parent.name == name]
        if chosen:
            return chosen
    return []


def hf_classnames(files: list[Path], snap: Path, label_column: str) -> list[str] | None:
    """The dataset's own class names: the ``huggingface`` features in the parquet schema metadata (what ``datasets``
    writes), else the ``dataset_info`` of the snapshot's README.md front matter."""
    if files:
        meta = pq.read_schema(files[0]).metadata or {}
        if b"huggingface" in meta:
            features = json.loads(meta[b"huggingface"]).get("info", {}).get("features", {})
            names = (features.get(label_column) or {}).get("names")
            if names:
                return [str(n) for n in names]
    readme = snap / "README.md"
    if readme.exists() and readme.read_text().startswith("---"):
        front = yaml.safe_load(readme.read_text().split("---", 2)[1]) or {}
        infos = front.get("dataset_info") or []
        for info in infos if isinstance(infos, list) else [infos]:
            for feature in info.get("features", []):
                names = ((feature.get("dtype") or {}) if isinstance(feature.get("dtype"), dict) else {}) \
                    .get("class_label", {}).get("names")
                if feature.get("name") == label_column and names:
                    return [str(names[k]) for k in sorted(names, key=int)] if isinstance(names, dict) else list(names)
    return None


def _norm(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").replace("-", " ").split())


def compare_classnames(card: Card, names: list[str] | None) -> tuple[np.ndarray | None, list[str]]:
    """(label map or None, notes) for a dataset whose labels index ``names``, read against the card's class list.

    Same names in the same order (ignoring case, '_' and '-', and the card's folder_to_classname): labels are the
    card's indices. The same names in another order: labels are remapped by name. Other names: labels are read as
    indices into the card's list (as fusion_bench reads these datasets) and the differences are listed."""
    if names is None:
        return None, ["the dataset has no class names (no ClassLabel in its metadata); labels are read as indices "
                      "into the card's list"]
    if len(names) != card.num_classes:
        raise DatasetError(f"{card.name}: the dataset has {len(names)} classes, the card {card.num_classes}")
    mapping = card.layout.get("folder_to_classname") or {}
    theirs = [_norm(mapping.get(n, n)) for n in names]
    ours = [_norm(n) for n in card.classnames]
    if theirs == ours:
        return None, []
    if sorted(theirs) == sorted(ours) and len(set(ours)) == len(ours):
        return np.asarray([ours.index(t) for t in theirs], dtype=np.int64), [
            "the dataset lists the card's classes in another order; labels are remapped by name"]
    diff = [i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b]
    shown = "; ".join(f"{i}: {names[i]!r} vs card {card.classnames[i]!r}" for i in diff[:3])
    return None, [f"class names differ from the card at {len(diff)} of {card.num_classes} indices ({shown}"
                  f"{'; ...' if len(diff) > 3 else ''}); labels are read as indices into the card's list, as "
                  f"fusion_bench does"]


def open_hf_source(card: Card, root, split: str) -> ParquetSource:
    where = hf_location(card, root)
    if where is None:
        raise _missing(card, Path(root), "no Hugging Face dataset cache")
    repo, snap = where
    spec = hf_spec(card)
    files = hf_split_files(card, snap, split)
    if not files:
        raise _missing(card, Path(root), f"no {split} parquet files in the Hugging Face dataset {repo} ({snap})")
    label_map, _ = compare_classnames(card, hf_classnames(files, snap, spec["label"]))
    return ParquetSource(files, spec["image"], spec["label"], label_map, description=f"{repo}@{snap.name}/{split}")


def source_id(card: Card, root) -> str | None:
    """Where a card's data come from when it is not its own layout: ``hf:<repo>@<commit>`` (else None)."""
    where = hf_location(card, root)
    return f"hf:{where[0]}@{where[1].name}" if where else None


def _missing(card: Card, root: Path, what: str) -> DatasetMissingError:
    hf = hf_spec(card)
    also = (f" (or the Hugging Face dataset {' or '.join(hf['repos'])} in an HF cache under the data root, "
            f"datasets--{hf['repos'][0].replace('/', '--')}/snapshots/...)") if hf else ""
    return DatasetMissingError(f"{card.name}: {what} under data root {root}. How to get it: {card.how_to_get}{also}")


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
            raise DatasetError(f"{card.name}: class folder {unknown[0]!r} is not in the card's folder_to_classname")
        return [mapping[f] for f in folders]
    raise DatasetError(f"{card.name}: unknown classname_rule {rule!r}")


def _check_classes(card: Card, derived: list[str], where: Path):
    if derived != card.classnames:
        diff = next((i for i, (a, b) in enumerate(zip(derived, card.classnames)) if a != b), min(len(derived), card.num_classes))
        got = derived[diff] if diff < len(derived) else "<none>"
        want = card.classnames[diff] if diff < card.num_classes else "<none>"
        raise DatasetError(f"{card.name}: the classes found in {where} ({len(derived)}) do not match the card "
                         f"({card.num_classes}); first difference at index {diff}: found {got!r}, card has {want!r}")


def _image_folder(card: Card, root: Path, rel: str, keep=None) -> FileSource:
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
    if hf_location(card, root) is not None:
        return open_hf_source(card, root, split)
    reader = card.layout["reader"]
    if reader == "imagefolder":
        folders = card.layout["folders"]
        if split not in folders:
            raise DatasetError(f"{card.name}: the layout has no stored {split!r} split (it has {sorted(folders)})")
        return _image_folder(card, root, folders[split])
    if reader == "resisc45":
        split_file = _need(card, root, card.layout["split_files"][split])
        keep = {line.strip() for line in split_file.read_text().splitlines() if line.strip()}
        return _image_folder(card, root, card.layout["image_dir"], keep=keep)
    if reader == "torchvision.MNIST":
        for rel in card.layout["files"]:
            _need(card, root, rel)
        ds = MNIST(str(root), train=(split == "train"), download=False)
        return ArraySource(ds.data.numpy(), ds.targets.numpy())
    if reader == "svhn_mat":
        import scipy.io as sio  # lazy: a costly import (about 0.4 s) that only SVHN's .mat files need
        mat = sio.loadmat(str(_need(card, root, f"{card.layout['root']}/{split}_32x32.mat")))
        labels = mat["y"].astype(np.int64).squeeze()
        labels[labels == 10] = 0  # as torchvision: label 10 is the digit 0
        return ArraySource(np.transpose(mat["X"], (3, 0, 1, 2)), labels)
    if reader == "torchvision.GTSRB":
        _need(card, root, "gtsrb/GTSRB/Training" if split == "train" else "gtsrb/GT-final_test.csv")
        ds = GTSRB(str(root), split=split, download=False)
        source = FileSource(ds._samples)
        if split == "train":
            n = len({Path(p).parent.name for p in source.paths})
            if n != card.num_classes:
                raise DatasetError(f"{card.name}: {n} class folders in gtsrb/GTSRB/Training, the card has {card.num_classes}")
        return source
    if reader == "torchvision.StanfordCars":
        for rel in ("stanford_cars/devkit/cars_meta.mat",
                    "stanford_cars/devkit/cars_train_annos.mat" if split == "train" else "stanford_cars/cars_test_annos_withlabels.mat",
                    "stanford_cars/cars_train" if split == "train" else "stanford_cars/cars_test"):
            _need(card, root, rel)
        ds = StanfordCars(str(root), split=split, download=False)
        _check_classes(card, [str(c) for c in ds.classes], root / "stanford_cars/devkit/cars_meta.mat")
        return FileSource(ds._samples)
    raise DatasetError(f"{card.name}: unknown reader {reader!r} in {card.path}")


def val_partition(n_train: int, spec: dict) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices) of the task-vectors protocol: a seeded random_split of the train set."""
    n_val = int(n_train * spec.get("fraction", 0.1))
    if spec.get("max") is not None:
        n_val = min(n_val, int(spec["max"]))
    if n_val <= 0 or n_val >= n_train:
        raise DatasetError(f"cannot carve a validation split from {n_train} training images (n_val={n_val})")
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
    report = {"name": card.name, "present": [], "missing": [], "problems": [], "notes": [], "sizes": {},
              "checksums": {}, "how_to_get": card.how_to_get, "source": "layout"}
    hf = hf_location(card, root)
    if hf is not None:  # a Hugging Face dataset in an HF cache: its class names and split sizes against the card
        repo, snap = hf
        report["source"] = f"Hugging Face dataset {repo} ({snap})"
        report["present"].append(str(snap.relative_to(root)) if snap.is_relative_to(root) else str(snap))
        spec = hf_spec(card)
        specs = split_specs(card, root)
        stored = {split: hf_split_files(card, snap, split)
                  for split in sorted({s.get("source") for s in specs.values() if s.get("source")})}
        for split, own in specs.items():
            if own != card.splits.get(split):
                report["notes"].append(f"{split}: {own.get('protocol') or own}")
        for split, files in stored.items():
            if not files and split == "test":
                report["missing"].append(f"{repo}: test split (parquet files)")
            elif not files:  # evaluation needs only the test split
                uses = [s for s, own in specs.items() if split in (own.get("source"), own.get("from"))]
                report["unavailable"] = report.get("unavailable", []) + uses
                report["notes"].append(f"no {split} split in {repo}: no {' or '.join(uses)} split for {card.name}, so "
                                       f"methods that read {'them' if len(uses) > 1 else 'it'}"
                                       f"{' (and --tune)' if 'val' in uses else ''} cannot run on it")
        files = next((f for f in stored.values() if f), None)
        if files:
            try:
                report["notes"] += compare_classnames(card, hf_classnames(files, snap, spec["label"]))[1]
            except ValueError as e:
                report["problems"].append(str(e))
    else:
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
    if count:  # every stored split that can be read, also when others are missing (a run reads what is there)
        expected = (card.sizes or {}).get("source", {})
        stored = sorted({s.get("source") for s in split_specs(card, root).values() if s.get("source")})
        for split in stored:
            if hf is not None and not hf_split_files(card, hf[1], split):
                continue  # noted above
            try:
                n = len(open_source(card, root, split))
            except Exception as e:  # noqa: BLE001 - reported, not raised
                if not report["missing"]:  # else it is one of the missing files, listed above
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
        if r.get("source", "layout") != "layout":
            lines.append(f"  source: {r['source']}")
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
        for n in r.get("notes", []):
            lines.append(f"  differs from the card: {n}")
        if r.get("space"):
            lines.append("  " + r["space"])
        if r["status"] != "ok":
            lines.append(f"  how to get it: {r['how_to_get']}")
    return "\n".join(lines) + "\n"

