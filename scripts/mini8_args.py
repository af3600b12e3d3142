"""The command line the mini8 build scripts share: a build NAME, the JSON overrides of a ``--base`` configuration,
and an ``--out`` folder."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from mergebench.engine.io import cache_root
from mergebench.suites.mini8 import CONFIGS, Mini8Config


def parser(out: str) -> argparse.ArgumentParser:
    """NAME, OVERRIDES (JSON, parsed), --base (default mini8) and --out (default $MERGEBENCH_CACHE/``out``); a
    script adds its own arguments."""
    ap = argparse.ArgumentParser()
    ap.add_argument("name")
    ap.add_argument("overrides", nargs="?", default="{}", type=json.loads)
    ap.add_argument("--base", default="mini8")
    ap.add_argument("--out", default=str(Path(cache_root()) / out))
    return ap


def configuration(args: argparse.Namespace) -> Mini8Config:
    """The ``--base`` configuration with the overrides applied."""
    return dataclasses.replace(CONFIGS[args.base], **args.overrides)
