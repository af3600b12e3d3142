"""Writing a committed suite artifact (read by :mod:`mergebench.suites.artifact`)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from mergebench.engine.io import atomic_write_text, current_umask, file_sha256
from mergebench.suites.artifact import MANIFEST, path


def write(name: str, files: dict[str, dict[str, torch.Tensor]], meta: dict, dtype: torch.dtype = torch.float16,
          copies: dict[str, Path] | None = None) -> Path:
    """Write an artifact: ``files`` {relative path: tensors} stored with floating tensors in ``dtype``, ``copies``
    {relative path: file} copied as they are, and ``suite.json`` with ``meta`` and every file's sha256. The
    folder is replaced as a whole (written beside it, then renamed), so a failed build leaves the old one."""
    dest = path(name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=dest.parent))
    tmp.chmod(0o777 & ~current_umask())
    try:
        for rel, tensors in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            save_file({k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()},
                      str(tmp / rel))
        for rel, src in (copies or {}).items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp / rel)
        listed = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        meta = {**meta, "files": {rel: file_sha256(tmp / rel) for rel in listed}}
        atomic_write_text(tmp / MANIFEST, json.dumps(meta, indent=1, sort_keys=True) + "\n")
        if dest.exists():
            old = dest.with_name(f".{name}-old")
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old)
        else:
            tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
