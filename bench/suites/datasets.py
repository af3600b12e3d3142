"""The real suite's datasets on disk: what ``mergebench data check`` reports (per dataset, what is present,
missing and how to get it; never downloads) and what ``data prepare`` writes (the preprocessing cache: decoded,
resized, center-cropped uint8 images)."""

from __future__ import annotations

import os
from pathlib import Path

from mergebench.errors import InputError, MissingFileError
from mergebench.suites.real import cards as cardlib
from mergebench.suites.checkpoints import hf_cache
from mergebench.suites.real import imagecache
from mergebench.suites.base import SPLITS


def chosen_cards(root: str | os.PathLike, tasks: str | None = None) -> list[cardlib.Card]:
    """The cards of ``tasks`` (comma-separated names or aliases; default: all eight), once ``root`` is a folder."""
    all_cards = cardlib.load_cards()
    chosen = [cardlib.resolve_task(t, all_cards) for t in tasks.split(",")] if tasks else list(all_cards.values())
    if not Path(root).is_dir():
        raise MissingFileError(f"data root {root} does not exist (or is not a folder); pass the folder that holds "
                               f"the datasets in the cards' layouts (datasets/*.yaml) or a Hugging Face cache (the HF "
                               f"home, its hub/ folder, or a folder holding datasets--ORG--NAME/)")
    return chosen


def parse_splits(text: str) -> list[str]:
    """``--splits``: comma-separated splits, or ``all``."""
    splits = list(SPLITS) if text == "all" else [s.strip() for s in text.split(",")]
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise InputError(f"unknown split {unknown[0]!r}; --splits takes test, val, train (comma-separated) or all")
    return splits


def check(root: str | os.PathLike, chosen: list[cardlib.Card], splits: list[str], image_size: int = 224,
          verify: bool = False) -> tuple[str, bool]:
    """The ``data check`` report of the ``chosen`` datasets under ``root`` and whether every one is complete;
    ``splits`` are those a ``data prepare`` would cache (the space it would write at ``image_size``)."""
    reports = [cardlib.check_dataset(c, root, verify=verify) for c in chosen]
    totals = {"test": 0, "other": 0, "to_write": 0}
    for card, r in zip(chosen, reports):
        space = imagecache.space(card, root, image_size, r["sizes"], r.get("unavailable", ()))
        r["space"], counts = _space_line(space, splits)
        for k in totals:
            totals[k] += counts[k]
    text = cardlib.format_check(reports)
    if all(r["status"] == "missing" and not r["present"] for r in reports):
        repo = next((cardlib.hf_spec(c)["repos"][0] for c in chosen if cardlib.hf_spec(c)), None)
        example = f", e.g. datasets--{repo.replace('/', '--')}" if repo else ""
        text += (f"nothing found under {root}: looked for each card's layout there (e.g. "
                 f"{Path(root) / chosen[0].layout.get('root', chosen[0].name)}) and for Hugging Face datasets "
                 f"(datasets--ORG--NAME/{example}) in {', '.join(str(d) for d in hf_cache.hub_dirs_searched(root))}; "
                 f"Hugging Face copies are accepted: --root may be the HF home or its hub/ folder\n")
    text += (f"preprocessing cache at {image_size} px ($MERGEBENCH_CACHE/real/data): `data prepare` (--splits "
             f"{','.join(splits)}) writes {size_text(totals['to_write'])} more; every run needs the test splits "
             f"({size_text(totals['test'])} in all), train and val ({size_text(totals['other'])} more) only methods "
             f"that read them (and --tune)\n")
    return text, all(r["status"] == "ok" for r in reports)


def prepare(root: str | os.PathLike, card: cardlib.Card, splits: list[str], image_size: int = 224,
            workers: int | None = None) -> Path:
    """Fill the preprocessing cache of ``card``'s ``splits``; returns its folder."""
    imagecache.load_or_build(card, root, image_size, workers=workers, splits=splits)
    return imagecache.cache_dir(card, root, image_size)


def size_text(n: int) -> str:
    """A byte count as people read it: GB, MB or kB."""
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else (f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB")


def _space_line(space: dict, splits: list[str]) -> tuple[str, dict]:
    """One line of ``data check``: per split, images and cache bytes (cached or not); and the byte counts."""
    parts, counts = [], {"test": 0, "other": 0, "to_write": 0}
    for split, s in space["splits"].items():
        if s["images"] is None:
            parts.append(f"{split} {'?' if s['available'] else 'not in the data'}")
            continue
        counts["test" if split == "test" else "other"] += s["bytes"]
        if split in splits and not s["cached"]:
            counts["to_write"] += s["bytes"]
        state = "cached" if s["cached"] else ("to write" if split in splits else "on first use")
        parts.append(f"{split} {s['images']:,} images {size_text(s['bytes'])} ({state}"
                     f"{'' if s['counted'] else ', protocol size'})")
    return f"cache at {space['size']} px: " + "; ".join(parts), counts
