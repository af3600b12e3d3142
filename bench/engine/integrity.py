"""Inputs are read-only to methods: fingerprints of a suite's tensors, compared after every method.

A method runs in a worker process of its own (:mod:`mergebench.engine.worker`) over a copy-on-write view of the suite.
The harness takes a fingerprint of everything that view holds -- the pretrained weights, every expert, the heads,
the LoRA factors and the data it declared -- when it writes the view, and the worker compares after the method
(``InputsModifiedError``, naming what changed): a method that changed its inputs in place is recorded as failed.
The harness also fingerprints its own suite once (``record_baseline``, after the suite passed
``check_architectures``) and compares after evaluating a returned model (``changes``), whose forward runs in the
harness's process: a suite changed there is loaded again from its files (``restore``) before the next method,
and caches (the experts' reference accuracies) are filled only after the comparison came out clean.

The fingerprint is a CRC-32 of each tensor's bytes with its dtype and shape: a detector of changes (1 GB/s here),
not a defence against code that forges a checksum. Images in a read-only memory map (the real suite's
preprocessing cache) cannot be written at all and are not hashed in the harness's suite.
"""

from __future__ import annotations

import zlib
from typing import Iterator

import torch

from mergebench.errors import MergebenchError


class InputsModifiedError(MergebenchError, RuntimeError):
    """A method changed the suite's weights, heads or data in place."""

    def __init__(self, method: str, changed: list[str], restored: bool | None = None):
        self.method, self.changed = method, list(changed)
        shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        after = {True: "; the suite was loaded again from its files",
                 False: "; the suite could not be loaded again, so later methods on it will refuse to run",
                 None: ""}[restored]
        super().__init__(
            f"{method} modified its inputs in place ({shown}); inputs are read-only: work on copies "
            f"(ctx.pretrained_weights and ctx.expert_weights(t) are the method's own; out-of-place ops or "
            f".clone() for the experts ctx.per_tensor streams){after}")


class SuiteModifiedError(MergebenchError, RuntimeError):
    """The suite was changed by an earlier method and could not be restored: nothing more runs on it."""


def fingerprint(tensor: torch.Tensor) -> str:
    """CRC-32 of the tensor's bytes, with its dtype and shape (no copy for a contiguous CPU tensor)."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    crc = zlib.crc32(memoryview(t.view(torch.uint8).numpy())) if t.numel() else 0
    return f"{t.dtype}{tuple(tensor.shape)}:{crc:08x}"


def _tensors(suite) -> Iterator[tuple[str, torch.Tensor]]:
    """(label, tensor) of everything the suite holds in memory that a method could change."""
    for key, t in suite.pretrained.items():
        yield f"pretrained {key!r}", t
    for task in suite.tasks:
        for key, t in suite.expert_weights(task).items():
            yield f"expert {task!r} {key!r}", t
    for task, head in suite.heads.items():
        yield f"head {task!r}", head
    if suite.has_lora:
        for task in suite.tasks:
            for name, factor in suite.lora_factors(task).items():
                yield f"LoRA factor {task!r} {name!r} A", factor.A
                yield f"LoRA factor {task!r} {name!r} B", factor.B
    for split, tasks in suite.data.items():
        # only the tasks already in memory (the real suite maps a dataset on first use)
        for task, data in list(dict.items(tasks)) if isinstance(tasks, dict) else []:
            if not data.read_only:
                yield f"data {split}/{task} images", data.images
            if data.labels is not None:  # a worker of a method that declared no labels holds none
                yield f"data {split}/{task} labels", data.labels


def fingerprints(suite) -> dict[str, str]:
    return {label: fingerprint(t) for label, t in _tensors(suite)}


def record_baseline(suite) -> None:
    """Take the fingerprints the suite is compared against after each method (its verified state)."""
    suite._fingerprints = fingerprints(suite)


def changes(suite) -> list[str]:
    """What differs from the baseline (``[]``: nothing; the tensors first seen later are not compared)."""
    base = getattr(suite, "_fingerprints", None)
    if base is None:
        return []
    now = fingerprints(suite)
    return [label for label, digest in base.items() if now.get(label, digest) != digest]


def check_unmodified(suite) -> None:
    """Refuse to run on a suite an earlier method changed when it could not be restored."""
    reason = getattr(suite, "_modified_by", None)
    if reason:
        raise SuiteModifiedError(f"suite {suite.name!r} was modified in place by {reason} and could not be loaded "
                                 f"again (it has no reload); load it again (get_suite) before running more methods")


def restore(suite, method: str) -> bool:
    """Load the suite again from its files into the same object; ``False`` if it cannot be reloaded (then it
    refuses further runs, see :func:`check_unmodified`)."""
    if suite.reload is None:
        suite._modified_by = method
        return False
    fresh = suite.reload()
    suite.__dict__.clear()
    suite.__dict__.update(fresh.__dict__)  # the checks and the baseline are taken again on the next run
    return True
