"""Reading a Hugging Face cache folder offline: ``models--org--name`` and ``datasets--org--name`` repositories.

The layout ``huggingface_hub`` writes (``~/.cache/huggingface/hub``)::

    models--openai--clip-vit-base-patch32/
        refs/main                       # the commit the "main" branch pointed to when it was downloaded
        snapshots/<commit>/config.json  # the files of that commit (symlinks into blobs/)
        blobs/<sha>
    datasets--tanganke--sun397/snapshots/<commit>/data/train-00000-of-00018.parquet ...

Nothing here talks to the network: a repository is found on disk or reported missing.
"""

from __future__ import annotations

import os
from pathlib import Path

from mergebench.errors import MissingFileError


def hub_dirs_searched(root: str | os.PathLike) -> list[Path]:
    """The folders under ``root`` that may hold ``models--*`` / ``datasets--*``: root itself, root/hub and
    root/huggingface/hub (so the HF home, its hub folder or a data root holding either all work)."""
    root = Path(root)
    return [root, root / "hub", root / "huggingface" / "hub"]


def hub_dirs(root: str | os.PathLike) -> list[Path]:
    """Those of :func:`hub_dirs_searched` that exist."""
    return [d for d in hub_dirs_searched(root) if d.is_dir()]


def repo_folder_name(kind: str, repo_id: str) -> str:
    """``models--openai--clip-vit-base-patch32`` for ("model", "openai/clip-vit-base-patch32")."""
    return f"{kind}s--" + repo_id.replace("/", "--")


def repo_id_of(folder: Path) -> str:
    """The inverse: ``openai/clip-vit-base-patch32`` for ``models--openai--clip-vit-base-patch32``."""
    return folder.name.split("--", 1)[1].replace("--", "/")


def snapshot(repo_dir: Path) -> Path:
    """The snapshot folder of a cached repository: the commit ``refs/main`` names, else the only (or newest) one.
    A file of it that links to a missing blob is an error naming that file."""
    snaps = repo_dir / "snapshots"
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        commit = ref.read_text().strip()
        if (snaps / commit).is_dir():
            return check_links(snaps / commit, repo_dir)
    found = sorted((p for p in snaps.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime) if snaps.is_dir() else []
    if not found:
        raise MissingFileError(f"{repo_dir} has no snapshot (snapshots/<commit>/): an interrupted download? "
                                f"Download it again where there is network access")
    return check_links(found[-1], repo_dir)


def check_links(snap: Path, repo_dir: Path) -> Path:
    """``snap``, after checking that none of its files is a symlink whose target is gone (huggingface_hub stores
    each file once in blobs/ and links to it; an interrupted download or a cleaned cache leaves dangling links)."""
    for dirpath, _, filenames in os.walk(snap):
        for name in filenames:
            link = Path(dirpath) / name
            if link.is_symlink() and not link.exists():
                raise MissingFileError(
                    f"{link} links to {os.readlink(link)}, which is missing (an interrupted download or a cleaned "
                    f"cache): download {repo_id_of(repo_dir)} again where there is network access "
                    f"(huggingface-cli download {repo_id_of(repo_dir)}"
                    f"{' --repo-type dataset' if repo_dir.name.startswith('datasets--') else ''})")
    return snap


def find_repo(root, kind: str, repo_id: str) -> Path | None:
    """The snapshot folder of ``repo_id`` (kind ``model`` or ``dataset``) under ``root``, or None."""
    for hub in hub_dirs(root):
        folder = hub / repo_folder_name(kind, repo_id)
        if folder.is_dir():
            return snapshot(folder)
    return None


def list_repos(root, kind: str) -> dict[str, Path]:
    """{repo id: repository folder} of every cached repository of ``kind`` under ``root``."""
    out = {}
    for hub in hub_dirs(root):
        for folder in sorted(hub.glob(f"{kind}s--*")):
            if folder.is_dir():
                out.setdefault(repo_id_of(folder), folder)
    return out
