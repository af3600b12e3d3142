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
import stat
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from mergebench.engine.io import atomic_write_text, safe_name
from mergebench import __version__

SCHEMA_VERSION = 1

# What every reader (resume, leaderboard, sweeps) relies on; a record without it is unreadable, not a crash.
_NUMBER = (int, float)
_REQUIRED = {"config_hash": str, "method": dict}
_REQUIRED_OK = {("metrics", "accuracy"): dict, ("metrics", "normalized_accuracy"): dict,
                ("metrics", "avg_accuracy"): _NUMBER, ("metrics", "avg_normalized_accuracy"): _NUMBER,
                ("params", "added"): _NUMBER, ("params", "added_pct"): _NUMBER, ("timing", "merge_s"): _NUMBER}
_REQUIRED_SEQUENTIAL = {("sequential", "orders"): list, ("sequential", "final_avg_mean"): _NUMBER,
                        ("sequential", "final_avg_std"): _NUMBER, ("sequential", "avg_over_steps_mean"): _NUMBER,
                        ("sequential", "avg_over_steps_std"): _NUMBER}


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Record:
    """One run's record: what ran (its spec's settings and the method's facts), on what, and its outcome.

    Built by :meth:`ok` or :meth:`failed` alone; :meth:`to_json` is the JSON of ``docs/record-schema.md``. It
    holds every fact a leaderboard shows (the method's label, its budget, the data it used), so leaderboards read
    records only, never the method registry.
    """

    config_hash: str
    status: str                      # "ok" or "failed"
    created: str
    method: dict                     # name, display_name, label, pipeline, hparams, needs, adds_params, paper, ...
    budget: dict                     # requested, below_paper
    suite: dict                      # name, tasks and the suite's build info
    seed: int
    device: str
    precision: str
    config: dict                     # what determines the result; hashed to ``config_hash``
    env: dict
    finished: str = ""
    time_limit_s: float | None = None
    memory_limit_mb: float | None = None
    protocol: str | None = None      # "sequential", or absent for one-shot
    sequential: dict | None = None   # orders, adapter; for an ok run per_order and its averages
    selection: dict | None = None
    metrics: dict | None = None
    params: dict | None = None
    flops: dict | None = None
    timing: dict | None = None
    data_used: list | None = None
    logs: dict | None = None
    worker: dict | None = None       # left_running: processes the method's worker left behind
    error: str | None = None
    traceback: str | None = None

    # the JSON keys in the order a record file holds them; ``None`` values are left out
    _ORDER = ("config_hash", "status", "created", "method", "budget", "suite", "seed", "device", "precision",
              "config", "env", "time_limit_s", "memory_limit_mb", "protocol", "sequential", "selection", "metrics",
              "params", "flops", "timing", "data_used", "logs", "worker", "error", "traceback", "finished")
    _OK_FIELDS = frozenset({"flops"})  # null in an ok record when FLOPs were not counted

    @classmethod
    def ok(cls, header: dict, *, selection: dict, metrics: dict, params: dict, flops: dict | None, timing: dict,
           data_used: list, logs: dict, worker: dict | None = None, sequential: dict | None = None) -> "Record":
        """An ok run's record: ``header`` (:func:`record_header`), its measurements, and for the sequential
        protocol its per-order results and averages (``sequential``, added to the header's orders)."""
        seq = {**header["sequential"], **sequential} if sequential is not None else header.get("sequential")
        return cls(**{**header, "sequential": seq}, status="ok", selection=selection, metrics=metrics,
                   params=params, flops=flops, timing=timing, data_used=data_used, logs=logs, worker=worker,
                   finished=now())

    @classmethod
    def failed(cls, header: dict, *, error: str, traceback: str | None = None, selection: dict | None = None,
               sequential: dict | None = None) -> "Record":
        """A failed run's record: why (``error``: ``Type: message``, ``traceback``), with what it finished
        (``selection``; for the sequential protocol the orders done, ``sequential``)."""
        seq = {**header["sequential"], **sequential} if sequential is not None else header.get("sequential")
        return cls(**{**header, "sequential": seq}, status="failed", selection=selection, error=error,
                   traceback=traceback, finished=now())

    def to_json(self) -> dict:
        """The record as JSON (``docs/record-schema.md``), without the schema version ``write_record`` adds."""
        shown = self._OK_FIELDS if self.status == "ok" else ()
        return {k: getattr(self, k) for k in self._ORDER if getattr(self, k) is not None or k in shown}


def record_header(config_hash: str, method: dict, budget: dict, suite: dict, seed: int, device: str,
                  precision: str, config: dict, env: dict, time_limit_s: float | None = None,
                  memory_limit_mb: float | None = None, sequential: dict | None = None) -> dict:
    """What a record says of its run before it is measured: the arguments of :meth:`Record.ok` and
    :meth:`Record.failed` besides the outcome (``sequential``: the orders and adapter of a sequential run)."""
    return {"config_hash": config_hash, "created": now(), "method": method, "budget": budget, "suite": suite,
            "seed": seed, "device": device, "precision": precision, "config": config, "env": env,
            "time_limit_s": time_limit_s or None, "memory_limit_mb": memory_limit_mb or None,
            "protocol": "sequential" if sequential is not None else None, "sequential": sequential}


def record_path(results_dir: str | os.PathLike, suite: str, pipeline: str, chash: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "_", pipeline.split("(")[0]).strip("_")
    return Path(results_dir) / safe_name(suite, "suite name") / f"{slug}-{safe_name(chash, 'config hash')}.json"


