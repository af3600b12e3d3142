"""``mergebench build [SUITE] [--artifact] [--jobs N]``: build (or load from cache) a suite."""

from __future__ import annotations

import os

from mergebench.errors import InputError

HELP = "build (or load from cache) a suite"


def add_arguments(s) -> None:
    from mergebench.suites import list_suites

    s.add_argument("suite", nargs="?", default="mini8", choices=list_suites(builds=True))
    s.add_argument("--artifact", action="store_true",
                   help="mini8, micro, mini8-lora, micro-lora: rebuild from nothing and write the committed artifact "
                        "(bench/suites/artifacts/SUITE: checkpoints, sha256, the accuracies measured at build)")
    s.add_argument("--jobs", type=int, metavar="N",
                   help="mini8 suites: fine-tune the experts (or LoRA adapters) in N processes at once, each with "
                        "the threads this one has (same bytes: each expert's run is seeded on its own; default "
                        "$MERGEBENCH_BUILD_JOBS, else 1)")


def main(args) -> int:
    from mergebench.suites import get_suite

    if args.artifact:
        from mergebench.build import mini8, mini8_lora  # the build tool, only when asked for
        from mergebench.suites.mini8 import CONFIGS, LORA_CONFIGS

        builders = {**{n: mini8.build_artifact for n in CONFIGS}, **{n: mini8_lora.build_artifact for n in LORA_CONFIGS}}
        if args.suite not in builders:
            raise InputError(f"--artifact builds the committed suites ({', '.join(builders)}), not {args.suite!r}")
        print(f"{args.suite}: artifact written to {builders[args.suite](args.suite, jobs=args.jobs)}")
        return 0
    if args.jobs is not None:
        os.environ["MERGEBENCH_BUILD_JOBS"] = str(args.jobs)
    suite = get_suite(args.suite)
    print(f"{suite.name}: {len(suite.tasks)} tasks ({', '.join(suite.tasks)}), build info {suite.info.get('build')}")
    return 0
