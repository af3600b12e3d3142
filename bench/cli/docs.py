"""``mergebench docs [--out docs/methods] [--check]``: one reference page per built-in method."""

from __future__ import annotations

import sys

HELP = "write one reference page per built-in method from the registry"


def add_arguments(s) -> None:
    s.add_argument("--out", default="docs/methods")
    s.add_argument("--check", action="store_true", help="only report pages that are out of date")


def main(args) -> int:
    from mergebench.api import docs

    if args.check:
        stale = docs.stale(args.out)
        if stale:
            print(f"out of date in {args.out}: {', '.join(stale)}; run `mergebench docs --out {args.out}`",
                  file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    paths = docs.write(args.out)
    print(f"wrote {len(paths)} pages to {args.out}")
    return 0
