"""The limits of a run: their checked values, and the error of a run past its time limit.

A method's merge runs in a worker process of its own that the harness watches from outside and kills at its
time or memory limit (:mod:`mergebench.engine.worker`); nothing inside it can catch or delay that.
"""

from __future__ import annotations

import math

from mergebench.errors import InputError


class MethodTimeout(RuntimeError):
    """The limited work ran past its deadline and its process was killed."""


def check_seconds(value, what: str = "time limit", unit: str = "seconds") -> float | None:
    """``None`` (no limit) or a positive, finite number (of seconds, or ``unit``); anything else is an
    :class:`InputError`."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a positive number of {unit}, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(seconds) or seconds <= 0:
        raise InputError(f"{what} must be a positive number of {unit}, got {value!r}")
    return seconds
