"""Arguments several commands share: the suite and its options, the run settings, and the parsers of their values.

The suite's flags come from the suites' registrations (``register_suite(flags=...)``): every registered suite's
flagged options become flags of every command that loads a suite, so a new suite never touches the command line."""

from __future__ import annotations

import argparse
import math
import os
import warnings

from mergebench.api.registry import HyperparameterError


def key_values(items: list[str] | None) -> dict:
    """``KEY=VALUE`` items (``--set``, ``--tune``, ``--grid``, ``--suite-option``) as a dict of strings."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise HyperparameterError(f"expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def results_option(s, help: str = "records folder") -> None:
    s.add_argument("--results", default=os.environ.get("MERGEBENCH_RESULTS", "results"), help=help)


def suite_flags() -> dict[str, dict]:
    """The options that registered suites give flags of their own: option -> {"suites": {suite: help}, "switch"}
    (a switch when every suite that declares it takes a ``bool``)."""
    from mergebench.suites import get_suite_spec, list_suites

    flags: dict[str, dict] = {}
    for name in list_suites():
        spec = get_suite_spec(name)
        for option, text in spec.flags.items():
            entry = flags.setdefault(option, {"suites": {}, "switch": True})
            entry["suites"][name] = text
            entry["switch"] &= spec.is_switch(option)
    return flags


def add_suite_arguments(s, default: str | None = "mini8", help: str | None = None) -> None:
    """``--suite`` and ``--suite-option KEY=VALUE``; the command adds ``add_suite_flags`` after its own arguments."""
    from mergebench.suites import list_suites

    s.add_argument("--suite", default=default, metavar="SUITE",
                   help=help or f"{', '.join(list_suites())} (`mergebench list-suites` describes them; default "
                                 f"{default})")
    s.add_argument("--suite-option", action="append", metavar="KEY=VALUE",
                   help="an option of the suite's loader (`mergebench list-suites` lists them)")


def add_suite_flags(s) -> None:
    """The flags the registered suites declare for their options, added last: a flag the command already has stays
    the command's (the option is then ``--suite-option KEY=VALUE``, and a warning says so)."""
    group = s.add_argument_group("suite options", "declared by the suites' registrations; each applies to the "
                                                  "suites named before its help")
    for option, entry in suite_flags().items():
        flag = "--" + option.replace("_", "-")
        if flag in s._option_string_actions:
            warnings.warn(f"suite {', '.join(entry['suites'])}: option {option} has no flag of its own on "
                          f"`{s.prog}` ({flag} is the command's); pass --suite-option {option}=VALUE")
            continue
        by_text: dict[str, list[str]] = {}
        for suite, text in entry["suites"].items():
            by_text.setdefault(text, []).append(suite)
        text = "; ".join(f"{', '.join(suites)}: {t}" for t, suites in by_text.items())
        if entry["switch"]:
            group.add_argument(flag, dest=f"suite_flag_{option}", action="store_true", default=None, help=text)
        else:
            group.add_argument(flag, dest=f"suite_flag_{option}", metavar=option.upper(), help=text)


def given_suite_options(args) -> dict:
    """The suite options given on the command line: ``--suite-option KEY=VALUE`` and the suites' flags, as text
    (``SuiteSpec.parse_options`` types them)."""
    options = key_values(getattr(args, "suite_option", None))
    for dest, value in vars(args).items():
        if dest.startswith("suite_flag_") and value is not None:
            options[dest[len("suite_flag_"):]] = value
    return options


def load_suite(args):
    """The suite ``--suite`` names, loaded with the options given."""
    from mergebench.suites import get_suite_spec

    spec = get_suite_spec(args.suite)
    options = spec.parse_options(given_suite_options(args))
    return spec.load(verbose=not getattr(args, "quiet", False), **options)


def add_run_arguments(s) -> None:
    """The settings of ``run`` and ``demo``: the suite, where records go, and how methods run."""
    from mergebench.suites.base import SPLITS

    add_suite_arguments(s)
    results_option(s)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    s.add_argument("--force", action="store_true", help="rerun configurations that already have an ok record")
    s.add_argument("--unlabeled-split", default="test", choices=list(SPLITS),
                   help="split that unlabeled streams draw from")
    s.add_argument("--data-fraction", type=fraction, default=1.0,
                   help="fraction of that split a method may see, in (0, 1]")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    s.add_argument("--time-limit", type=seconds, default=None, metavar="SECONDS",
                   help="record a method as failed when its merge runs longer than this")
    s.add_argument("--memory-limit", type=seconds, default=None, metavar="MB",
                   help="record a method as failed when its process (with those it started) holds more resident "
                        "memory than this")
    s.add_argument("--protocol", choices=["one-shot", "sequential"], default=None,
                   help="sequential: experts arrive one at a time, evaluated after each on the tasks seen, over "
                        "--orders task orders (default: sequential for methods that need it, else one-shot)")
    s.add_argument("--orders", type=int, default=3, metavar="N",
                   help="sequential protocol: number of seeded random task orders (default 3)")
    add_precision_argument(s)
    add_budget_argument(s)
    s.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="methods run at once, each in its own single-threaded CPU process, longest first "
                        "(default: 1 for run; for demo on a CPU, one per core up to 8)")
    add_suite_flags(s)


def add_budget_argument(s) -> None:
    from mergebench.api.registry import BUDGETS

    s.add_argument("--budget", choices=BUDGETS, default="paper",
                   help="paper (default): every method's defaults, which are its paper's steps, batch sizes and data; "
                        "smoke: each method's declared few-step values (tests, quick checks; marked on the leaderboard "
                        "as below the paper's budget)")


def add_precision_argument(s) -> None:
    from mergebench.api.context import PRECISIONS

    s.add_argument("--precision", choices=list(PRECISIONS), default="auto",
                   help="test-time adaptation loops' forward and backward passes: bf16 (bfloat16 autocast; merge, "
                        "trained parameters, optimizer and loss in float32), fp32 (as the official codes), or auto "
                        "(default): bf16 where the device multiplies bfloat16 in hardware (CUDA, AMX, AVX-512 BF16), "
                        "else fp32")


def seconds(text: str) -> float:
    """``--time-limit``: a positive, finite number of seconds (checked when the arguments are parsed)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def fraction(text: str) -> float:
    """``--data-fraction``: a number in (0, 1] (checked when the arguments are parsed)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}") from None
    if not (0 < value <= 1):  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1] (1 = all of the split), got {text!r}")
    return value


def seed_list(text: str) -> list[int]:
    """``--seeds``: comma-separated integers."""
    seeds = []
    for item in text.split(","):
        try:
            seeds.append(int(item))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,1,2; {item.strip()!r} in "
                                             f"{text!r} is not one") from None
    return seeds

