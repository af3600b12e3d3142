"""The results of base methods, reused by every add-on on the same base (within a run and across runs).

``surgery(base=adamerging_layerwise)`` and ``intervmerge(base=adamerging_layerwise)`` share their base: it is
merged once per configuration and read back afterwards. The key covers everything that determines the base's
result: its resolved pipeline, the suite's checkpoints, the seed, the data settings, the tasks and the source of
the base methods' modules (a code change is a new key). Models of one shared encoder (``SharedModel``, and
AdaMerging's result with its trained coefficients) are also kept on disk under ``$MERGEBENCH_CACHE/bases``;
others only in memory. A cached base brings back the data it used, its logs and its merge time, so the add-on's
record says what the whole pipeline used and cost. Only the harness reads and fills it: it looks a run's bases
up before the method's worker starts and stores the bases the worker sends back (:func:`mergebench.run.merge_in_worker`).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import load_file

from mergebench import transfer
from mergebench.io import atomic_save_tensors, atomic_write_text, cache_root
from mergebench.models import MergedModel
from mergebench.registry import get_method
from mergebench.records import config_hash


@dataclass
class CachedBase:
    model: MergedModel
    seconds: float                      # the merge time of the base (and its own bases) when it ran
    data_used: dict = field(default_factory=dict)
    logs: dict = field(default_factory=dict)


_MEMORY: dict[str, CachedBase] = {}
_STORED: list[str] = []  # keys stored by this process, in order: a run that modified its inputs discards its own


def base_key(call, ctx) -> str:
    sources = hashlib.sha256()
    for stage in call.stages():
        sources.update(Path(inspect.getfile(inspect.unwrap(get_method(stage.name).fn))).read_bytes())  # its module
    return config_hash({"pipeline": str(call), "checkpoints": ctx.suite_info.get("checkpoints"),
                        "suite": ctx.suite_info.get("cache_key"), "seed": ctx.seed, "tasks": list(ctx.tasks),
                        "data": {"unlabeled_split": ctx.unlabeled_split, "fraction": ctx.data_fraction},
                        "precision": ctx.precision, "source": sources.hexdigest()})


def _folder() -> Path:
    return cache_root() / "bases"


def lookup(call, ctx) -> CachedBase | None:
    """The cached result of base ``call`` on ``ctx`` (a private copy), or None."""
    key = base_key(call, ctx)
    hit = _MEMORY.get(key)
    if hit is None:
        hit = _load(key, ctx)
        if hit is None:
            return None
        _MEMORY[key] = hit
    return CachedBase(copy.deepcopy(hit.model), hit.seconds, copy.deepcopy(hit.data_used), copy.deepcopy(hit.logs))


def store(call, ctx, entry: CachedBase) -> None:
    key = base_key(call, ctx)
    _STORED.append(key)
    _MEMORY[key] = CachedBase(copy.deepcopy(entry.model), entry.seconds, copy.deepcopy(entry.data_used),
                              copy.deepcopy(entry.logs))
    described = transfer.tensors_of(entry.model)
    if described is None:
        return
    tensors, fields = described
    meta = {**fields, "pipeline": str(call), "seconds": entry.seconds, "data_used": entry.data_used,
            "logs": entry.logs}
    try:
        atomic_save_tensors(tensors, _folder() / f"{key}.safetensors")
        atomic_write_text(_folder() / f"{key}.json", json.dumps(meta))
    except OSError:  # a cache that cannot be written only costs a recomputation
        pass


def _load(key: str, ctx) -> CachedBase | None:
    meta_path, tensor_path = _folder() / f"{key}.json", _folder() / f"{key}.safetensors"
    if not (meta_path.exists() and tensor_path.exists()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        tensors = load_file(tensor_path)
    except (OSError, ValueError):  # unreadable: recompute (and overwrite it)
        return None
    model = ctx.model_from_tensors(tensors, meta)
    return CachedBase(model, float(meta["seconds"]), meta.get("data_used", {}), meta.get("logs", {}))


def stored_count() -> int:
    return len(_STORED)


def discard_since(count: int) -> None:
    """Forget (in memory and on disk) every base stored after the first ``count``: the bases of a run whose method
    changed its inputs were computed from inputs that cannot be trusted (``mergebench.integrity``)."""
    for key in _STORED[count:]:
        _MEMORY.pop(key, None)
        for suffix in (".safetensors", ".json"):
            (_folder() / f"{key}{suffix}").unlink(missing_ok=True)
    del _STORED[count:]


def clear_memory() -> None:
    """Forget the in-memory entries (tests)."""
    _MEMORY.clear()