def environment() -> dict:
    import open_clip  # lazy: a run records its version; the leaderboard reads records without loading it


    env = {"python": platform.python_version(), "torch": torch.__version__, "open_clip": open_clip.__version__,
           "mergebench": __version__, "platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_record(record: dict, path: str | os.PathLike) -> Path:
    """Write ``record`` to ``path`` (atomically); returns where it went.

    A file there that is a readable record of this mergebench (the same configuration run before) is replaced.
    One it cannot read (a newer schema, a foreign or damaged file) is never replaced: the record goes beside it,
    to ``NAME.1.json`` (``.2``, ...), with a warning naming both files.
    """
    record = {"schema": SCHEMA_VERSION, **record}
    path = target = Path(path)
    n = 0
    while target.exists():
        why = unreadable_reason(target)
        if why is None:
            break
        n += 1
        target = path.with_name(f"{path.stem}.{n}{path.suffix}")
    if target != path:
        warnings.warn(f"record file {path} is unreadable ({unreadable_reason(path)}); it is left as it is and the new "
                      f"record is written to {target}", stacklevel=2)
    return atomic_write_text(target, json.dumps(record, indent=1, sort_keys=False, default=str) + "\n")


def check_record(rec) -> None:
    """Raise ``ValueError`` saying why ``rec`` (parsed JSON) is not a record this mergebench can read."""
    if not isinstance(rec, dict) or "schema" not in rec or "status" not in rec:
        raise ValueError("not a mergebench record (no schema/status)")
    schema = rec["schema"]
    if isinstance(schema, bool) or not isinstance(schema, int):
        raise ValueError(f"schema {schema!r} is not an integer version")
    if schema > SCHEMA_VERSION:
        raise ValueError(f"schema {schema} is newer than this mergebench ({SCHEMA_VERSION}); upgrade")
    if schema < 1:
        raise ValueError(f"schema {schema} is not a mergebench schema version")
    if rec["status"] not in ("ok", "failed"):
        raise ValueError(f"status {rec['status']!r} is neither 'ok' nor 'failed'")
    required = {(k,): t for k, t in _REQUIRED.items()}
    required[("method", "pipeline")] = str
    if rec["status"] == "ok":
        required.update(_REQUIRED_OK)
        if rec.get("protocol") == "sequential":
            required.update(_REQUIRED_SEQUENTIAL)
    check_fields(rec, required)


def check_fields(rec: dict, fields: dict, required: bool = True) -> None:
    """Raise ``ValueError`` naming the first field of ``fields`` (``{("metrics", "accuracy"): dict, ...}``) that
    ``rec`` lacks (when ``required``; otherwise a missing or null field passes) or holds with another type (a tuple of types:
    any of them; ``Items(list, str)``: a list of strings, ``Items(dict, float)`` a dict of floats). A bool is not a
    number."""
    for keys, kind in fields.items():
        value, present = rec, True
        for i, key in enumerate(keys):
            if isinstance(value, dict) and key in value and (required or value[key] is not None):
                value = value[key]
            elif required:
                raise ValueError(f"{'an ok' if rec['status'] == 'ok' else 'a'} record without "
                                 f"{'.'.join(keys[:i + 1])!r}")
            elif isinstance(value, dict):
                present = False
                break
            else:
                raise ValueError(f"{'.'.join(keys[:i])!r} is {type(value).__name__}, not dict")
        if not present:
            continue
        outer, items = (kind.outer, kind.items) if isinstance(kind, Items) else (kind, None)
        if not _is(value, outer):
            raise ValueError(f"{'.'.join(keys)!r} is {type(value).__name__}, not {_names(outer)}")
        for k, item in (value.items() if isinstance(value, dict) else enumerate(value)) if items else ():
            if not _is(item, items):
                raise ValueError(f"{'.'.join(keys)}[{k!r}] is {type(item).__name__}, not {_names(items)}")


@dataclass(frozen=True)
class Items:
    """A field type for ``check_fields``: a container (``list`` or ``dict``) whose items (or values) are ``items``."""
    outer: type | tuple
    items: type | tuple


def _is(value, kind) -> bool:
    """``isinstance``, except that a bool is not a number."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))


def _names(kind) -> str:
    return " or ".join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))


def read_record(path: str | os.PathLike) -> dict:
    """The record in ``path``; ``OSError`` or ``ValueError`` (with the reason) if it cannot be read.

    Only a regular file is read: the file is opened without blocking, so a FIFO or a device named ``*.json`` is
    reported, never waited on."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ValueError(f"not a regular file ({_file_kind(mode)})")
    with os.fdopen(fd, "rb") as f:
        rec = json.loads(f.read().decode("utf-8"))
    check_record(rec)
    return rec


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "not a plain file")


def unreadable_reason(path: str | os.PathLike) -> str | None:
    """``None`` if ``path`` holds a readable record, else why not."""
    try:
        read_record(path)
    except (OSError, ValueError) as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        return f"{type(e).__name__}: {e}"
    return None


@dataclass
class Loaded:
    records: list[dict]
    unreadable: list[tuple[Path, str]]  # (file, why): reported, never silently dropped


# JSON files a results folder holds beside its records: a suite's mechanism report (``mergebench diagnose``)
DIAGNOSTICS_FILE = "diagnostics.json"
COMPANION_FILES = frozenset({DIAGNOSTICS_FILE})


def load_records(results_dir: str | os.PathLike, suite: str | None = None) -> Loaded:
    """Every record under ``results_dir[/suite]``; unreadable files are returned with the reason."""
    root = Path(results_dir) / safe_name(suite, "suite name") if suite else Path(results_dir)
    records, bad = [], []
    for path in sorted(root.rglob("*.json")) if root.exists() else []:
        if path.name in COMPANION_FILES:
            continue
        try:
            rec = read_record(path)
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
