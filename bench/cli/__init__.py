"""The ``mergebench`` command line: one module per command, each with ``HELP`` (its line in ``--help``),
``add_arguments(parser)`` and ``main(args) -> exit status``.

    mergebench list-methods [PATTERN] [--needs KIND] [-v]
    mergebench build [SUITE]                           mergebench list-suites
    mergebench run METHOD_SPEC... [--suite mini8] [--all] [--set k=v] [--tune k=v1,v2] [--seed N] [--force]
    mergebench leaderboard [--suite mini8] [--format md|csv|latex] [--write]
    mergebench run METHOD_SPEC... --suite real --manifest M.yaml --data-root DIR [--trust-pickle] [--tasks A,B]
    mergebench data check|prepare --root DIR [--tasks A,B] [--verify] [--image-size 224] [--splits test]
    mergebench zoo init DIR | --hf-cache DIR [--out M.yaml]      mergebench zoo hash PATH
    mergebench demo [--suite mini8|mini8-lora] [--protocol sequential]
    mergebench run METHOD_SPEC... --protocol sequential [--orders 3]      mergebench leaderboard --protocol sequential
    mergebench sweep METHOD_SPEC... [--config sweep.yaml] [--grid k=v1,v2] [--seeds 0,1] [--executor local|slurm] [--jobs N]
    mergebench status SWEEP_NAME [-v]
    mergebench new-method NAME [--dir D]      mergebench check-plugin NAME      mergebench docs [--out docs/methods]

Each command imports the engine, the suites and torch inside its functions, on purpose: building the parser
imports nothing heavy, so ``mergebench --help`` and ``--version`` answer at once.

A suite's options are ``--suite-option KEY=VALUE``, and the options its registration names in ``flags`` are flags
of their own (the real suite's ``--manifest``; :mod:`mergebench.cli.options`).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import warnings

from mergebench.cli import (
    build, check_plugin, data, demo, diagnose, docs, leaderboard, list_methods, list_suites, new_method, run, status,
    sweep, zoo,
)
from mergebench.errors import MergebenchError, disk_full_message

COMMANDS = {"list-methods": list_methods, "build": build, "list-suites": list_suites, "run": run,
            "leaderboard": leaderboard, "diagnose": diagnose, "data": data, "zoo": zoo, "sweep": sweep,
            "new-method": new_method, "check-plugin": check_plugin, "docs": docs, "status": status, "demo": demo}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; given the command line ``argv``, only the named command's arguments are built (the others
    list their one-line help), so ``mergebench --help`` and ``--version`` import neither torch nor the suites."""
    from mergebench import __version__

    p = argparse.ArgumentParser(prog="mergebench", description="Benchmark model-merging methods on CLIP ViT encoders.")
    p.add_argument("--version", action="version", version=f"mergebench {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    named = None if argv is None else next((a for a in argv if not a.startswith("-")), "")
    for name, command in COMMANDS.items():
        s = sub.add_parser(name, help=command.HELP, description=getattr(command, "DESCRIPTION", None))
        if named is None or named == name:
            command.add_arguments(s)
            s.set_defaults(command=command)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    if getattr(args, "quiet", False):  # no progress bars anywhere (mergebench.engine.progress)
        os.environ["MERGEBENCH_QUIET"] = "1"
    previous, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        return args.command.main(args)
    except MergebenchError as e:  # what the user can fix: the message says what; anything else is a bug
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: {disk_full_message(e.filename, e)}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = previous


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning on the command line: one line saying what (the source line of the call is no help to a user)."""
    return f"warning: {message}\n"
