"""Progress bars (tqdm) for every long step: quiet when output is not a terminal and when MERGEBENCH_QUIET is set
(the command line's ``-q``)."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def quiet() -> bool:
    """Whether bars are off: ``MERGEBENCH_QUIET`` is set, or standard error (where tqdm draws) is not a terminal."""
    if os.environ.get("MERGEBENCH_QUIET"):
        return True
    try:
        return not sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return True


def progress(total=None, desc=None, disable=False, **kwargs):
    """A tqdm bar; every long loop in mergebench (evaluation, heads, data preparation, optimization loops, sweeps)
    reports through this."""
    return tqdm(total=total, desc=desc, disable=disable or quiet(), leave=False, dynamic_ncols=True, **kwargs)
