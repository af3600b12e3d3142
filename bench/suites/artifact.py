"""Committed suite artifacts: checkpoints in the repository, checked by their sha256 on every load.

A locally built suite differs in its last bits from machine to machine (thread counts and CPU kernels change
the rounding of training), and so do the config hashes of the records made on it. An artifact is built once by
the build tool (``make mini8-artifact``, :mod:`mergebench.build`), stored in ``bench/suites/artifacts/<name>/`` and committed:
every clone then loads the same bytes, records from any machine carry the same suite identity, and a fresh
clone reuses the committed records.

``suite.json`` beside the files holds the configuration the files were built from, each file's sha256, the
sha256 of the data the generators must produce for it, the accuracies measured at build time, and the build's
time and software. Loading checks every file; a file that differs is an error naming it and how to restore it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from mergebench.errors import MergebenchError
from mergebench.engine.io import file_sha256

ROOT = Path(__file__).parent / "artifacts"
MANIFEST = "suite.json"


class ArtifactError(MergebenchError, ValueError):
    """A committed artifact is incomplete, altered or does not match the code that reads it."""


def path(name: str) -> Path:
    return ROOT / name


def exists(name: str) -> bool:
    return (path(name) / MANIFEST).exists()


def read(name: str) -> dict:
    """The artifact's manifest, after checking the sha256 of every file it lists."""
    root = path(name)
    try:
        meta = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{root / MANIFEST} cannot be read ({e}); restore it with "
                            f"`git checkout -- {_rel(root)}` or rebuild with `make {name}-artifact`") from e
    for rel, expected in meta["files"].items():
        file = root / rel
        if not file.exists():
            raise ArtifactError(f"{file} is missing from the {name} artifact; restore it with "
                                f"`git checkout -- {_rel(root)}` or rebuild with `make {name}-artifact`")
        actual = file_sha256(file)
        if actual != expected:
            raise ArtifactError(f"{file} has sha256 {actual[:16]}..., the {name} artifact expects {expected[:16]}...: "
                                f"the file was altered; restore it with `git checkout -- {_rel(file)}` or rebuild "
                                f"the artifact with `make {name}-artifact`")
    return meta


def identity(meta: dict) -> str:
    """The suite's identity: a hash of its files' and its data's sha256, the same on every machine."""
    return hashlib.sha256(json.dumps({"files": meta["files"], "data": meta.get("data_sha256")},
                                     sort_keys=True).encode()).hexdigest()[:16]


def load_tensors(name: str, rel: str) -> dict[str, torch.Tensor]:
    """A stored tensor file of the artifact, floating tensors as float32 (stored in half precision)."""
    return {k: v.float() if v.is_floating_point() else v for k, v in load_file(path(name) / rel).items()}


def _rel(p: Path) -> str:
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)
