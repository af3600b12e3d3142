"""Peak memory of the process (host RAM) and of the CUDA allocator, resettable per measurement.

On Linux the kernel keeps the process's resident high-water mark (``VmHWM``); writing ``5`` to
``/proc/self/clear_refs`` resets it to the current resident size, so a peak can be measured per run or per
merge instead of over the process's lifetime. Elsewhere the lifetime peak (``ru_maxrss``) is all there is,
and ``reset_peak`` says so by returning False.
"""

from __future__ import annotations

import re
import resource
import sys
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_reset = False   # whether the host peak was reset in this process (else it is the lifetime peak)
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def rss_bytes() -> int | None:
    """The process's resident memory now (None where /proc is not available)."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def available_bytes() -> int | None:
    """The memory the kernel can give new work without swapping (``MemAvailable``; None where there is none)."""
    try:
        match = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def reset_peak(device: torch.device | str | None = None) -> bool:
    """Start a new peak: the host high-water mark (where the kernel allows) and, for a CUDA ``device``, the
    allocator's. Returns whether the host peak could be reset (else ``peak_rss_bytes`` is the lifetime peak)."""
    global _reset
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        _reset = False
        return False
    _reset = _status_kib("VmHWM") is not None
    return _reset


def peak_rss_bytes() -> int:
    """The process's resident high-water mark since the last successful ``reset_peak`` (or since it started)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def peak_cuda_bytes(device: torch.device | str | None = None) -> int:
    return torch.cuda.max_memory_allocated(device)


def host_peak_mb() -> dict:
    """The host peak for a record: ``peak_rss_mb`` (since the last ``reset_peak``) where it could be reset,
    else ``peak_rss_mb_process`` (the process's lifetime peak)."""
    return {"peak_rss_mb" if _reset else "peak_rss_mb_process": round(peak_rss_bytes() / 2**20, 1)}


def peak_mb(device: torch.device) -> dict:
    """The run's peak memory: the CUDA allocator's, or on the CPU the process's resident high-water mark since
    the run's measurement started (Linux), else over the process's lifetime."""
    if device.type == "cuda":
        return {"peak_gpu_mb": round(peak_cuda_bytes(device) / 2**20, 1)}
    return host_peak_mb()
