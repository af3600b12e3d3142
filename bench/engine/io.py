"""Files: atomic writes, hashing and the cache directory."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from mergebench.errors import DiskFullError, MergebenchError, UnsafeNameError, disk_full_message

# a results folder needs room for a few records (tens of kB each) before any merge work starts
MIN_FREE_BYTES = 1 << 20
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]*")


class ResultsFolderError(MergebenchError, OSError):
    """The results folder cannot take a record (not writable, not a folder, or full)."""


def cache_root() -> Path:
    """``$MERGEBENCH_CACHE``, else ``$XDG_CACHE_HOME/mergebench``, else ``~/.cache/mergebench``."""
    if os.environ.get("MERGEBENCH_CACHE"):
        return Path(os.environ["MERGEBENCH_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mergebench"


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write to a temporary file in the same folder, fsync, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp creates 0600; a shared results folder needs the umask's mode
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        raise_if_disk_full(e, path)
        raise
    return path


def raise_if_disk_full(error: BaseException, path) -> None:
    """``DiskFullError`` naming ``path`` when ``error`` says its filesystem is full (ENOSPC, EDQUOT)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        raise DiskFullError(disk_full_message(path, error)) from error


def current_umask() -> int:
    """The process's umask (read without changing it where /proc allows; else set and restored at once)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def safe_name(name: str, what: str) -> str:
    """``name`` if it can be one file or folder name (letters, digits, ``. _ + = -``, not starting with a dot);
    else :class:`UnsafeNameError` naming ``what`` (e.g. "sweep name") and the value."""
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or ".." in name:
        raise UnsafeNameError(
            f"{what} {name!r} cannot be used as a file name: use letters, digits and . _ + = - only, starting with a "
            f"letter or digit (no '/', '\\', '..' or absolute paths)")
    return name


def check_writable(folder: str | os.PathLike, min_free_bytes: int = MIN_FREE_BYTES) -> Path:
    """Make sure ``folder`` exists, takes a file and has ``min_free_bytes`` free, before any long work is done;
    else :class:`ResultsFolderError` naming the folder."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check.", suffix=".tmp") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        free = shutil.disk_usage(folder).free
    except OSError as e:
        raise ResultsFolderError(f"results folder {folder} is not writable ({e.strerror or e}); pass a writable "
                                 f"--results folder or fix its permissions") from None
    if free < min_free_bytes:
        raise ResultsFolderError(f"results folder {folder} has {free:,} bytes free (at least {min_free_bytes:,} "
                                 f"needed for the records); free some space or pass another --results folder")
    return folder


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_save_tensors(tensors: dict, path: str | os.PathLike) -> Path:
    """safetensors.save_file through a temporary file and a rename (no half-written checkpoints)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        raise_if_disk_full(e, path)
        # safetensors reports a full disk as its own error: the folder has less room than the tensors take
        needed = sum(v.numel() * v.element_size() for v in tensors.values())
        if isinstance(e, Exception) and shutil.disk_usage(path.parent).free < needed:
            raise DiskFullError(disk_full_message(path, None)) from e
        raise
    return path
