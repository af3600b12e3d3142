"""Progress bars (tqdm), quiet when MERGEBENCH_QUIET is set or output is not a terminal-friendly log."""

from __future__ import annotations

import os

from tqdm.auto import tqdm


def progress(total=None, desc=None, disable=False, **kwargs):
    """A tqdm bar; every optimization loop in mergebench reports through this."""
    disable = disable or bool(os.environ.get("MERGEBENCH_QUIET"))
    return tqdm(total=total, desc=desc, disable=disable, leave=False, dynamic_ncols=True, **kwargs)
