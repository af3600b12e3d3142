"""Run records: one JSON file per run, written atomically, and their loading.

A record is the single source of every number in a leaderboard. Its ``config_hash`` covers
everything that determines the result (method pipeline with all hyperparameters, suite and
checkpoint hashes, seed, data settings), so a rerun of the same configuration is recognized.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from mergebench.io import atomic_write_text

SCHEMA_VERSION = 1


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def record_path(results_dir: str | os.PathLike, suite: str, pipeline: str, chash: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "_", pipeline.split("(")[0]).strip("_")
    return Path(results_dir) / suite / f"{slug}-{chash}.json"


def environment() -> dict:
    import open_clip

    from mergebench import __version__

    env = {"python": platform.python_version(), "torch": torch.__version__, "open_clip": open_clip.__version__,
           "mergebench": __version__, "platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_record(record: dict, path: str | os.PathLike) -> Path:
    record = {"schema": SCHEMA_VERSION, **record}
    return atomic_write_text(path, json.dumps(record, indent=1, sort_keys=False, default=str) + "\n")


@dataclass
class Loaded:
    records: list[dict]
    unreadable: list[tuple[Path, str]]  # (file, why): reported, never silently dropped


def load_records(results_dir: str | os.PathLike, suite: str | None = None) -> Loaded:
    """Every record under ``results_dir[/suite]``; unreadable files are returned with the reason."""
    root = Path(results_dir) / suite if suite else Path(results_dir)
    records, bad = [], []
    for path in sorted(root.rglob("*.json")) if root.exists() else []:
        try:
            rec = json.loads(path.read_text())
            if not isinstance(rec, dict) or "schema" not in rec or "status" not in rec:
                raise ValueError("not a mergebench record (no schema/status)")
            if rec["schema"] > SCHEMA_VERSION:
                raise ValueError(f"schema {rec['schema']} is newer than this mergebench ({SCHEMA_VERSION}); upgrade")
            rec["_path"] = str(path)
            records.append(rec)
        except (OSError, ValueError) as e:
            bad.append((path, f"{type(e).__name__}: {e}"))
    for path, why in bad:
        warnings.warn(f"skipping unreadable record {path}: {why}", stacklevel=2)
    return Loaded(records, bad)


def find_ok(results_dir, suite: str, chash: str) -> dict | None:
    """The ok record of this configuration, if one exists (used to skip finished runs)."""
    for rec in load_records(results_dir, suite).records:
        if rec.get("config_hash") == chash and rec.get("status") == "ok":
            return rec
    return None
