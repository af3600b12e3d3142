"""Loading mini8: from its committed artifact (``bench/suites/artifacts/<name>``), every file checked against its
sha256 and the data generated once per machine and checked too, or from a local build of another configuration
(``mergebench.build``)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

from mergebench.engine.io import atomic_save_tensors, cache_root
from mergebench.suites import artifact
from mergebench.suites.base import SPLITS, Suite, TaskData
from mergebench.suites.mini8.config import CONFIGS, Mini8Config, mini8_config_dict, stored_config
from mergebench.suites.mini8.data import generate_data, tensors_sha256
from mergebench.api.weights import Weights


class ArtifactDataWarning(UserWarning):
    """The generators produced other bytes on this machine than the committed artifact's data."""


def load_mini8(name: str = "mini8", cache_dir: str | os.PathLike | None = None) -> Suite:
    """The committed suite ``name`` (``mini8`` or ``micro``): its artifact's files, checked against its manifest,
    with the configuration in :data:`CONFIGS` checked against the one the artifact was built from. ``cache_dir``
    holds the generated data (default ``$MERGEBENCH_CACHE``)."""
    cfg = CONFIGS[name]
    meta = artifact.read(name)
    expected = mini8_config_dict(cfg)
    stored = stored_config(meta["config"])
    if stored != expected:
        changed = sorted(k for k in set(stored) | set(expected) if stored.get(k) != expected.get(k))
        raise artifact.ArtifactError(
            f"the {name} configuration (CONFIGS[{name!r}] in bench/suites/mini8/config.py) differs from the one its "
            f"committed artifact was built from (fields {', '.join(changed)}); rebuild the artifact with "
            f"`make {name}-artifact` (or restore the configuration)")
    data, digest = _artifact_data(name, cfg, meta["data_sha256"], Path(cache_dir or cache_root()) / "mini8-data",
                                  meta["build"].get("torch"))
    checkpoints = {**meta["files"], "data": digest}
    identity_meta = {**meta, "data_sha256": digest}
    return _suite(cfg, name, _splits(cfg, data), artifact.load_tensors(name, "pretrained.safetensors"),
                  artifact.load_tensors(name, "heads.safetensors"),
                  lambda task: artifact.load_tensors(name, f"experts/{task}.safetensors"),
                  {"cache_key": artifact.identity(identity_meta), "checkpoints": checkpoints, "build": meta["build"],
                   "artifact": str(artifact.path(name)), "artifact_identity": artifact.identity(meta),
                   "built_accuracy": meta.get("accuracy"), "data_matches_artifact": digest == meta["data_sha256"]})


def load_built(cfg: Mini8Config, root: Path, name: str = "mini8-custom") -> Suite:
    """A configuration built by ``mergebench.build.mini8`` into ``root`` (its ``meta.json`` lists the files and
    their sha256, and its key names the suite)."""
    meta = json.loads((root / "meta.json").read_text())
    return _suite(cfg, name, _splits(cfg, load_file(root / "data.safetensors")),
                  load_file(root / "pretrained.safetensors"), load_file(root / "heads.safetensors"),
                  lambda task: load_file(root / "experts" / f"{task}.safetensors"),
                  {"cache_key": root.name, "checkpoints": meta["sha256"], "build": meta["build"]})


def _artifact_data(name: str, cfg: Mini8Config, expected: str, cache: Path, built_torch: str | None
                   ) -> tuple[dict, str]:
    """The artifact's splits, generated once per machine and cached (hash-checked on every load), with their sha256.

    Data whose sha256 differs from the artifact's (some CPUs' floating-point kernels round a few pixels the other
    way) is used, under its own digest: the suite's identity then differs, so records made on the committed data
    are not reused or pooled with it, and an ``ArtifactDataWarning`` says so."""
    stem = f"{name}-{expected[:16]}"
    data = digest = None
    for file in sorted(cache.glob(f"{stem}*.safetensors")):
        tensors = load_file(file)
        h = tensors_sha256(tensors)
        if (file.stem == stem and h == expected) or file.stem == f"{stem}-here-{h[:16]}":
            data, digest = tensors, h
            break
    if data is None:
        data = generate_data(cfg)
        digest = tensors_sha256(data)
        atomic_save_tensors(data, cache / f"{stem}{'' if digest == expected else '-here-' + digest[:16]}.safetensors")
    if digest != expected:
        warnings.warn(
            f"{name}: the generators produced data with sha256 {digest[:16]}... on this machine; the committed artifact "
            f"was built on {expected[:16]}... (its torch {built_torch}, this torch {torch.__version__}; the CPU's "
            f"floating-point kernels can round some pixels differently). The suite runs on this machine's data under "
            f"its own identity, so the committed records are not reused and results are not pooled with them.",
            ArtifactDataWarning, stacklevel=3)
    return data, digest


def _splits(cfg, data_file):
    return {s: {t: TaskData(data_file[f"{s}/{t}/images"], data_file[f"{s}/{t}/labels"]) for t in cfg.tasks}
            for s in SPLITS}


def _suite(cfg, name, data, pretrained, heads, load_expert, info) -> Suite:
    return Suite(
        name=name, tasks=list(cfg.tasks), encoder_config=dict(cfg.encoder),
        pretrained=Weights(pretrained), heads=dict(heads), data=data, logit_scale=cfg.logit_scale,
        load_expert=lambda task: Weights(load_expert(task)),
        info={"suite": name, "backbone": "open_clip VisionTransformer " + json.dumps(cfg.encoder, sort_keys=True),
              "mini8_config": mini8_config_dict(cfg), **info},
    )
